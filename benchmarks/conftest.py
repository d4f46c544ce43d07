"""Benchmark plumbing: the device, its peak bandwidth, peak-memory measurement and the results file.

Every finished benchmark is appended to benchmarks/results/<device-slug>-<YYYYmmdd-HHMM>.json and
the file is rewritten at once, so a run cut short (a timeout on the GPU machine) keeps what it
measured. `ENGRAM_BENCH_RESULTS=path.json` writes there instead. `benchmarks/report.py` turns these
files (or pytest-benchmark's own --benchmark-json output) into a markdown table.
"""
import datetime
import functools
import gc
import itertools
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

import engram_kernels
from engram_kernels import backends

RESULTS_DIR = Path(__file__).parent / "results"
PEAK_ENV = "ENGRAM_PEAK_GBPS"
# The project's figure for its 2-core development machine (a memcpy). bytes_moved adds reads and
# writes, and counted that way streams there reach ~27-30 GB/s (beyond its 300 MiB L3), so CPU
# % columns run high against it; ENGRAM_PEAK_GBPS overrides.
CPU_PEAK_GBPS = 6.0
# Datasheet HBM bandwidth, matched against torch.cuda.get_device_name() in this order.
GPU_PEAK_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))
MIB = 2**20


# ---- device and peak bandwidth -----------------------------------------------------------------

