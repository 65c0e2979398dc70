#!/usr/bin/env bash
# On a machine with an NVIDIA GPU (and no network): build neptune_ext with its CUDA
# kernels, run the CUDA tests, run compute-sanitizer on every kernel family, run the GPU
# benchmarks - one prepared call within a lent session's device time. Every step runs
# under its own time budget (printed with the step; BUDGET_<STEP>=seconds overrides it)
# so one slow step cannot eat the others. Logs and JSON go to $OUT (default ./gpu_out);
# the last lines printed are the summary table. Exit status: 0 only if every step passed.
# Then, on the development machine: python scripts/gpu_results.py <fetched $OUT> turns the
# JSON into benchmarks/results/<device>-<date>-<what>.json and the README's GPU tables.
#
#   bash scripts/gpu_check.sh                  (or: make gpu-check)
#   STEPS="build test" bash scripts/gpu_check.sh   then   STEPS="sanitizer bench" ...
#   QUICK=1 bash scripts/gpu_check.sh          (benchmark on 10x smaller graphs)
#   DRY_RUN=1 bash scripts/gpu_check.sh        (no GPU: print each step and its budget)
#
# Environment: PYTHON (default python3), OUT, STEPS (default "build test sanitizer bench
# transformerbench"; a second call on the warm machine: STEPS="stagebench usergraphs
# usergraphsv2"; also
# "cnnbench cnnbench50": whole CNNs),
# TORCH_CUDA_ARCH_LIST (default 9.0a: the H200 only), QUICK=1, BENCH_ARGS (extra arguments
# for the benchmark), SANITIZER_TOOLS (default "memcheck racecheck"), NEPTUNE_GIT_COMMIT
# (recorded in the JSON when the checkout has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
# The CUTLASS headers: the GPU image has no nvidia-cutlass and no network, so carry the
# local venv's copy along (device tool: carry .venv/lib/python3.11/site-packages/cutlass_library/source/include).
if [ -z "${NEPTUNE_CUTLASS_DIR:-}" ]; then
  for d in .venv/lib/python3*/site-packages/cutlass_library/source/include; do
    [ -f "$d/cutlass/cutlass.h" ] && export NEPTUNE_CUTLASS_DIR="$PWD/$d" && break
  done
fi
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0
STEPS=" ${STEPS-build test sanitizer bench transformerbench} "  # set but empty: none
want() { [[ "$STEPS" == *" $1 "* ]]; }
note() { echo "$*" | tee -a "$SUMMARY"; }
# Seconds per step: caps, not estimates (a step stops at its cap and fails). The default
# steps' caps add up to 565 s (sanitizer runs twice): one ~9-minute device command, under the
# 600 s a command may take. The second call, STEPS="stagebench usergraphs usergraphsv2" on the
# still-warm machine (it keeps the in-place build), adds 270 s (each usergraphs step runs
# twice: fp32, bf16 autocast). None of these
# steps has been timed on this code.
declare -A BUDGET=([build]=150 [load]=30 [test]=150 [sanitizer]=60 [bench]=60 [usergraphs]=50 [usergraphsv2]=50
                   [stagebench]=40 [transformerbench]=55 [cnnbench]=500 [cnnbench50]=500)
