"""Export a merged model to one GGUF file for llama.cpp and Ollama (no llama.cpp checkout needed).

    python examples/export.py                              # runs/sft/merged -> runs/gguf/model-f16.gguf
    python examples/export.py --model runs/sft/merged --gguf out/chat.gguf --type q8_0

--model is an HF-format model directory (what sft.py writes to runs/sft/merged, or merge.py to
its --out): config.json, safetensors and the tokenizer files. --type sets the matrices' type:
f16 (llama.cpp's default), bf16, or q8_0 (8-bit, about half the size); norms and biases stay
f32. The file carries the tokenizer, its chat template and eos, so llama.cpp and Ollama chat
with it as it is. A Modelfile for `ollama create` is written next to it.
"""

from __future__ import annotations

from pathlib import Path

from cli import flags, inputs, paths
from cli.console import Timer, log
from cli.errors import UsageError, run_main

DEFAULT_MODEL = paths.SFT_OUT / "merged"
DEFAULT_GGUF_DIR = paths.RUNS / "gguf"
TYPES = ("f16", "bf16", "q8_0")


def build_parser() -> flags.Parser:
    p = flags.new_parser("export.py", __doc__)
    p.add_argument("--model", metavar="DIR", default=str(DEFAULT_MODEL), help="HF-format model directory")
    p.add_argument("--gguf", metavar="OUT.gguf", help=f"output file ({DEFAULT_GGUF_DIR}/model-TYPE.gguf when not given)")
    p.add_argument("--type", choices=TYPES, default="f16", help="type of the weight matrices in the file")
    p.add_argument("--name", help="model name stored in the file and suggested to `ollama create` "
                                  "(when not given: the model directory's name, and the file's for Ollama)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file and its Modelfile")
    flags.add_config_flag(p)
    return p


def check_model(path: str) -> Path:
    if path == str(DEFAULT_MODEL) and not Path(path).exists():
        raise UsageError(f"--model: not given, and {DEFAULT_MODEL} does not exist; run examples/sft.py first "
                         f"(it writes the merged model there) or pass --model DIR")
    return inputs.check_model_dir(path)


def check_out(out: Path, modelfile: Path, modelfile_text: str, overwrite: bool) -> None:
    """--gguf must be a new .gguf file (or --overwrite); the Modelfile beside it is ours to write."""
    if out.suffix != ".gguf":
        raise UsageError(f"--gguf {out}: expected a file name ending in .gguf")
    if out.is_dir():
        raise UsageError(f"--gguf {out}: is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise UsageError(f"--gguf {out}: already exists; choose another file or pass --overwrite")
    if modelfile.is_dir():
        raise UsageError(f"--gguf {out}: {modelfile} beside it is a directory; choose another folder")
    ours = modelfile.exists() and modelfile.read_text(encoding="utf-8", errors="replace") == modelfile_text
    if modelfile.exists() and not ours and not overwrite:
        raise UsageError(f"--gguf {out}: {modelfile} beside it belongs to another model; choose another "
                         f"folder or pass --overwrite")


def main(argv=None) -> int:
    args = flags.parse_args(build_parser(), argv)
    timer = Timer()
    model = check_model(args.model)
    out = Path(args.gguf) if args.gguf else DEFAULT_GGUF_DIR / f"model-{args.type}.gguf"
    try:
        from models.qwen import export
    except ImportError as e:
        raise UsageError(str(e)) from None
    modelfile = export.modelfile_path(out)
    check_out(out, modelfile, export.modelfile_text(out), args.overwrite)

    log(f"== qwen-tune export: {model} -> {out} ({args.type}) ==")
    try:
        summary = export.export_gguf(model, out, file_type=args.type, name=args.name)
    except export.ExportError as e:
        raise UsageError(f"--model {model}: {e}") from None
    export.write_modelfile(out)

    types = ", ".join(f"{n} {t}" for t, n in sorted(summary.tensor_types.items()))
    log(f"wrote {out}: {summary.architecture}, {summary.n_params / 1e6:.1f}M parameters, "
          f"{summary.n_bytes / 2**20:.1f} MiB, {summary.n_tensors} tensors ({types}); "
          f"eos {summary.eos_token} ({timer})")
    log(f"wrote {modelfile}: FROM ./{out.name}, stop at {' and '.join(export.modelfile.STOP_TOKENS)}")
    ollama_name = "".join(c if c.isalnum() or c in "-_." else "-" for c in (args.name or out.stem).lower())
    log("\nnext:")
    log(f"  ollama create {ollama_name} -f {modelfile}   # then: ollama run {ollama_name}")
    log(f"  llama-cli -m {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
