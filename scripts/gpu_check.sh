#!/usr/bin/env bash
# GPU check, for an H100/H200 machine with no network: build the extensions in place, show the
# backends, run the tests with the GPU backends, run the benchmarks, print the report table.
#
#   scripts/gpu_check.sh OUTDIR        (from the repository root)
#
# With prebuilt/ (scripts/prebuild_gpu_extensions.sh, run elsewhere; carry it) the build is skipped.
# Finishes within about 7 + 2.5 minutes: every stage has a timeout, the benchmarks get whatever time
# is left of the first 7, and a failed stage does not stop the later ones; then the KV decode probe
# (KV_PROBE_SECONDS, default 90; 0 skips it; KV_PROBE_ARGS are its arguments) and the per-kernel
# profile of LoRA and KV decode (PROFILE_SECONDS, default 60; 0 skips it), and the probe with each
# earlier KV binary in prebuilt/baseline-* (KV_BASELINE_SECONDS each, default 25). OUTDIR receives
# flat files only: build.log, tests.log, bench.log, bench.json (pytest-benchmark), <device>-<date>.json
# (our results, written after each benchmark, so a cut-short run keeps what it measured), report.md,
# kv-probe.log and profile.log, then one kv-probe-<sha>.log per earlier KV binary.
# ENGRAM_GIT_COMMIT=<sha> records the commit where the copied checkout has no .git.
# TESTS="a.py b.py" runs those test files only (default: all of tests/); TEST_SECONDS=n gives them n
# seconds (default: up to 150, leaving the benchmarks two minutes).
# BENCH_K="expr" passes -k expr to the benchmark run (e.g. BENCH_K="not compiled").
# BENCH_FILES="a.py b.py" runs those benchmark files in that order (default: LoRA, KV cache, whole
# decode steps with each KV cache, memory: the open targets first, and LoRA before the KV kernels, so
# that a KV kernel that faults the CUDA context cannot take the LoRA numbers with it), so the ones
# that matter most run before a deadline.
# Exit status: non-zero when the build or the tests failed.
set -u

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-420}))
REPORT_RESERVE=25  # seconds kept for copying results and printing the report

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(date +%s) )); }
stage() { echo; echo "== $1 (at $(elapsed)s)"; }

# The binaries scripts/prebuild_gpu_extensions.sh made elsewhere (carried as prebuilt/), when they were
# built from these sources for this Python and torch, and all of them import.
use_prebuilt() {
  [ -f prebuilt/STAMP ] || return 1
  local stamp
  stamp=$(scripts/extension_stamp.sh python3) || return 1
  if [ "$stamp" != "$(cat prebuilt/STAMP)" ]; then
    echo "prebuilt/ is stale (stamp $(cat prebuilt/STAMP), sources here $stamp): building"
    return 1
  fi
  cp prebuilt/_C_*.so engram_kernels/
  local names
  names=$(cd prebuilt && ls _C_*.so | cut -d. -f1)
  # shellcheck disable=SC2086
  timeout -k 5 60 python3 -c 'import importlib, sys, torch
for name in sys.argv[1:]:
    importlib.import_module("engram_kernels." + name)' $names && return 0
  echo "prebuilt/ does not import here: building"
  rm -f engram_kernels/_C_*.so
  return 1
}

# nvcc on one .cu file takes ~90 s, so the families build in parallel processes, each with its own
# build directory (torch's ninja file lives there; `build_ext -j` would race on it).
build_here() {
  for family in memory lora kvcache; do
    ENGRAM_FAMILIES=$family timeout -k 10 240 python3 setup.py build_ext --inplace \
      --build-temp "build/temp-$family" --build-lib "build/lib-$family" >"build-$family.log" 2>&1 &
  done
  for job in $(jobs -p); do wait "$job" || BUILD_RC=1; done
  cat build-memory.log build-lora.log build-kvcache.log >"$OUT/build.log"
  rm -f build-memory.log build-lora.log build-kvcache.log
  grep -q "WARNING: building" "$OUT/build.log" && BUILD_RC=1
}

stage "build: prebuilt/ if its stamp matches, else one python3 setup.py build_ext --inplace per op family (log: build.log)"
BUILD_RC=0
if use_prebuilt; then
  echo "using prebuilt/ (stamp $(cat prebuilt/STAMP)): no build" >"$OUT/build.log"
else
  build_here
fi
echo "build rc=$BUILD_RC"
grep -iE "error|failed|warning: .*(spill|deprecated)" "$OUT/build.log" | head -n 20
tail -n 3 "$OUT/build.log"

stage "backends: python3 -m engram_kernels"
timeout -k 5 60 python3 -m engram_kernels 2>&1
# The memory columns rely on torch.profiler seeing CUDA allocations: 4 MiB in, 4.0 out.
timeout -k 5 60 python3 -c '
import sys, torch
sys.path.insert(0, "benchmarks")
from conftest import measure_memory
cuda = torch.device("cuda")
print("memory probe, 4 MiB tensor (expect 4.0 / 4.0):", measure_memory(lambda: torch.empty(2**20, device=cuda), cuda))
' 2>&1 | tail -n 3