budget() { local v="BUDGET_${1^^}"; echo "${!v:-${BUDGET[$1]}}"; }
step() {  # step KEY NAME LOG CMD...: runs CMD under KEY's budget, output to LOG, records pass/fail
  local key="$1" name="$2" log="$3"; shift 3
  local t0=$SECONDS limit; limit=$(budget "$key")
  echo "== $name [budget ${limit} s]" | tee -a "$log"
  if [ "${DRY_RUN:-0}" = 1 ]; then note "DRY   $name [budget ${limit} s]: $*"; return 0; fi
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then note "PASS  $name ($((SECONDS - t0)) s of ${limit})"
  elif [ $rc -eq 124 ] || [ $rc -eq 130 ]; then note "FAIL  $name (over its budget of ${limit} s; see $(basename "$log"))"; FAILED=1
  else note "FAIL  $name (exit $rc, $((SECONDS - t0)) s; see $(basename "$log"))"; FAILED=1; fi
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: ${NEPTUNE_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$SUMMARY"
[ "${DRY_RUN:-0}" = 1 ] || "$PY" - "$OUT/env.json" <<'PYEOF' >/dev/null 2>&1
import datetime, json, os, subprocess, sys, torch
env = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "torch": torch.__version__, "cuda": torch.version.cuda,
       "commit": os.environ.get("NEPTUNE_GIT_COMMIT") or subprocess.run(
           ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown",
       "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}
json.dump(env, open(sys.argv[1], "w"), indent=1)
PYEOF

# 1. Build (in place, editable). The resource report of ptxas (registers, spills)
#    goes to the build log.
BUILD_LOG="$OUT/build.log"
export NEPTUNE_CUDA=1 NEPTUNE_REQUIRE_EXT=1 MAX_JOBS="${MAX_JOBS:-8}"
if want build; then
  step build "build (pip install --no-build-isolation -e ., CUDA archs $TORCH_CUDA_ARCH_LIST)" "$BUILD_LOG" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . || { note "build failed: stopping"; exit 1; }
fi
step load "extension loads with CUDA kernels" "$BUILD_LOG" "$PY" -c "
import neptune_ext, torch
from neptune_ext import _ext
assert _ext._C is not None, _ext.LOAD_ERROR
print(torch.ops.neptune.build_info())
assert 'cuda' in _ext.compiled_backends(), _ext.compiled_backends()
" || { note "no CUDA kernels: stopping"; exit 1; }

# 2. Tests: every CUDA-marked test - the CUDA parameters of the op tests (GAT, GATv2, graph
#    transformer: tests/test_attention_ops.py) and of the layer conformance suite against
#    GATConv / GATv2Conv / TransformerConv. (The CPU emulation of the CUDA kernels is CPU
#    work: CI runs it on every change.)
if want test; then
  step test "pytest -m cuda tests" "$OUT/pytest.log" \
    "$PY" -m pytest -q -m cuda tests -p no:cacheprovider
fi

# 3. compute-sanitizer, one small case of every kernel family (GAT, GATv2, graph build and
#    check, BN+ReLU, CUTLASS convolution, cuDNN fused calls, then the graph transformer with
#    edge features and dropout, int32 and int64 graphs): one process per tool; the log's
#    "ok (<family>)" lines say how far each got.
if want sanitizer; then
  if command -v compute-sanitizer >/dev/null || [ "${DRY_RUN:-0}" = 1 ]; then
    for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
      step sanitizer "compute-sanitizer --tool $tool (every kernel family, graph transformer last)" "$OUT/sanitizer.log" \
        compute-sanitizer --tool "$tool" --error-exitcode 86 "$PY" scripts/sanitizer_case.py
    done
    grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT/sanitizer.log" 2>/dev/null | sed 's/^/      /' | tee -a "$SUMMARY"
    [ "${DRY_RUN:-0}" = 1 ] || note "      cases passed, both tools together: $(grep -o '^ok ([A-Za-z0-9_]*)' \
      "$OUT/sanitizer.log" 2>/dev/null | sort | uniq -c | awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $3, $1}')"
  else
    note "FAIL  compute-sanitizer not found"; FAILED=1
  fi
fi

# 4. The GPU benchmark (JSON with every figure; the table at the end of bench.log).
if want bench; then
  ARGS=(--json "$OUT/bench.json")
  [ "${QUICK:-0}" = 1 ] && ARGS+=(--quick)
  # shellcheck disable=SC2206
  ARGS+=(${BENCH_ARGS:-})
  step bench "benchmark (benchmarks/gpu_graph_attention.py ${ARGS[*]})" "$OUT/bench.log" \
    "$PY" benchmarks/gpu_graph_attention.py "${ARGS[@]}"
  sed -n '/^graph /,$p' "$OUT/bench.log" 2>/dev/null >>"$SUMMARY"
fi

# 5. The Stage (BatchNorm+ReLU) CUDA benchmark (its CUDA tests run in step 2: -m cuda).
if want stagebench; then
  step stagebench "benchmark (benchmarks/gpu_stage.py)" "$OUT/stage_bench.log" \
    "$PY" benchmarks/gpu_stage.py --json "$OUT/stage_bench.json"
fi

# 6. GraphAttention (usergraphs) and GraphAttentionV2 (usergraphsv2) where users train:
#    Cora-/PubMed-sized graphs and fresh-edge_index mini-batches against GATConv / GATv2Conv
#    eager and torch.compile, fp32 and bf16 autocast.
for layer in gat gatv2; do
  key=usergraphs; [ "$layer" = gatv2 ] && key=usergraphsv2
  want "$key" || continue
  for amp in none bf16; do
    AMP=(); [ "$amp" = bf16 ] && AMP=(--amp bf16)
    name=user_graphs_$amp; [ "$layer" = gatv2 ] && name=user_graphs_gatv2_$amp
    step "$key" "benchmark (neptune_app.bench.user_graphs --device cuda --layer $layer ${AMP[*]})" \
      "$OUT/$name.log" \
      "$PY" -m neptune_app.bench.user_graphs --device cuda --layer "$layer" "${AMP[@]}" --json "$OUT/$name.json"
  done
done

# 7. The graph transformer: GraphTransformer against TransformerConv eager and
#    torch.compile(TransformerConv), fp32 and bf16 autocast, on the benchmark's graphs
#    (torch.compile only where E <= 2M: the arxiv-sized graph; one warm-up, five repeats).
#    Its own step and JSON, so the GAT figures above never wait on a compile.
if want transformerbench; then
  ARGS=(--what transformer --warmup 1 --repeats 5 --json "$OUT/bench_transformer.json")
  [ "${QUICK:-0}" = 1 ] && ARGS+=(--quick)
  step transformerbench "benchmark (benchmarks/gpu_graph_attention.py ${ARGS[*]})" "$OUT/bench_transformer.log" \
    "$PY" benchmarks/gpu_graph_attention.py "${ARGS[@]}"
  sed -n '/^graph /,$p' "$OUT/bench_transformer.log" 2>/dev/null >>"$SUMMARY"
fi

# 8. Whole CNNs (not in the default steps: torch.compile of each model and precision takes
#    minutes; run them in a second call, STEPS="cnnbench cnnbench50"): fuse_stages vs eager,
#    torch.fx folding and torch.compile (batch 64, 224², channels_last; fp32, bf16, bf16
#    autocast; with CUTLASS where built). cnnbench: ResNet-18, each of its convolutions
#    fused vs eager (--layers), training steps with memory (a Stage stack, ResNet-18);
#    cnnbench50: ResNet-50 inference.
if want cnnbench; then
  step cnnbench "benchmark (neptune_app.bench.gpu_cnn --device cuda --models resnet18 --layers)" "$OUT/cnn_bench.log" \
    "$PY" -m neptune_app.bench.gpu_cnn --device cuda --models resnet18 --layers --json "$OUT/cnn_bench_resnet18.json"
  grep -A7 "^resnet\|^training" "$OUT/cnn_bench.log" 2>/dev/null >>"$SUMMARY"
fi
if want cnnbench50; then
  step cnnbench50 "benchmark (neptune_app.bench.gpu_cnn --device cuda --models resnet50 --no-training)" "$OUT/cnn_bench50.log" \
    "$PY" -m neptune_app.bench.gpu_cnn --device cuda --models resnet50 --no-training --json "$OUT/cnn_bench_resnet50.json"
  grep -A7 "^resnet" "$OUT/cnn_bench50.log" 2>/dev/null >>"$SUMMARY"
fi

note "---- steps:${STEPS% }: $([ $FAILED = 0 ] && echo 'all passed' || echo 'SOME FAILED'); logs in $OUT"
exit $FAILED
