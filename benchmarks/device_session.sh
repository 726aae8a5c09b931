#!/usr/bin/env bash
# One call on a lent GPU machine (see /work/.library/device): build, test, tune, benchmark.
#   bash benchmarks/device_session.sh STAGE...   with STAGE in: build tests gputests tune bench trainer cudaops
# A device call runs at most 10 minutes, so the pending GPU figures take three calls on
# one warm machine (the build and the installed wheels persist between them):
#   bash benchmarks/device_session.sh build gputests
#   TUNE_ARGS="--sections gemm,auxk,breakdown" bash benchmarks/device_session.sh tune bench
#   CUDAOPS_TIMEOUT=330 bash benchmarks/device_session.sh cudaops trainer
# Logs and JSON go to $OUT (default ./device-out). Each stage has its own time limit so
# a slow one cannot eat the whole call.
set -uo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site  # wheels the build stage installed (sparsify)
stage() { echo "=== $1 ($(date +%T))"; }
stages=("$@")
for s in "${stages[@]}"; do
  case $s in
    build)
      stage build
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
      fi
      TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 SAEENGINE_FORCE_CUDA_BUILD=1 \
        python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
      python3 -c "import torch, triton, saeengine; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), saeengine.available_backends('sparse_decode', torch.device('cuda')), saeengine.available_backends('topk_encode', torch.device('cuda')))"
      ;;
    tests)
      stage tests
      timeout 220 python3 -m pytest -q -p no:cacheprovider --durations=12 tests/test_triton_kernels.py tests/test_cuda_ops.py tests -rs > "$OUT/pytest.log" 2>&1
      echo "pytest rc=$?"; tail -15 "$OUT/pytest.log"
      ;;
    gputests)
      stage gputests
      timeout ${GPUTESTS_TIMEOUT:-120} python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_cuda_ops.py tests/test_optim.py tests/test_gemm_topk.py tests/test_trainer.py -k "gpu or cuda or master or sae_forward or gemm or sync" -rs > "$OUT/pytest_gpu.log" 2>&1
      echo "pytest rc=$?"; tail -5 "$OUT/pytest_gpu.log"
      ;;
    tune)
      stage tune
      timeout ${TUNE_TIMEOUT:-200} python3 benchmarks/tune_topk_encode.py --out "$OUT/tune.json" ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
      echo "tune rc=$?"; grep -E "^ +[0-9]+ " "$OUT/tune.log" || tail -20 "$OUT/tune.log"
      ;;
    bench)
      stage bench
      timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/run_benchmarks.py --out "$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
      echo "bench rc=$?"; tail -14 "$OUT/bench.log"
      ;;
    trainer)
      stage trainer
      timeout ${TRAINER_TIMEOUT:-200} python3 benchmarks/bench_trainer.py --out "$OUT/trainer.json" ${TRAINER_ARGS:-} > "$OUT/trainer.log" 2>&1
      echo "trainer rc=$?"; tail -3 "$OUT/trainer.log"
      ;;
    cudaops)
      stage cudaops
      timeout ${CUDAOPS_TIMEOUT:-240} python3 benchmarks/bench_cuda_ops.py --out "$OUT/cuda_ops.json" ${CUDAOPS_ARGS:-} > "$OUT/cuda_ops.log" 2>&1
      echo "cudaops rc=$?"; tail -20 "$OUT/cuda_ops.log"
      ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
