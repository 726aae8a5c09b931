#!/usr/bin/env bash
# One call on a lent GPU machine (/work/.library/device; README.md, "Benchmarks"): build,
# the GPU tests (which write the validation record), the benchmark table, then what fits.
#
#   bash benchmarks/device_session.sh [--dry-run] [--plan] [STAGE...]
#
# STAGE: any of the plan's names below (default: all, in plan order; named ones run in the
# order given). Each stage runs under its own time limit (SIGINT at the limit minus 5 s,
# so pytest still writes its summary and the record; SIGKILL at the limit), appends its
# output to $OUT/session.log and writes its results to $OUT as it finishes; $OUT/timings.json (stage -> seconds, rc,
# limit) is rewritten after every stage, so a call stopped early returns what was done.
# The default limits sum to at most 540 s (one 9-minute call). LIMIT_<stage>=S overrides
# one (e.g. LIMIT_tune=400 for a call of tune alone).
#
# --dry-run (or DRY_RUN=1): every stage's command in its smoke form on CPU, with the
#   package already installed (no nvidia-smi, no build): CI checks the plumbing with it.
# --plan: print "stage limit_s what" per stage and the total, and exit.
#
# Environment: OUT (default ./device-out), PYTHON (default python3), SAEENGINE_COMMIT
# (the commit, for a copied tree without .git), BENCH_SHAPES, CUDAOPS_SECTIONS,
# TUNE_SHAPES, TUNE_SECTIONS.
set -uo pipefail
SELF=$(realpath "$0")
OUT=$(realpath -m "${OUT:-device-out}")  # relative to where the script was started
cd "$(dirname "$SELF")/.."

# name     limit_s  what
PLAN="
build      110  pip install -e . with the CUDA build (sm_90); the wheels in .whl/ (sparsify) into /tmp/site
gputests   140  every @validates GPU test, the kernels auto uses first; writes gpu_validation.json
synctest    40  the host-sync tests and the GPU training test, on what auto takes after gputests
bench      100  run_benchmarks.py: the table against sparsify and the torch reference; bench.json
cudaops     75  bench_cuda_ops.py: full step, select, decode, optimizer, resample, widest; cuda_ops.json
trainer     25  bench_trainer.py: trainer tokens/s against the bare step; trainer.json
tune        25  tune_topk_encode.py: the chunked encoder's variants; tune.json
encode      25  bench_encode.py: the eval encode pass's tokens/s on the GPU; encode.json
"
MAX_TOTAL=540

stage_names() { awk 'NF {print $1}' <<<"$PLAN"; }
stage_limit() {
  local override="LIMIT_$1" limit
  limit=${!override:-$(awk -v s="$1" '$1 == s {print $2}' <<<"$PLAN")}
  if ! [[ $limit =~ ^[0-9]+$ ]] || [ "$limit" -lt 2 ]; then
    echo "LIMIT_$1=$limit: a stage limit is a whole number of seconds, at least 2" >&2; exit 2
  fi
  echo "$limit"
}

DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
# The kernels auto takes first (fused encode, Triton decode, then the csrc/ ops); the chunked
# encoder, which auto takes only without the fused one, last.
GPU_TEST_FILES="tests/test_triton_kernels.py tests/test_cuda_ops.py tests/test_optim.py tests/test_gemm_topk.py"
SYNC_TEST_FILES="tests/test_trainer.py tests/test_optim.py"