def bench_device():
    """cuda when present (ENGRAM_BENCH_DEVICE=cpu forces the CPU)."""
    name = os.environ.get("ENGRAM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} x{torch.get_num_threads()} threads"


def measured_copy_gbps(device, nbytes=512 * MIB, repeats=10):
    """Device-to-device copy bandwidth, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return 2 * nbytes / seconds / 1e9


def peak_bandwidth(device):
    """(GB/s, where the number comes from) for the % of peak column."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]), f"env {PEAK_ENV}"
    if device.type == "cpu":
        return CPU_PEAK_GBPS, "memcpy measured on the 2-core dev machine"
    name = torch.cuda.get_device_name(device)
    for pattern, gbps in GPU_PEAK_GBPS:
        if pattern in name:
            return gbps, f"datasheet ({pattern})"
    return measured_copy_gbps(device), "measured device-to-device copy"


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(scope="session")
def peak_gbps(device):
    return peak_bandwidth(device)[0]


@pytest.fixture(autouse=True)
def release_memory(device):
    """Drop what earlier benchmarks left in torch's caches before each one starts."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    yield


# ---- timing -------------------------------------------------------------------------------------

GPU_CALLS_PER_ROUND = 10


def synced(fn, device):
    """fn followed by a device synchronize (CPU: fn itself)."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run


def sync_every(fn, device, calls):
    """fn, with a synchronize after every `calls`-th call."""
    counter = itertools.count(1)

    def run():
        out = fn()
        if next(counter) % calls == 0:
            torch.cuda.synchronize(device)
        return out
    return run


def single_call_ms(fn, device, repeats=5):
    """Median wall time of one call followed by a synchronize: what a caller waiting on it sees."""
    fn = synced(fn, device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times)[len(times) // 2], 4)


def time_calls(benchmark, fn, device, rounds, warmup):
    """Times fn with pytest-benchmark; returns extra_info about how.

    CPU: one call per round. GPU: a round is GPU_CALLS_PER_ROUND calls launched back to back and one
    synchronize at its end (as triton.testing.do_bench does), so the mean per call is the GPU's time
    per call with the host's launch overhead overlapped, as in a model's forward. The latency of a
    single call followed by a synchronize is recorded beside it as `sync_call_ms`.
    """
    if device.type != "cuda":
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return {"calls_per_round": 1}
    calls = GPU_CALLS_PER_ROUND
    benchmark.pedantic(sync_every(fn, device, calls), rounds=rounds, warmup_rounds=warmup, iterations=calls)
    return {"calls_per_round": calls, "sync_call_ms": single_call_ms(fn, device)}


@pytest.fixture
def timed(benchmark, device):
    """timed(fn, rounds, warmup) -> extra_info: time_calls for this benchmark and device."""
    return lambda fn, rounds, warmup: time_calls(benchmark, fn, device, rounds, warmup)


# ---- peak memory --------------------------------------------------------------------------------

def allocator_events(prof, device_type):
    """(time, signed bytes) of every allocation and free torch's allocator reported to the profiler
    on `device_type`, or None where this torch's profiler does not expose them."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    return sorted((e.start_ns(), e.nbytes()) for e in events
                  if e.name() == "[memory]" and e.device_type().name == device_type.upper())


def allocator_peak(events):
    """Highest running total above the starting point, and the largest single allocation (bytes)."""
    current = peak = largest = 0
    for _, nbytes in events:
        current += nbytes
        peak, largest = max(peak, current), max(largest, nbytes)
    return peak, largest


def mib(nbytes):
    return None if nbytes is None else round(nbytes / MIB, 1)


def rss_kib():
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_rss_high_water():
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS. False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@functools.cache
def start_profiler_once():
    """The profiler's first start maps ~100 MB, which would otherwise land in rss_peak_mb."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        pass


def measure_memory(fn, device):
    """Runs `fn` once (outside the timed rounds) and returns what it allocated, in MiB.

    peak_mb: GPU, torch.cuda.max_memory_allocated() above the allocation at the start; CPU, the peak
      running total of torch's CPU allocator, from the allocation/free events of torch.profiler
      (profile_memory=True). Both count tensors only, including the outputs fn returns.
    largest_alloc_mb: the largest single tensor allocation while fn ran (profiler events, both
      devices): the number to compare with dense_grad_mb (n_slots x Dv) for a sparse backward.
    rss_peak_mb (CPU only): growth of the process's peak resident set (VmHWM after a reset), which
      also sees memory that bypasses torch's allocator (e.g. std::vector in a C++ kernel) but
      misses allocations that reuse pages the process already holds.
    """
    from torch.profiler import ProfilerActivity, profile
    start_profiler_once()
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    watch_rss = device.type == "cpu" and reset_rss_high_water()
    rss_start = rss_kib()["VmRSS"] if watch_rss else 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    del out
    events = allocator_events(prof, device.type)
    peak, largest = allocator_peak(events) if events is not None else (None, None)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - start
        result["memory_method"] = "cuda max_memory_allocated delta; largest alloc from torch.profiler"
    else:
        result["memory_method"] = "torch.profiler CPU allocator events (peak and largest); VmHWM delta"
    if watch_rss:
        result["rss_peak_mb"] = round((rss_kib()["VmHWM"] - rss_start) / 1024, 1)
    result["peak_mb"], result["largest_alloc_mb"] = mib(peak), mib(largest)
    return result


@pytest.fixture
def memory_of(device):
    """memory_of(fn) -> measure_memory of one call of fn, synchronized on GPUs."""
    return lambda fn: measure_memory(synced(fn, device), device)


# ---- results file -------------------------------------------------------------------------------

def git_commit():
    """HEAD and whether tracked files differ from it; ENGRAM_GIT_COMMIT names the commit where the
    checkout has no .git (a copied working tree)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = os.environ.get("ENGRAM_GIT_COMMIT") or git("rev-parse", "HEAD")
    return {"commit": commit or "unknown", "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def run_header(device):
    gbps, source = peak_bandwidth(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "peak_gbps": gbps,
        "peak_gbps_source": source,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "engram_kernels": engram_kernels.__version__,
        "python": platform.python_version(),
        "backends": backends.report().splitlines(),
    }


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


class ResultsFile:
    """The header plus one entry per finished benchmark, rewritten after each so none is lost."""

    def __init__(self, path, header):
        self.path, self.header, self.entries = path, header, []

    def add(self, entry):
        self.entries.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({**self.header, "benchmarks": self.entries}, indent=1, default=str))
        partial.replace(self.path)


RESULTS_KEY = pytest.StashKey[ResultsFile]()


@pytest.fixture(scope="session")
def results_file(request, device):
    header = run_header(device)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    default = RESULTS_DIR / f"{slug(header['device'])}-{stamp}.json"
    results = ResultsFile(Path(os.environ.get("ENGRAM_BENCH_RESULTS") or default), header)
    request.config.stash[RESULTS_KEY] = results
    return results


@pytest.fixture(autouse=True)
def record_result(benchmark, results_file):
    """After each benchmark: its stats, params and extra_info go to the results file."""
    yield
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.data and not benchmark.has_error:
        results_file.add(stats.as_dict(include_data=False))


def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(RESULTS_KEY, None)
    if results is not None and results.entries:
        terminalreporter.write_line(f"engram benchmark results: {results.path} ({len(results.entries)} benchmarks)")


# ---- order: cheap, most wanted numbers first ----------------------------------------------------

def pytest_collection_modifyitems(config, items):
    """File by file in the order given (gpu_check's BENCH_FILES), then config by config (inputs are
    reused), backend, op and pass; torch.compile (minutes of compiling on a fresh machine) after
    everything else, so a run cut short by a timeout loses the least. Ranks follow the module's CONFIGS,
    BACKENDS and PASSES and the order of the files and tests."""
    op_rank, file_rank = {}, {}
    for item in items:
        op_rank.setdefault(item.originalname, len(op_rank))
        file_rank.setdefault(item.module, len(file_rank))

    def rank(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        if not {"backend", "config", "pass_"} <= params.keys():
            return (False, 0, 0, 0, 0, 0)
        module = item.module
        return (params["backend"] == "compiled", file_rank[module], list(module.CONFIGS).index(params["config"]),
                module.BACKENDS.index(params["backend"]), op_rank[item.originalname],
                module.PASSES.index(params["pass_"]))

    items.sort(key=rank)  # stable: other tests keep their order
