set -u
export PYTHONPATH=.
cp prebuilt/_C_*.so engram_kernels/
SO=_C_kvcache_cuda.cpython-312-x86_64-linux-gnu.so
P="python3 scripts/kv_decode_probe.py --cuda-only --sweep"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 45 $P > $OUT/kv-probe.log 2>&1; echo "new rc=$?"; grep -E "^context|GPU time|max" $OUT/kv-probe.log
cp engram_kernels/$SO /tmp/new.so && cp prebuilt/old/$SO engram_kernels/$SO
timeout 45 $P > $OUT/kv-probe-c3ce940.log 2>&1; echo "old rc=$?"; grep -E "^context|GPU time|max" $OUT/kv-probe-c3ce940.log
cp /tmp/new.so engram_kernels/$SO
ENGRAM_TEST_GPU=1 timeout -s INT 70 python3 -m pytest tests/test_kvcache_ops.py tests/test_kvcache_module.py -q -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests rc=$?"; tail -n 4 $OUT/tests.log
M=$(mktemp)
ENGRAM_GIT_COMMIT=$(cat COMMIT) timeout -s INT 55 python3 -m pytest benchmarks/test_kvcache_bench.py --benchmark-only -q -p no:cacheprovider -k "(sdpa or cuda) and (32k or 128k)" --benchmark-json $OUT/bench.json > $OUT/bench.log 2>&1; echo "bench rc=$?"
R=$(find benchmarks/results -name '*.json' -newer $M | head -n 1)
[ -n "$R" ] && cp $R $OUT/ && python3 benchmarks/report.py $OUT/$(basename $R) > $OUT/report.md; grep kv_decode $OUT/report.md