# ----- one stage's commands (run by the script itself, under the stage's limit) ---------
run_stage() {
  case $1 in
    build)
      if [ "$DRY_RUN" = 1 ]; then
        exec "$PYTHON" -c "import torch, saeengine; print('dry run: installed', saeengine.__version__, torch.__version__, saeengine.available_backends('topk_encode', 'cpu'))"
      fi
      if ls .whl/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
      fi
      if ! TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 SAEENGINE_FORCE_CUDA_BUILD=1 \
          "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .; then
        echo "CUDA build failed; installing without csrc/ so the Triton stages still run"
        SAEENGINE_SKIP_CUDA_BUILD=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
        exit 1
      fi
      exec "$PYTHON" -c "import torch, triton, saeengine; d = torch.device('cuda'); print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), {op: saeengine.available_backends(op, d) for op in ('topk_encode', 'sparse_decode', 'topk_select', 'row_sparse_adam')})"
      ;;
    gputests)
      cp saeengine/gpu_validation.json "$OUT/gpu_validation.json"  # entries of keys that fail stay as they are
      # shellcheck disable=SC2086
      SAEENGINE_RECORD_VALIDATION="$OUT/gpu_validation.json" exec "$PYTHON" -m pytest -q -p no:cacheprovider \
        -m validates -rfEs --durations=15 $([ "$DRY_RUN" = 1 ] && echo --collect-only) $GPU_TEST_FILES
      ;;
    synctest)
      # shellcheck disable=SC2086
      exec "$PYTHON" -m pytest -q -p no:cacheprovider -m "not validates" -k "sync or gpu" -rfEs \
        $([ "$DRY_RUN" = 1 ] && echo --collect-only) $SYNC_TEST_FILES
      ;;
    bench)
      if [ "$DRY_RUN" = 1 ]; then
        exec "$PYTHON" benchmarks/run_benchmarks.py --smoke --out "$OUT/bench.json"
      fi
      exec "$PYTHON" benchmarks/run_benchmarks.py --out "$OUT/bench.json" \
        --shapes "${BENCH_SHAPES:-4096x65536,4096x1048576,16384x1048576}"
      ;;
    cudaops)
      if [ "$DRY_RUN" = 1 ]; then
        exec "$PYTHON" benchmarks/bench_cuda_ops.py --smoke --sections select --out "$OUT/cuda_ops.json"
      fi
      exec "$PYTHON" benchmarks/bench_cuda_ops.py --out "$OUT/cuda_ops.json" \
        --sections "${CUDAOPS_SECTIONS:-step,select,decode,optimizer,resample,widest}"
      ;;
    trainer)
      if [ "$DRY_RUN" = 1 ]; then
        exec "$PYTHON" benchmarks/bench_trainer.py --d-in 16 --d-sae 64 --k 2 --batch 64 --steps 12 --out "$OUT/trainer.json"
      fi
      exec "$PYTHON" benchmarks/bench_trainer.py --steps 60 --out "$OUT/trainer.json"
      ;;
    tune)
      if [ "$DRY_RUN" = 1 ]; then
        exec "$PYTHON" benchmarks/tune_topk_encode.py --smoke --out "$OUT/tune.json"
      fi
      exec "$PYTHON" benchmarks/tune_topk_encode.py --out "$OUT/tune.json" \
        --shapes "${TUNE_SHAPES:-4096x262144}" --sections "${TUNE_SECTIONS:-gemm}"
      ;;
    encode)
      if [ "$DRY_RUN" = 1 ]; then
        exec "$PYTHON" benchmarks/bench_encode.py --tokens 2000 --d-in 16 --d-sae 64 --k 4 --memory-tokens 0 \
          --device cpu --out "$OUT/encode.json"
      fi
      exec "$PYTHON" benchmarks/bench_encode.py --device cuda --tokens 2000000 --memory-tokens 0 --out "$OUT/encode.json"
      ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
}

if [ "${1:-}" = __stage ]; then
  run_stage "$2"
  exit $?
fi

# ----- the session --------------------------------------------------------------------
for s in $(stage_names); do stage_limit "$s" > /dev/null; done  # a bad LIMIT_<stage> stops here
stages=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --plan)
      total=0
      for s in $(stage_names); do
        limit=$(stage_limit "$s"); total=$((total + limit))
        printf '%-9s %4s  %s\n' "$s" "$limit" "$(awk -v s="$s" '$1 == s {$1 = ""; $2 = ""; sub(/^ +/, ""); print}' <<<"$PLAN")"
      done
      echo "total $total (at most $MAX_TOTAL)"
      exit 0 ;;
    -*) echo "unknown option $arg (use --dry-run, --plan)"; exit 2 ;;
    *)
      if ! stage_names | grep -qx -- "$arg"; then
        echo "unknown stage $arg; stages: $(stage_names | tr '\n' ' ')"; exit 2
      fi
      stages+=("$arg") ;;
  esac