# Tests get up to 150 s but always leave the benchmarks two minutes.
TEST_LIMIT=$(( $(left) - REPORT_RESERVE - 120 ))
[ "$TEST_LIMIT" -gt 150 ] && TEST_LIMIT=150
[ "$TEST_LIMIT" -lt 30 ] && TEST_LIMIT=30
TEST_LIMIT=${TEST_SECONDS:-$TEST_LIMIT}
stage "tests: ENGRAM_TEST_GPU=1 python3 -m pytest ${TESTS:-tests} --maxfail=60 -q (limit ${TEST_LIMIT}s, log: tests.log)"
# shellcheck disable=SC2086
ENGRAM_TEST_GPU=1 timeout -s INT -k 15 "$TEST_LIMIT" python3 -m pytest ${TESTS:-tests} --maxfail=60 -q -p no:cacheprovider \
  >"$OUT/tests.log" 2>&1
TESTS_RC=$?
echo "tests rc=$TESTS_RC"
tail -n 25 "$OUT/tests.log"

BENCH_LIMIT=$(( $(left) - REPORT_RESERVE ))
[ "$BENCH_LIMIT" -lt 30 ] && BENCH_LIMIT=30
stage "benchmarks: pytest benchmarks/ --benchmark-only (limit ${BENCH_LIMIT}s, log: bench.log)"
MARKER=$(mktemp)
SELECT=()
[ -n "${BENCH_K:-}" ] && SELECT=(-k "$BENCH_K")
# SIGINT first: pytest then ends the session normally and still writes bench.json.
timeout -s INT -k 15 "$BENCH_LIMIT" python3 -m pytest ${BENCH_FILES:-benchmarks/test_lora_bench.py benchmarks/test_kvcache_bench.py benchmarks/test_kvcache_generate_bench.py benchmarks/test_memory_bench.py} --benchmark-only -q -p no:cacheprovider \
  --benchmark-json "$OUT/bench.json" --benchmark-columns=mean,stddev,rounds "${SELECT[@]}" >"$OUT/bench.log" 2>&1
BENCH_RC=$?
echo "benchmarks rc=$BENCH_RC"
grep -E "passed|failed|error|skipped|engram benchmark results" "$OUT/bench.log" | tail -n 5
grep -E "^(FAILED|ERROR)" "$OUT/bench.log" | head -n 10

stage "report"
RESULTS=$(find benchmarks/results -name '*.json' -newer "$MARKER" | head -n 1)
rm -f "$MARKER"
if [ -n "$RESULTS" ]; then
  cp "$RESULTS" "$OUT/"
  python3 benchmarks/report.py "$OUT/$(basename "$RESULTS")" | tee "$OUT/report.md"
else
  echo "no results file was written (see bench.log)"
fi

# The KV decode probe (kv_decode_probe.py: each kernel against the reference, GPU time vs call time)
# runs after the deadline, in its own time.
if [ "${KV_PROBE_SECONDS:-90}" -gt 0 ]; then
  stage "KV decode probe: python3 scripts/kv_decode_probe.py (limit ${KV_PROBE_SECONDS:-90}s, log: kv-probe.log)"
  # shellcheck disable=SC2086
  PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 "${KV_PROBE_SECONDS:-90}" python3 scripts/kv_decode_probe.py ${KV_PROBE_ARGS:-} \
    >"$OUT/kv-probe.log" 2>&1
  echo "probe rc=$?"
  grep -E "^context|max \||call|sweep|ablation" "$OUT/kv-probe.log" | head -n 40
fi

if [ "${PROFILE_SECONDS:-60}" -gt 0 ]; then
  stage "profile: python3 scripts/gpu_profile.py (limit ${PROFILE_SECONDS:-60}s, log: profile.log)"
  PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 "${PROFILE_SECONDS:-60}" python3 scripts/gpu_profile.py \
    >"$OUT/profile.log" 2>&1
  echo "profile rc=$?"
  grep -E "per call$" "$OUT/profile.log" | head -n 20
fi

# The same probe (--cuda-only) with each earlier build's KV binary kept in prebuilt/baseline-<sha>/
# (KV_BASELINES, default all of them; KV_BASELINE_SECONDS each, default 25; 0 skips): before and
# after on one machine, from a copy of the package with that binary (kv-probe-<sha>.log).
if [ "${KV_BASELINE_SECONDS:-25}" -gt 0 ]; then
  for dir in ${KV_BASELINES:-$(ls -d prebuilt/baseline-* 2>/dev/null)}; do
    [ -d "$dir" ] || dir="prebuilt/baseline-$dir"
    sha=${dir##*/baseline-}
    copy=$(mktemp -d)
    cp -r engram_kernels "$copy/" && cp "$dir"/_C_kvcache_cuda*.so "$copy/engram_kernels/" || continue
    stage "KV decode probe with $dir (limit ${KV_BASELINE_SECONDS:-25}s, log: kv-probe-$sha.log)"
    PYTHONPATH="$copy" timeout -k 5 "${KV_BASELINE_SECONDS:-25}" python3 scripts/kv_decode_probe.py --cuda-only \
      >"$OUT/kv-probe-$sha.log" 2>&1
    echo "probe rc=$?"
    grep -E "^context|max \|" "$OUT/kv-probe-$sha.log" | head -n 8
    rm -rf "$copy"
  done
fi

echo
echo "== done in $(elapsed)s: build rc=$BUILD_RC, tests rc=$TESTS_RC, benchmarks rc=$BENCH_RC"
[ "$BUILD_RC" -eq 0 ] && [ "$TESTS_RC" -eq 0 ]
