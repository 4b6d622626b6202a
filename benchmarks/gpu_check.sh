#!/usr/bin/env bash
# The one script a session with a GPU runs on the device machine (issue 13): the CUDA tests, then the
# GPU benchmark, within one call of the device tool. Prepare its inputs here first:
#
#   make gpu-inputs            # .gpu-inputs/: SST-2 dev, the MiniLM tokenizer, pure-Python test wheels
#   device run (carry [".gpu-inputs"]):  bash benchmarks/gpu_check.sh   (writes $OUT/gpu.json, $OUT/cuda-tests.txt)
#   a second call while the machine is warm: GPU_TESTS=0 GPU_MERGE=1 GPU_BENCH_ARGS="--workloads ..." (no tests)
#
# then copy $OUT/gpu.json to benchmarks/results/gpu.json and run `python -m benchmarks report`.
#
# `bash benchmarks/gpu_check.sh --rehearse` (what `make gpu-rehearsal` runs, in a venv of the device
# image's torch, torchvision and transformers releases) runs the same steps on a CPU before device time
# is spent: every test of the modules below (their CUDA tests skip) and the benchmark's --quick run with
# its serving stages compiled by inductor.
# The device image has PyTorch, torchvision and transformers but not this project's environment: the
# code runs from the source tree, pytest from the carried wheels (pure Python, importable as zips).
# The test modules below import without what the image lacks (scipy, matplotlib, ...; checked by
# tests/test_benchmark_gpu.py); a module that still fails to collect is reported and the others run.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
# The modules whose CUDA tests compile with inductor (the slowest) last, the report's timing (the least needed)
# after the static rest's: a cut run keeps the others' results.
TESTS=(
    tests/test_host_waits.py tests/test_compiled.py tests/test_compiled_cascade.py tests/test_precision.py
    tests/test_attach.py tests/test_compiled_graphs.py tests/test_compiled_static_rest.py tests/test_timing.py
    tests/test_part_costs.py
)
INPUTS=.gpu-inputs
WHEELS=$(find "$INPUTS/wheels" -name '*.whl' 2>/dev/null | tr '\n' ':')
export PYTHONPATH="src:tests:${WHEELS}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
else
    echo "no nvidia-smi: a CPU rehearsal" | tee "$OUT/device.txt"
fi
git log -1 --format='git HEAD there: %h %s' 2>/dev/null | tee -a "$OUT/device.txt"
python3 -c "import torch, torchvision, transformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
# The tests that need a CUDA device (each is skipped on CPU machines), at most 3 minutes; a rehearsal
# runs all of these modules' tests instead (on the CPU, in the image's library releases).
# GPU_TESTS=0 skips them: a second call on the same warm machine (another workload) has run them already.
SELECT=(-k cuda)
[ "$REHEARSE" = 1 ] && SELECT=()
if [ "${GPU_TESTS:-1}" != 0 ]; then
    timeout 180 python3 -m pytest -q -p no:cacheprovider --durations=12 --continue-on-collection-errors "${SELECT[@]}" "${TESTS[@]}" 2>&1 \
        | tee "$OUT/cuda-tests.txt" | tail -60
fi
# The benchmark, time-budgeted (it rewrites its JSON after every case, so a cut run still leaves results).
BENCH_ARGS=()
[ "$REHEARSE" = 1 ] && BENCH_ARGS+=(--quick --text-limit 64 --serving-backend auto)
[ -f "$INPUTS/sst2/dev.tsv" ] && BENCH_ARGS+=(--sst2-data "$INPUTS/sst2")
[ -f "$INPUTS/tokenizer/tokenizer.json" ] && BENCH_ARGS+=(--tokenizer "$INPUTS/tokenizer")
# The fine-tuned MiniLM and its SideNet, where make gpu-inputs found them (benchmarks/gpu_inputs.py).
[ -f "$INPUTS/minilm/config.json" ] && [ -f "$INPUTS/minilm-sidenet/sidenet_config.json" ] \
    && BENCH_ARGS+=(--sst2-mainnet "$INPUTS/minilm" --sst2-sidenet "$INPUTS/minilm-sidenet")
# GPU_BENCH_ARGS adds arguments (e.g. "--compile-modes reduce-overhead default" to keep max-autotune's
# minutes of compiling out of a one-shot run); the benchmark is killed a minute past its budget.
# GPU_MERGE=1: start from the committed results and keep the cases this run does not measure (--merge).
[ "${GPU_MERGE:-0}" = 1 ] && cp benchmarks/results/gpu.json "$OUT/gpu.json" && BENCH_ARGS+=(--merge)
BUDGET="${GPU_BUDGET_S:-270}"
read -r -a EXTRA <<<"${GPU_BENCH_ARGS:-}"
timeout $((${BUDGET%.*} + 60)) python3 benchmarks/gpu.py "${BENCH_ARGS[@]}" "${EXTRA[@]}" --budget-s "$BUDGET" --out "$OUT/gpu.json" 2>&1 \
    | tee "$OUT/gpu-benchmark.txt" | tail -40
