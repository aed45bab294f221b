"""Command line of the weight-delta tools (lora.delta): `qwen-tune delta {residual,diff,apply,arith,extract,report}`,
also `python -m lora.delta ...`.

Bad input ends with one line on stderr naming the flag or file and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from fileio.safe_load import read_json
from lora.delta.io import DeltaError
from models.qwen import CheckpointError, ConfigError

from . import outdir
from .errors import EXIT_USAGE, UsageError, one_line
from .flags import Parser, finite_float as _finite, positive_int as _positive_int
from .options import RESIDUAL_OPTIONS, add_options


class OneLineParser(Parser):
    """argparse with one-line usage errors (exit code 2)."""

    def error(self, message: str):  # noqa: D401
        raise UsageError(f"{self.prog}: error: {message}")


def _model_dir(flag: str, value: Optional[str]) -> Path:
    if value is None:
        raise UsageError(f"{flag} is required")
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: not a directory")
    if not (path / "config.json").exists():
        raise UsageError(f"{flag} {value}: no config.json (not an HF-format Qwen checkpoint)")
    return path


def add_residual_args(p: argparse.ArgumentParser) -> None:
    """The residual's options (declared once in cli/options.py, shared with examples/residual.py)."""
    add_options(p, RESIDUAL_OPTIONS)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32", "bfloat16", "float16", "float32"), default=None,
                   help="output dtype (default: as the layout input, per tensor)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out these tools wrote earlier (never a folder they did not write)")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of the inputs in manifest.json")


def build_parser(prog: str = "qwen-tune delta") -> OneLineParser:
    p = OneLineParser(prog=prog, description="Weight-delta tools on HF-format Qwen checkpoints (streaming, low memory).")
    sub = p.add_subparsers(dest="command", parser_class=OneLineParser)

    r = sub.add_parser("residual", help="target + s * (chat - base), with the chat tokenizer and eos <|im_end|>")
    add_residual_args(r)

    d = sub.add_parser("diff", help="write the delta checkpoint A - B")
    d.add_argument("a", help="model directory A")
    d.add_argument("b", help="model directory B")
    d.add_argument("--out", required=True, help="delta output directory")
    d.add_argument("--delta-dtype", choices=("bf16", "fp16", "fp32"), default="fp32",
                   help="storage dtype of the delta (default fp32: exact for 16-bit inputs)")
    d.add_argument("--overwrite", action="store_true",
                   help="replace an --out these tools wrote earlier (never a folder they did not write)")
    d.add_argument("--no-hash", action="store_true", help="skip the sha256 of the inputs in manifest.json")

    a = sub.add_parser("apply", help="target + scale * delta")
    a.add_argument("target", help="model directory")
    a.add_argument("delta", help="delta directory written by `diff`")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--scale", type=_finite, default=1.0, help="delta scale (default 1.0)")
    a.add_argument("--skip-embeddings", action="store_true", help="leave embeddings and head as in the target")
    _common(a)

    t = sub.add_parser("arith", help="task arithmetic: [base +] sum_i w_i * delta_i (no normalisation)")
    t.add_argument("--delta", nargs=2, action="append", metavar=("DIR", "WEIGHT"), required=True,
                   help="a delta directory and its weight (repeatable; negative weights allowed)")
    t.add_argument("--base", help="model to add the weighted sum to (without it the output is a delta)")
    t.add_argument("--out", required=True, help="output directory")
    _common(t)

    e = sub.add_parser("extract", help="best rank-r LoRA of a delta (truncated SVD), PEFT format")
    e.add_argument("delta", help="delta directory (from `diff`), or the new model with --old")
    e.add_argument("--old", help="old model: extract from (DELTA - OLD) computed on the fly")
    e.add_argument("--rank", "-r", type=_positive_int, default=16, help="LoRA rank (default 16)")
    e.add_argument("--out", required=True, help="adapter output directory")
    e.add_argument("--targets", default="all-linear", help="all-linear or a comma list of q_proj,k_proj,...")
    e.add_argument("--method", choices=("svd", "randomized"), default="svd", help="exact SVD or randomized")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an --out these tools wrote earlier (never a folder they did not write)")

    q = sub.add_parser("report", help="per-layer relative change ||new - old|| / ||old||")
    q.add_argument("new", help="model (or delta) directory")
    q.add_argument("old", help="reference model directory")
    q.add_argument("--json", help="also write the full report (every tensor) to this JSON file")
    q.add_argument("--plot", help="also write a PNG plot here (needs matplotlib)")
    return p