done
[ ${#stages[@]} -eq 0 ] && mapfile -t stages < <(stage_names)
export DRY_RUN PYTHON PYTHONUNBUFFERED=1
# The smoke forms time the torch paths on CPU; interpreted kernels would take seconds a call
# (the tests and tune --smoke switch the interpreter on themselves where they need it).
[ "$DRY_RUN" = 1 ] && unset TRITON_INTERPRET
mkdir -p "$OUT"; export OUT
LOG="$OUT/session.log"; : > "$LOG"

total=0
for s in "${stages[@]}"; do total=$((total + $(stage_limit "$s"))); done
[ "$total" -gt "$MAX_TOTAL" ] && echo "warning: the stage limits sum to $total s, over one call's $MAX_TOTAL s"

commit=${SAEENGINE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -z "${SAEENGINE_COMMIT:-}" ] && [ "$commit" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit+dirty"
fi
if [ "$DRY_RUN" = 1 ]; then
  gpu="none (dry run)"
else
  gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
fi
echo "device_session: gpu: $gpu; commit: $commit; stages: ${stages[*]} (limits total $total s)" | tee -a "$LOG"

json_text() { printf '"%s"' "$(printf '%s' "$1" | tr -d '"\\' | tr '\n\t' '  ')"; }
done_json=""
write_timings() {
  local plan_json="" s
  for s in "${stages[@]}"; do plan_json+="${plan_json:+, }\"$s\": $(stage_limit "$s")"; done
  printf '{\n  "gpu": %s,\n  "commit": %s,\n  "dry_run": %s,\n  "limit_total_s": %s,\n  "plan": {%s},\n  "stages": {%s\n  }\n}\n' \
    "$(json_text "$gpu")" "$(json_text "$commit")" "$([ "$DRY_RUN" = 1 ] && echo true || echo false)" "$total" \
    "$plan_json" "$done_json" > "$OUT/timings.json.tmp" && mv "$OUT/timings.json.tmp" "$OUT/timings.json"
}
write_timings

summary=()
for s in "${stages[@]}"; do
  limit=$(stage_limit "$s")
  if [ "$DRY_RUN" != 1 ] && [ -d /tmp/site ] && [[ ":${PYTHONPATH:-}:" != *:/tmp/site:* ]]; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the wheels the build installed
  fi
  echo "=== $s (limit $limit s, $(date -u +%T))" | tee -a "$LOG"
  offset=$(stat -c %s "$LOG")
  start=$(date +%s%N)
  grace=5; [ "$limit" -le 10 ] && grace=1  # SIGINT first, so pytest writes its summary; SIGKILL at the limit
  timeout -s INT -k $grace $((limit - grace)) bash "$SELF" __stage "$s" >> "$LOG" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  seconds=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  if [ "$s" = gputests ] && [ "$DRY_RUN" != 1 ] && [ -s "$OUT/gpu_validation.json" ]; then
    # This tree is the device's copy: what passed here is what auto takes in the later stages.
    cp "$OUT/gpu_validation.json" saeengine/gpu_validation.json
  fi
  done_json+="${done_json:+,}"$'\n'"    \"$s\": {\"seconds\": $seconds, \"rc\": $rc, \"limit_s\": $limit}"
  write_timings
  note=""; [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (stopped at its limit)"
  summary+=("$(printf '%-9s %4s s limit %9s s  rc %s%s' "$s" "$limit" "$seconds" "$rc" "$note")")
  case $s in
    gputests) lines=30 ;; bench) lines=16 ;; *) lines=6 ;;
  esac
  tail -c +$((offset + 1)) "$LOG" | tail -n "$lines"
  echo "--- $s: rc $rc, $seconds s$note" | tee -a "$LOG"
done
echo "=== timings ($OUT/timings.json)"
printf '%s\n' "${summary[@]}"
