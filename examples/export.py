"""Export a merged model to one GGUF file for llama.cpp and Ollama (no llama.cpp checkout needed).

    python examples/export.py                              # the latest stage's merged model -> runs/gguf/model-f16.gguf
    python examples/export.py --model runs/sft/merged --gguf out/chat.gguf --type q8_0

--model is an HF-format model directory (what dpo.py and sft.py write to runs/dpo/merged and
runs/sft/merged, or merge.py to its --out; with no --model, the latest of those that exists): config.json, safetensors and the tokenizer files. --type sets the matrices' type:
f16 (llama.cpp's default), bf16, or q8_0 (8-bit, about half the size); norms and biases stay
f32. The file carries the tokenizer, its chat template and eos, so llama.cpp and Ollama chat
with it as it is. A Modelfile for `ollama create` is written next to it (Ollama's TEMPLATE for
the chat template, SYSTEM, stop strings); exporting the same model again into the folder
(another file or --type) updates it, another model's Modelfile needs --overwrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cli import flags, inputs, options, paths
from cli.console import Timer, log
from cli.errors import UsageError, run_main



def build_parser() -> flags.Parser:
    return options.parser("export", __doc__)


def check_model(path: Optional[str]) -> Path:
    """--model, or the latest stage's merged model (named on stdout) when not given."""
    if path is not None:
        return inputs.check_model_dir(path)
    latest = paths.latest_tuned(merged_only=True)
    if latest is None:
        raise UsageError(f"--model: not given, and neither {' nor '.join(map(str, options.EXPORT_MODELS))} exists; run "
                         f"examples/sft.py first (it writes the merged model there) or pass --model DIR")
    stage, model, _ = latest
    log(f"no --model: the latest stage's merged model, {stage} ({model})")
    return inputs.check_model_dir(str(model), flag=f"--model (default {model})")


def check_out(out: Path, modelfile: Path, model: Path, overwrite: bool, export) -> None:
    """--gguf must be a new .gguf file (or --overwrite); the Modelfile beside it is ours to write:
    absent, or written by an export of the same model folder."""
    if out.suffix != ".gguf":
        raise UsageError(f"--gguf {out}: expected a file name ending in .gguf")
    if out.is_dir():
        raise UsageError(f"--gguf {out}: is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise UsageError(f"--gguf {out}: already exists; choose another file or pass --overwrite")
    if modelfile.is_dir():
        raise UsageError(f"--gguf {out}: {modelfile} beside it is a directory; choose another folder")
    if not modelfile.exists() or overwrite:
        return
    owner = export.modelfile_owner(modelfile)
    legacy = modelfile.read_text(encoding="utf-8", errors="replace") == export.modelfile_text(out)  # no owner line
    if owner != str(model.resolve()) and not legacy:
        whose = f"the export of {owner}" if owner else "a Modelfile qwen-tune did not write"
        raise UsageError(f"--gguf {out}: {modelfile} beside it belongs to another model ({whose}); choose "
                         f"another folder or pass --overwrite")


def main(argv=None) -> int:
    args = flags.parse(build_parser(), argv).args
    timer = Timer()
    model = check_model(args.model)
    out = Path(args.gguf) if args.gguf else options.EXPORT_DIR / f"model-{args.type}.gguf"
    try:
        from models.qwen import export
    except ImportError as e:
        raise UsageError(str(e)) from None
    modelfile = export.modelfile_path(out)
    check_out(out, modelfile, model, args.overwrite, export)

    log(f"== qwen-tune export: {model} -> {out} ({args.type}) ==")
    try:
        summary = export.export_gguf(model, out, file_type=args.type, name=args.name)
    except export.ExportError as e:
        raise UsageError(f"--model {model}: {e}") from None
    export.write_modelfile(out, model)

    types = ", ".join(f"{n} {t}" for t, n in sorted(summary.tensor_types.items()))
    log(f"wrote {out}: {summary.architecture}, {summary.n_params / 1e6:.1f}M parameters, "
          f"{summary.n_bytes / 2**20:.1f} MiB, {summary.n_tensors} tensors ({types}); "
          f"eos {summary.eos_token} ({timer})")
    chat = "TEMPLATE (ChatML), " if "\nTEMPLATE " in modelfile.read_text(encoding="utf-8") else \
        "no TEMPLATE (the chat template is not ChatML), "
    log(f"wrote {modelfile}: FROM ./{out.name}, {chat}stop at {' and '.join(export.modelfile.STOP_TOKENS)}")
    ollama_name = "".join(c if c.isalnum() or c in "-_." else "-" for c in (args.name or out.stem).lower())
    log("\nnext:")
    log(f"  ollama create {ollama_name} -f {modelfile}   # then: ollama run {ollama_name}")
    log(f"  llama-cli -m {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
