"""Backend choice: preference order, forcing by environment variable, fallback with a notice."""
import logging
import shutil
from pathlib import Path

import pytest
import torch

from engram_kernels import backends, weighted_gather
from engram_kernels.ops.memory import naive

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_tensors_prefer_the_compiled_backend_when_built():
    expected = "cpu" if backends.is_available("cpu", "cpu") else "torch"
    with backends.use_backend(None):
        assert backends.choose("cpu") == expected


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the extension cannot be built")
@pytest.mark.parametrize("family", backends.FAMILIES)
def test_cpu_extension_is_built_where_a_compiler_exists(family):
    if not (ROOT / "csrc" / "cpu" / f"{family}.cpp").exists():
        pytest.skip(f"no C++ sources for {family} yet")
    assert backends.is_available("cpu", "cpu", family), backends.describe("cpu", family)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.choose("cpu") == "torch"


def test_unknown_backend_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="ENGRAM_BACKEND='fortran' is not a backend"):
        backends.choose("cpu")


def test_unavailable_backend_falls_back_with_one_notice(monkeypatch, caplog):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    backends._notified.clear()
    values, ids, weights = torch.randn(8, 3), torch.randint(0, 8, (2, 4)), torch.rand(2, 4)
    with caplog.at_level(logging.WARNING, logger="engram_kernels"):
        out = weighted_gather(values, ids, weights)
        weighted_gather(values, ids, weights)
    torch.testing.assert_close(out, naive.weighted_gather(values, ids, weights))
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "'cuda' is unavailable for memory ops on cpu" in notices[0] and "\n" not in notices[0]


def test_report_lists_every_backend():
    text = backends.report()
    assert all(name in text for name in backends.BACKENDS)
