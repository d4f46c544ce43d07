"""ProductKeyMemory: retrofit-safe defaults, dtypes, backends agree, sparse gradients, torch.compile."""
import pytest
import torch

from engram_kernels import backends
from engram_kernels.modules import ProductKeyMemory
from engram_kernels.optim import FusedSparseAdam, FusedSparseSGD

SMALL = dict(heads=2, k=4, n_keys=8, key_dim=16)


def test_zero_values_make_the_layer_a_no_op():
    memory = ProductKeyMemory(32, **SMALL)
    x = torch.randn(2, 5, 32)
    assert torch.equal(memory(x), torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated, value_dim", [(True, None), (False, 24)])
def test_forward_dtypes_and_shapes(dtype, gated, value_dim):
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, gated=gated, value_dim=value_dim, value_init="normal", dtype=dtype, **SMALL)
    x = torch.randn(3, 7, 32, dtype=dtype)
    y = memory(x)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all() and y.abs().sum() > 0


def test_every_backend_gives_the_same_layer_output():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, value_init="normal", **SMALL)
    x = torch.randn(4, 6, 32)
    with backends.use_backend("torch"):
        expected = memory(x)
    for name in ("cpu",):
        if backends.is_available(name, "cpu"):
            with backends.use_backend(name):
                torch.testing.assert_close(memory(x), expected)


def test_gradients_reach_every_parameter_and_values_get_a_sparse_gradient():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, value_init="normal", **SMALL)
    memory(torch.randn(2, 3, 32)).square().sum().backward()
    assert memory.values.grad.is_sparse
    assert 0 < memory.values.grad._nnz() <= 2 * 3 * SMALL["heads"] * SMALL["k"]
    for name, p in memory.named_parameters():
        assert p.grad is not None and (p.grad.to_dense() if p.grad.is_sparse else p.grad).abs().sum() > 0, name


@pytest.mark.parametrize("optimizer", [FusedSparseAdam, FusedSparseSGD])
def test_fused_optimizers_change_only_allowed_touched_rows(optimizer):
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, **SMALL)
    opt = optimizer([memory.values], lr=0.1)
    allow = torch.zeros(memory.n_slots, dtype=torch.bool)
    allow[::3] = True
    opt.set_allow_mask(memory.values, allow)
    before = memory.values.detach().clone()
    target = torch.randn(4, 32)
    for _ in range(3):
        opt.zero_grad()
        (memory(torch.randn(4, 32)) - target).square().sum().backward()
        opt.step()
    changed = (memory.values != before).any(1)
    assert changed.any() and not changed[~allow].any()


@pytest.mark.parametrize("optimizer", [FusedSparseAdam, FusedSparseSGD])
def test_fused_optimizers_resume_from_their_state_dict(optimizer):
    """A bf16 table's fp32 moments and bool allow-mask come back as they were saved."""
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, dtype=torch.bfloat16, **SMALL)
    x = torch.randn(3, 4, 32, dtype=torch.bfloat16)

    def step(opt, inputs):
        opt.zero_grad()
        memory(inputs).float().square().sum().backward()
        opt.step()
    opt = optimizer([memory.values], lr=0.1)
    opt.set_allow_mask(memory.values, torch.arange(memory.n_slots) % 2 == 0)
    step(opt, x[0])
    step(opt, x[1])
    resumed = optimizer([memory.values], lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    for key, value in opt.state[memory.values].items():
        loaded = resumed.state[memory.values][key]
        if torch.is_tensor(value):
            assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
        else:
            assert loaded == value, key
    saved = memory.values.detach().clone()
    step(opt, x[2])
    expected, memory.values.data = memory.values.detach().clone(), saved
    step(resumed, x[2])
    assert torch.equal(memory.values, expected)


def test_accumulated_sparse_gradients_are_coalesced_by_the_optimizer():
    torch.manual_seed(0)
    memory = ProductKeyMemory(16, value_init="normal", **SMALL)
    reference = ProductKeyMemory(16, value_init="normal", **SMALL)
    reference.load_state_dict(memory.state_dict())
    x = torch.randn(5, 16)
    for m in (memory, reference):
        m(x).sum().backward()
        m(x * 2).sum().backward()  # two backwards: an uncoalesced sum of sparse gradients
    FusedSparseSGD([memory.values], lr=0.1).step()
    torch.optim.SGD([reference.values], lr=0.1).step()
    torch.testing.assert_close(memory.values, reference.values)


def test_torch_compile_traces_the_module_in_one_graph():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, value_init="normal", sparse_grad=False, **SMALL)
    x = torch.randn(2, 4, 32)
    compiled = torch.compile(memory, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), memory(x))
    compiled(x).sum().backward()
    assert memory.values.grad is not None and memory.query.weight.grad is not None


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError, match="key_dim must be even"):
        ProductKeyMemory(32, key_dim=15)
    with pytest.raises(ValueError, match="k must be in"):
        ProductKeyMemory(32, k=9, n_keys=8)


def _anisotropic_inputs(n=2000, dim=32, seed=0):
    """Hidden-state-like inputs: one large direction shared by every token, uneven spread."""
    gen = torch.Generator().manual_seed(seed)
    common = 6.0 * torch.randn(dim, generator=gen)
    return common + torch.randn(n, dim, generator=gen) * torch.linspace(0.05, 2.0, dim)


def test_calibrated_queries_whiten_the_centered_input():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, **SMALL)
    x = _anisotropic_inputs()
    projection = memory.query.weight.detach().double().clone()
    memory.calibrate_queries(x, shrinkage=1e-6)
    torch.testing.assert_close(memory.query_center, x.mean(0))
    # W_new = W C^-1/2, so W_new C W_new^T = W W^T
    covariance = torch.cov((x - x.mean(0)).T.double())
    weight = memory.query.weight.double()
    torch.testing.assert_close(weight @ covariance @ weight.T, projection @ projection.T, rtol=1e-3, atol=1e-3)


def test_calibration_spreads_tokens_over_more_slots():
    torch.manual_seed(0)
    memory = ProductKeyMemory(32, heads=1, k=1, n_keys=16, key_dim=16)
    x = _anisotropic_inputs()
    before = memory.lookup(x)[0].unique().numel()
    memory.calibrate_queries(x)
    assert memory.lookup(x)[0].unique().numel() > 2 * before


def test_calibration_rejects_too_few_or_non_finite_rows():
    memory = ProductKeyMemory(32, **SMALL)
    with pytest.raises(ValueError, match="at least 2 finite"):
        memory.calibrate_queries(torch.randn(1, 32))
    with pytest.raises(ValueError, match="at least 2 finite"):
        memory.calibrate_queries(torch.full((4, 32), float("nan")))
    with pytest.raises(ValueError, match="shrinkage"):
        memory.calibrate_queries(torch.randn(4, 32), shrinkage=0)