def run_residual(args) -> int:
    from lora.delta.ops import instruction_residual

    base = _model_dir("--base", args.base)
    chat = _model_dir("--chat", args.chat)
    target = _model_dir("--target", args.target)
    if args.out is None:
        raise UsageError("--out is required")
    _claim(args, [base, chat, target])
    scales = {g: getattr(args, f"{g}_scale") for g in ("attention", "mlp", "embeddings", "norms")
              if getattr(args, f"{g}_scale") is not None}
    out = instruction_residual(
        base, chat, target, args.out, scale=args.scale, scales=scales, skip_embeddings=args.skip_embeddings,
        skip=args.skip, special_rows=args.special_rows, dtype=args.dtype, overwrite=True,
        hash_inputs=not args.no_hash,
    )
    manifest = read_json(out / "manifest.json", UsageError, dict)
    carried = [r for r in manifest["special_rows"]["rows"] if r["carried"]]
    print(f"wrote {out}: {manifest['tensors']} tensors = target + {args.scale} * (chat - base)"
          + (f", group scales {scales}" if scales else "")
          + f"; {len(manifest['skipped'])} tensors left as in the target; "
          f"{len(carried)} special-token rows taken from the chat model; eos <|im_end|>")
    for w in manifest.get("warnings", []):
        print(f"warning: {w}")
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "qwen-tune delta") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(f"{prog}: error: a command is required: residual, diff, apply, arith, extract or report")
        return _dispatch(args)
    except UsageError as e:
        msg = str(e)
        print(msg if msg.startswith(prog) else f"{prog}: error: {msg}", file=sys.stderr)
        outdir.release_untouched()
        return EXIT_USAGE
    except (DeltaError, CheckpointError, ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        outdir.release_untouched()
        return EXIT_USAGE


def _claim(args, inputs: list[Path]) -> None:
    """The shared --out rules (cli.outdir): never an input, locked while written, --overwrite
    only of a folder these tools wrote."""
    ident = {k: v for k, v in sorted(vars(args).items()) if k not in ("overwrite", "no_hash")}
    outdir.claim(Path(args.out), command=f"delta {args.command}", identity=json.loads(json.dumps(ident, default=str)),
                 inputs=inputs, overwrite=args.overwrite, outputs=outdir.MODEL_OUTPUTS, one_shot=True)


def _dispatch(args) -> int:
    from lora.delta.lowrank import extract_lora
    from lora.delta.ops import apply, diff, task_arithmetic
    from lora.delta.report import delta_report

    if args.command == "residual":
        return run_residual(args)
    if args.command == "diff":
        a, b = _model_dir("a", args.a), _model_dir("b", args.b)
        _claim(args, [a, b])
        out = diff(a, b, args.out, dtype=args.delta_dtype, overwrite=True, hash_inputs=not args.no_hash)
        print(f"wrote delta {out} = {args.a} - {args.b}")
    elif args.command == "apply":
        target, delta = _model_dir("target", args.target), _model_dir("delta", args.delta)
        _claim(args, [target, delta])
        out = apply(target, delta, args.out, args.scale, skip_embeddings=args.skip_embeddings, dtype=args.dtype,
                    overwrite=True, hash_inputs=not args.no_hash)
        print(f"wrote {out} = {args.target} + {args.scale} * {args.delta}")
    elif args.command == "arith":
        dirs, weights = [], []
        for d, w in args.delta:
            dirs.append(_model_dir("--delta", d))
            try:
                weights.append(_finite(w))
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"--delta {d} {w}: {e}") from None
        base = _model_dir("--base", args.base) if args.base else None
        _claim(args, dirs + ([base] if base else []))
        out = task_arithmetic(dirs, weights, args.out, base=base, dtype=args.dtype, overwrite=True,
                              hash_inputs=not args.no_hash)
        print(f"wrote {out} = {'base + ' if base else ''}" + " + ".join(f"{w} * {d}" for d, w in zip(dirs, weights)))
    elif args.command == "extract":
        targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
        delta = (_model_dir("delta", args.delta), _model_dir("--old", args.old)) if args.old else _model_dir("delta", args.delta)
        _claim(args, list(delta) if isinstance(delta, tuple) else [delta])
        res = extract_lora(delta, args.rank, args.out, targets=targets, method=args.method, overwrite=True)
        print(res.table())
        print(f"wrote PEFT adapter {res.path} (r={res.r}, lora_alpha={res.r})")
    elif args.command == "report":
        rep = delta_report(_model_dir("new", args.new), _model_dir("old", args.old))
        print(rep.table())
        if args.json:
            Path(args.json).write_text(rep.to_json() + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
        if args.plot:
            try:
                rep.plot(args.plot)
                print(f"wrote {args.plot}")
            except DeltaError as e:
                print(f"no plot: {e}")
    return 0
