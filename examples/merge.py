"""Merge a LoRA adapter into its base model and write an HF-format model directory.

    python examples/merge.py                       # runs/cpt/adapter + its base -> runs/cpt-merged
    python examples/merge.py --model /models/Qwen2.5-7B --adapter runs/cpt/adapter --out runs/merged

The adapter is folded in fp32 and cast once. After QLoRA the merge goes, by default, into the
original 16-bit weights (`--into original`); `--into nf4` merges into the dequantised NF4
weights the adapter was trained against. The script prints the logit drift between the
model as trained (base + adapter, unmerged) and the merged model on a few prompts.
The output carries the tokenizer files, so it is a complete model directory; `--gguf` also
writes a GGUF file for llama.cpp / Ollama (see examples/export.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cli import flags, inputs, options, outdir, runtime
from cli.console import Timer, list_outputs, log
from cli.errors import UsageError, run_main
from fileio.safe_load import read_json
from models.qwen import QwenConfig
from models.qwen.config import dtype_name_short
from models.qwen.tokenizer import load_tokenizer

DRIFT_PROMPTS = (
    "The json module",
    "def fetch(url):\n    \"\"\"Open the URL and return",
    "An event loop runs asynchronous tasks and callbacks,",
    "Hello world",
)


def build_parser() -> flags.Parser:
    return options.parser("merge", __doc__)


def resolve_base(args, adapter: Path, run: dict) -> Path:
    """--model, else the base the adapter's run recorded, else its adapter_config.json's."""
    if args.model:
        return inputs.check_model_dir(args.model)
    candidates = []
    if run.get("model"):
        candidates.append(("the run's run.json", run["model"]))
    cfg = read_json(adapter / "adapter_config.json", UsageError, dict)
    if cfg.get("base_model_name_or_path"):
        candidates.append(("adapter_config.json base_model_name_or_path", cfg["base_model_name_or_path"]))
    for source, path in candidates:
        if Path(path).is_dir():
            return inputs.check_model_dir(path, flag=f"--model (from {source})")
    if candidates:
        raise UsageError(f"--model: not given, and the adapter's base {candidates[-1][1]!r} is not a "
                         f"directory here; pass --model DIR")
    raise UsageError("--model: not given and the adapter does not record its base model; pass --model DIR")


def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv)
    timer = Timer()
    if "adapter" not in given and not Path(args.adapter).is_dir():
        raise UsageError(f"--adapter: not given and {args.adapter} does not exist; run examples/cpt.py first "
                         "(it writes the adapter there), or pass --adapter DIR")
    adapter = inputs.check_adapter_dir(args.adapter)
    run = outdir.run_settings(adapter.parent)
    base = resolve_base(args, adapter, run)
    qlora = args.qlora or bool(run.get("qlora"))
    out = Path(args.out)
    base_dtype = dtype_name_short(QwenConfig.from_hf(base).torch_dtype)
    out_dtype = args.dtype or base_dtype
    if args.gguf:
        try:
            from models.qwen import export   # the optional gguf package, checked before any work
        except ImportError as e:
            raise UsageError(f"--gguf: {e}") from None
    identity = {"model": str(base.resolve()), "adapter": str(adapter.resolve()), "into": args.into,
                "qlora": qlora, "dtype": out_dtype, "gguf": args.gguf}
    outdir.claim(out, command="merge", identity=identity, inputs=[base, adapter], overwrite=args.overwrite,
                 outputs=outdir.MODEL_OUTPUTS, one_shot=True)

    import lora

    tok, tok_source = load_tokenizer(adapter, base)
    log(f"== qwen-tune merge: {adapter} into {base} ==")
    log(f"tokenizer: {tok_source}")
    prompts = [torch.tensor(tok.encode(t), dtype=torch.long) for t in DRIFT_PROMPTS]

    # The model as trained: base (NF4 after QLoRA) + the unmerged adapter.
    compute = "fp32" if out_dtype == "fp32" or not torch.cuda.is_available() else out_dtype
    trained = runtime.load_model(base, compute, qlora=qlora)
    lora.load(trained, adapter)
    reference = logits_on(trained, prompts)
    del trained
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    into_nf4 = args.into == "nf4"
    if into_nf4 and not qlora:
        log("note: --into nf4 on an adapter trained without QLoRA: merging into NF4-rounded weights anyway")
    model = runtime.load_model(base, compute, qlora=into_nf4)
    lora.load(model, adapter)
    lora.merge(model)
    merged = logits_on(model, prompts)
    fold = drift(reference, merged)

    from models.qwen import save

    save(model, out, tokenizer=tok, dtype=out_dtype, max_shard_size=args.max_shard_size)
    del model  # one model in memory at a time (a 7B model is 15 GB in bf16)
    # What a user will load: the written files, in the written dtype.
    saved = runtime.load_model(out, out_dtype if torch.cuda.is_available() else "fp32")
    written = drift(reference, logits_on(saved, prompts))
    del saved

    target = "dequantised NF4 weights" if into_nf4 else f"original {base_dtype} weights"
    log(f"merged into the {target}{' (adapter trained with QLoRA)' if qlora else ''}; fold in fp32, written as {out_dtype}")
    log(f"adapter-vs-merged logit drift on {len(prompts)} prompts ({sum(len(x) for x in prompts)} positions):")
    log(f"  in memory (before the cast): max |diff| {fold['max_abs']:.3g}, relative {fold['max_rel']:.3g}, "
        f"argmax agreement {100 * fold['argmax_agree']:.1f}%")
    log(f"  written files ({out_dtype}):   max |diff| {written['max_abs']:.3g}, relative {written['max_rel']:.3g}, "
        f"argmax agreement {100 * written['argmax_agree']:.1f}%")
    if qlora and not into_nf4:
        log("  (after QLoRA the difference includes the NF4 rounding the adapter was trained against)")
    if args.gguf:
        gguf = export.export_gguf(out, out / f"model-{args.gguf}.gguf", file_type=args.gguf).path
        export.write_modelfile(gguf, out)   # TEMPLATE for its chat template, owner: this folder
        log(f"GGUF ({args.gguf}): {gguf}, with an Ollama Modelfile beside it (ollama create NAME -f {out / 'Modelfile'})")
    log(f"\noutputs ({timer}):")
    log(list_outputs(out))
    nxt = "" if "out" not in given else f" --model {out}"
    log(f"\nnext: python examples/sft.py{nxt}   (instruction SFT on the merged model)")
    return 0


@torch.no_grad()
def logits_on(model, prompts) -> list[torch.Tensor]:
    model.eval()
    return [model(ids[None].to(model.device)).float().cpu()[0] for ids in prompts]


def drift(reference, other) -> dict:
    """max |a-b|, max |a-b| / max |a|, and argmax agreement over a list of [T, V] logits."""
    abs_err = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    scale = max(float(a.abs().max()) for a in reference)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    total = sum(a.shape[0] for a in reference)
    return {"max_abs": abs_err, "max_rel": abs_err / max(scale, 1e-30), "argmax_agree": agree / max(total, 1)}


if __name__ == "__main__":
    run_main(main)
