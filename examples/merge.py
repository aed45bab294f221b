"""Merge a LoRA adapter into its base model and write an HF-format model directory.

    python examples/merge.py                       # runs/cpt/adapter + its base -> runs/cpt-merged
    python examples/merge.py --model /models/Qwen2.5-7B --adapter runs/cpt/adapter --out runs/merged

The adapter is folded in fp32 and cast once. After QLoRA the merge goes, by default, into the
original 16-bit weights (`--into original`); `--into nf4` merges into the dequantised NF4
weights the adapter was trained against. The script prints the logit drift between the
model as trained (base + adapter, unmerged) and the merged model on a few prompts.
The output carries the tokenizer files, so it is a complete model directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# The scripts run from a checkout: examples/ for the shared CLI helpers, the repository root
# for the packages (already importable after `pip install -e .`).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import _cli  # noqa: E402
import _pipeline as P  # noqa: E402
from _cli import UsageError  # noqa: E402

MERGE_FILE = "merge.json"
DRIFT_PROMPTS = (
    "The json module",
    "def fetch(url):\n    \"\"\"Open the URL and return",
    "An event loop runs asynchronous tasks and callbacks,",
    "Hello world",
)


def build_parser() -> _cli.Parser:
    p = _cli.new_parser("merge.py", __doc__)
    p.add_argument("--model", metavar="DIR",
                   help="base model directory (default: the base recorded by the adapter's run)")
    p.add_argument("--adapter", metavar="DIR", default=str(_cli.DEFAULT_CPT_OUT / "adapter"),
                   help="PEFT-format adapter directory")
    p.add_argument("--out", metavar="DIR", default=str(_cli.DEFAULT_MERGED_OUT), help="output model directory")
    p.add_argument("--into", choices=("original", "nf4"), default="original",
                   help="merge into the original 16-bit weights, or into the dequantised NF4 weights")
    p.add_argument("--qlora", action="store_true",
                   help="the adapter was trained on an NF4 base (default: read from the run's run.json)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the written weights (default: the base checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds another model")
    _cli.add_config_flag(p)
    return p


def _adapter_run(adapter: Path) -> dict:
    run = adapter.parent / _cli.RUN_FILE
    if run.is_file():
        try:
            return json.loads(run.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
    return {}


def resolve_base(args, adapter: Path, run: dict) -> Path:
    if args.model:
        return _cli.check_model_dir(args.model)
    candidates = []
    if run.get("model"):
        candidates.append(("the run's run.json", run["model"]))
    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("base_model_name_or_path"):
        candidates.append(("adapter_config.json base_model_name_or_path", cfg["base_model_name_or_path"]))
    for source, path in candidates:
        if Path(path).is_dir():
            return _cli.check_model_dir(path, flag=f"--model (from {source})")
    if candidates:
        raise UsageError(f"--model: not given, and the adapter's base {candidates[-1][1]!r} is not a "
                         f"directory here; pass --model DIR")
    raise UsageError("--model: not given and the adapter does not record its base model; pass --model DIR")


def check_out(out: Path, identity: dict, overwrite: bool) -> None:
    """--out may be missing, empty, or a model this script wrote from the same inputs."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not any(out.iterdir()) or overwrite:
        return
    marker = out / MERGE_FILE
    if not marker.is_file():
        raise UsageError(f"--out {out}: exists, is not empty and was not written by merge.py; "
                         f"choose another --out or pass --overwrite")
    try:
        previous = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        previous = {}
    if previous != identity:
        raise UsageError(f"--out {out}: holds a different merge (of {previous.get('adapter')!r} into "
                         f"{previous.get('model')!r}); choose another --out or pass --overwrite")


def main(argv=None) -> int:
    args = _cli.parse_args(build_parser(), argv)
    timer = P.Timer()
    adapter = _cli.check_adapter_dir(args.adapter)
    run = _adapter_run(adapter)
    base = resolve_base(args, adapter, run)
    qlora = args.qlora or bool(run.get("qlora"))
    out = Path(args.out)
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise UsageError(f"--out {out}: is the base model or the adapter itself; choose another directory")

    from models.qwen import QwenConfig

    base_dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(QwenConfig.from_hf(base).torch_dtype, "bf16")
    out_dtype = args.dtype or base_dtype
    identity = {"model": str(base.resolve()), "adapter": str(adapter.resolve()), "into": args.into,
                "qlora": qlora, "dtype": out_dtype}
    check_out(out, identity, args.overwrite)

    import lora

    tok, tok_source = P.load_tokenizer(adapter, base)
    P.log(f"== qwen-tune merge: {adapter} into {base} ==")
    P.log(f"tokenizer: {tok_source}")
    prompts = [torch.tensor(tok.encode(t), dtype=torch.long) for t in DRIFT_PROMPTS]

    # The model as trained: base (NF4 after QLoRA) + the unmerged adapter.
    compute = "fp32" if out_dtype == "fp32" or not torch.cuda.is_available() else out_dtype
    trained = P.load_model(base, compute, qlora=qlora)
    lora.load(trained, adapter)
    reference = P.logits_on(trained, prompts)
    del trained
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    into_nf4 = args.into == "nf4"
    if into_nf4 and not qlora:
        P.log("note: --into nf4 on an adapter trained without QLoRA: merging into NF4-rounded weights anyway")
    model = P.load_model(base, compute, qlora=into_nf4)
    lora.load(model, adapter)
    lora.merge(model)
    merged = P.logits_on(model, prompts)
    fold = P.drift(reference, merged)

    P.save_model(model, out, tok, dtype=out_dtype, max_shard_size=args.max_shard_size)
    (out / MERGE_FILE).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")

    del model  # one model in memory at a time (a 7B model is 15 GB in bf16)
    # What a user will load: the written files, in the written dtype.
    saved = P.load_model(out, out_dtype if torch.cuda.is_available() else "fp32")
    written = P.drift(reference, P.logits_on(saved, prompts))

    target = "dequantised NF4 weights" if into_nf4 else f"original {base_dtype} weights"
    P.log(f"merged into the {target}{' (adapter trained with QLoRA)' if qlora else ''}; fold in fp32, "
          f"written as {out_dtype}")
    P.log(f"adapter-vs-merged logit drift on {len(prompts)} prompts ({sum(len(x) for x in prompts)} positions):")
    P.log(f"  in memory (before the cast): max |diff| {fold['max_abs']:.3g}, relative {fold['max_rel']:.3g}, "
          f"argmax agreement {100 * fold['argmax_agree']:.1f}%")
    P.log(f"  written files ({out_dtype}):   max |diff| {written['max_abs']:.3g}, relative {written['max_rel']:.3g}, "
          f"argmax agreement {100 * written['argmax_agree']:.1f}%")
    if qlora and not into_nf4:
        P.log("  (after QLoRA the difference includes the NF4 rounding the adapter was trained against)")
    P.log(f"\noutputs ({timer}):")
    P.log(P.list_outputs(out))
    nxt = "" if args.out == str(_cli.DEFAULT_MERGED_OUT) else f" --model {out}"
    P.log(f"\nnext: python examples/sft.py{nxt}   (instruction SFT on the merged model)")
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
