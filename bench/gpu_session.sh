#!/usr/bin/env bash
# One call on a lent GPU machine: install, GPU tests, kernel timings, end-to-end runs.
#   OUT=/dir bash bench/gpu_session.sh "tests bench e2e"   (any subset, in that order; also lntune: bench/ln_tune.py,
#   cetune: bench/ce_tune.py)
#   OUT=/dir bash bench/gpu_session.sh plan   (bench/NOTES.md's ~9-minute plan: chosen GPU tests, bench --quick, e2e --quick)
# Data travels in .gpu/ (git-ignored): tiktoken_cache/, corpus/tinyshakespeare.txt, hellaswag/.
# Logs and results go to $RUN_DIR/run/ (default /tmp/gpu_session/run), and $OUT holds one file: run.tgz, their
# tarball, rewritten after every step (the device tool brings back at most 8 files of 16 MiB from $OUT, and what
# is there when a call is killed at its limit: the steps done by then). The profiler's traces (trace.json.gz,
# megabytes each) stay out of it; each run's profile.json goes in. The log tails are printed too.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
RUN_DIR=${RUN_DIR:-/tmp/gpu_session}
STEPS=${1:-"tests bench e2e"}
if [ "$STEPS" = "plan" ]; then  # bench/NOTES.md's plan for a 15-minute device budget: ~9 minutes in one call
  : "${TESTS:=tests/test_classifier.py tests/test_train.py::test_gpu_cuda_graph_matches_eager tests/test_train.py::test_gpu_training_step_never_syncs tests/test_train.py::test_gpu_default_kernels_bf16 tests/test_eager_path.py tests/test_layernorm.py::test_autotuned_gpt2_shapes_on_gpu tests/test_attention.py::test_attention_qkv_matches_float64_and_the_split_path}"
  : "${TESTS_TIMEOUT:=240}" "${BENCH_ARGS:=--quick cross_entropy layer_norm add_layer_norm}" "${BENCH_TIMEOUT:=120}"
  : "${E2E_ARGS:=--quick}" "${E2E_TIMEOUT:=180}"
  STEPS="tests bench e2e"
fi
R=$RUN_DIR/run; mkdir -p "$R" "$OUT"
pack() {  # $OUT/run.tgz <- $R, replaced only once the new tarball is whole
  tar czf "$OUT/run.tgz.part" --exclude=trace.json.gz -C "$RUN_DIR" run && mv "$OUT/run.tgz.part" "$OUT/run.tgz"
}
export PYTHONUNBUFFERED=1 MAX_JOBS=16
export TRITON_PRINT_AUTOTUNING=1  # each autotuner's choice (attention, LayerNorm) lands in the step's log
if [ -d .gpu ]; then export TIKTOKEN_CACHE_DIR=$PWD/.gpu/tiktoken_cache GPT2_DATA_CACHE=$PWD/.gpu; fi
# The machine has no network: if pip cannot install (e.g. it wants setuptools), run from the checkout.
if [ -z "${GPU_SESSION_NO_INSTALL:-}" ]; then  # (set by the test of this script)
  python -m pip install --no-deps --no-build-isolation -e . > "$R/install.log" 2>&1 || echo "pip install failed (see install.log): using PYTHONPATH"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)"; python -m kernels; } > "$R/env.txt" 2>&1
cat "$R/env.txt" | head -30
pack
for step in $STEPS; do
  case $step in
    tests) timeout ${TESTS_TIMEOUT:-540} python -m pytest ${TESTS:-tests} -q -rfEs --durations=20 -p no:cacheprovider > "$R/pytest.log" 2>&1
           echo "pytest rc=$?"; tail -40 "$R/pytest.log" ;;
    bench) timeout ${BENCH_TIMEOUT:-300} python bench/run.py --out "$R" ${BENCH_ARGS:-} > "$R/bench.log" 2>&1
           echo "bench rc=$?"; tail -60 "$R/bench.log" ;;
    e2e)   timeout ${E2E_TIMEOUT:-300} python bench/run.py --e2e --out "$R" ${E2E_ARGS:-} > "$R/e2e.log" 2>&1
           echo "e2e rc=$?"; tail -40 "$R/e2e.log" ;;
    lntune) timeout ${LNTUNE_TIMEOUT:-240} python bench/ln_tune.py --out "$R" ${LNTUNE_ARGS:-} > "$R/ln_tune.out" 2>&1
           echo "ln_tune rc=$?"; tail -12 "$R/ln_tune.out" ;;
    cetune) timeout ${CETUNE_TIMEOUT:-240} python bench/ce_tune.py --profile --out "$R" ${CETUNE_ARGS:-} > "$R/ce_tune.out" 2>&1
           echo "ce_tune rc=$?"; tail -40 "$R/ce_tune.out" ;;
    *)     echo "unknown step $step (tests bench e2e lntune cetune)"; exit 2 ;;
  esac
  pack
done
