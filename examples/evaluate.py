"""Evaluate and compare models/adapters: held-out perplexity, answers, forgetting.

    python examples/evaluate.py          # every stage of the embedded-default run found in runs/
    python examples/evaluate.py --model base=/models/Qwen2.5-7B --adapter cpt=runs/cpt/adapter \\
        --model merged=runs/cpt-merged --model sft=runs/sft/merged \\
        --domain-data held_out/domain.jsonl --general-data held_out/general.jsonl \\
        --instructions held_out/eval.jsonl --out runs/eval

Each --model / --adapter adds one row, in the order given; the first row is the reference of
the forgetting check (general-text perplexity rising by more than --forgetting-threshold
over it is flagged). An adapter is loaded onto the base named in its adapter_config.json, or
onto the one given after '@' (--adapter cpt=runs/cpt/adapter@/models/Qwen2.5-7B).

Per row: perplexity of the domain and general text (token-weighted, sliding window of
--max-length tokens with --stride), greedy answers to the instructions (ROUGE-L, exact
match, token F1, average length, share ending with <|im_end|>). Writes report.md,
report.json and loss_curves.png (from the runs' metrics.jsonl, when matplotlib is installed)
into --out.

With no --model/--adapter it evaluates the embedded-default pipeline (cpt.py, merge.py,
sft.py, dpo.py, residual.py with no flags): the cached demo base, base + runs/cpt/adapter,
runs/cpt-merged, runs/sft/merged, runs/dpo/merged, runs/residual; held-out Python documentation for the
domain and general text and the held-out Q/A set for the instructions. Stages not run yet
are listed as missing, with the command that makes them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from cli import flags, inputs, options, outdir, paths, runtime
from cli.console import Timer, log
from cli.errors import UsageError, run_main
from fileio.safe_load import read_json

DEFAULT_RESIDUAL_OUT = paths.RUNS / "residual"


def build_parser() -> flags.Parser:
    return options.parser("evaluate", __doc__)


# ---------------------------------------------------------------------- rows from flags
def _split_name(value: str, flag: str) -> tuple[Optional[str], str]:
    name, sep, rest = value.partition("=")
    if sep and name and "/" not in name:
        return name, rest
    return None, value


def _unique(name: str, taken: set) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    taken.add(out)
    return out


def candidates_from_flags(entries, metrics_flags, qlora: bool = False) -> list:
    from train.evaluation import Candidate

    taken: set = set()
    out = []
    for kind, value in entries:
        flag = f"--{kind}"
        name, spec = _split_name(value, flag)
        if kind == "model":
            model = inputs.check_model_dir(spec, flag=flag)
            out.append(Candidate(_unique(name or model.name, taken), model, metrics=_found_metrics(model)))
            continue
        adapter_path, _, base = spec.partition("@")
        adapter = inputs.check_adapter_dir(adapter_path, flag=flag)
        if not base:
            base = _adapter_base(adapter, flag)
        model = inputs.check_model_dir(base, flag=f"{flag} {value} (base model)")
        default_name = adapter.parent.name if adapter.name == "adapter" else adapter.name
        out.append(Candidate(_unique(name or default_name, taken), model, adapter, metrics=_found_metrics(adapter),
                             qlora=qlora))
    by_name = {c.name: c for c in out}
    for item in metrics_flags:
        name, sep, file = item.partition("=")
        if not sep or name not in by_name:
            raise UsageError(f"--metrics {item}: expected NAME=FILE with NAME one of {', '.join(by_name)}")
        if not Path(file).is_file():
            raise UsageError(f"--metrics {item}: {file} not found")
        by_name[name].metrics = [Path(file)]
    return out


def _adapter_base(adapter: Path, flag: str) -> str:
    cfg = read_json(adapter / "adapter_config.json", UsageError, dict)
    base = cfg.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise UsageError(f"{flag} {adapter}: its base model {base!r} (adapter_config.json "
                         f"base_model_name_or_path) is not a local directory; give it as {flag} {adapter}@BASE_DIR")
    return base


def _found_metrics(path: Path) -> list:
    """metrics.jsonl of the run that wrote `path` (an adapter/ or merged/ dir inside the run)."""
    for d in (path, path.parent):
        if (d / "metrics.jsonl").is_file():
            return [d / "metrics.jsonl"]
    return []


# ---------------------------------------------------------------------- the embedded default
def default_stages() -> tuple[list, list]:
    """(candidates, missing) of the embedded-default run: what exists under runs/ now."""
    from train.evaluation import Candidate

    cpt, merged, residual = paths.CPT_OUT, paths.MERGED_OUT, DEFAULT_RESIDUAL_OUT
    is_model, is_adapter = paths.is_model, paths.is_adapter
    found, missing = [], []

    # The base is the one the stage-1 adapter records (cpt.py --model DIR with the default
    # --out), else the cached demo base of the embedded default.
    from demo.base_model import base_dir

    base = base_dir()
    if is_adapter(cpt / "adapter"):
        try:
            recorded = read_json(cpt / "adapter" / "adapter_config.json", UsageError, dict)
            recorded = recorded.get("base_model_name_or_path")
        except (OSError, UsageError):
            recorded = None
        if recorded and is_model(Path(recorded)):
            base = Path(recorded)

    stages = [
        ("base", base, None, "python examples/cpt.py (pretrains and caches the demo base)"),
        ("cpt", base, cpt / "adapter", "python examples/cpt.py"),
        ("cpt-merged", merged, None, "python examples/merge.py"),
        *((stage, out / "merged", None, f"python examples/{stage}.py")
          for stage, out, _ in reversed(paths.TUNED_STAGES)),
        ("residual", residual, None, "python examples/residual.py"),
    ]
    on_base = {stage: (out / "adapter", under) for stage, out, under in paths.TUNED_STAGES}
    for name, model, adapter, command in stages:
        if name in on_base and not is_model(model) and is_adapter(on_base[name][0]) and is_model(on_base[name][1]):
            adapter, model = on_base[name]  # sft.py / dpo.py --no-merge: the adapter on its base
        ok = is_model(model) and (adapter is None or is_adapter(adapter))
        where = adapter if adapter is not None else model
        if ok:
            run_dir = where.parent if where.name in ("adapter", "merged") else where
            metrics = [run_dir / "metrics.jsonl"] if (run_dir / "metrics.jsonl").is_file() else []
            qlora = adapter is not None and bool(_run_setting(run_dir, "qlora"))
            found.append(Candidate(name, model, adapter, metrics=metrics, qlora=qlora))
        else:
            missing.append({"name": name, "reason": f"{where} not found (made by `{command}`)"})
    return found, missing


def _run_setting(run_dir: Path, key: str, default=None):
    """A setting recorded in a run's run.json (what cpt.py/sft.py were run with), or default."""
    return outdir.run_settings(run_dir).get(key, default)


def default_data(args, given: frozenset[str], tok) -> dict:
    """Held-out text and questions of the embedded default: the documents cpt.py held out of
    the domain corpus (its --eval-fraction and --seed, read from runs/cpt/run.json), the ones
    the demo base's pretraining held out of the general corpus, and the held-out Q/A set."""
    from data import cpt_held_out_documents
    from demo import corpus as demo_corpus
    from demo.base_model import PRETRAIN

    corpus = demo_corpus.build()
    fraction, seed = args.eval_fraction, 0
    if "eval_fraction" not in given:
        try:
            fraction = float(_run_setting(paths.CPT_OUT, "eval_fraction", fraction))
            seed = int(_run_setting(paths.CPT_OUT, "seed", seed))
        except (TypeError, ValueError):
            pass  # a damaged run.json: the defaults cpt.py uses
    general_fraction = 0.02   # demo.base_model's held-out share of the general corpus
    general_seed = PRETRAIN["seed"]
    return {
        "domain": cpt_held_out_documents([corpus.domain], tok, eval_fraction=fraction, seed=seed),
        "general": cpt_held_out_documents([corpus.general], tok, eval_fraction=general_fraction, seed=general_seed),
        "instructions": corpus.sft_eval,
        "info": {
            "domain": f"{corpus.domain} (held out: --eval-fraction {fraction:g}, --seed {seed}, as cpt.py)",
            "general": f"{corpus.general} (held out of the demo base's pretraining: "
                       f"fraction {general_fraction:g}, seed {general_seed})",
            "instructions": f"{corpus.sft_eval} (held-out Q/A pairs)",
        },
    }


def user_documents(paths, flag: str, tok, text_field: str) -> list:
    """Every document of --domain-data / --general-data, read and tokenised as cpt.py reads
    its corpus (`data.load_corpus`: .txt one document per file, .jsonl(.gz) one per line)."""
    from data import load_corpus

    inputs.check_data_paths(paths, flag)
    corpus = load_corpus([str(p) for p in paths], tok, text_field=text_field, progress=sys.stderr.isatty())
    return [corpus.doc(i) for i in range(len(corpus))]


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    args, given = flags.parse(build_parser(), argv)
    timer = Timer()
    from models.qwen.tokenizer import TokenizerError
    from train.evaluation import EvalSettings, compare_models, read_instructions
    from train.report import ReportError

    entries = getattr(args, "entries", None) or []
    embedded = not entries
    missing: list = []
    if embedded:
        candidates, missing = default_stages()
        if not candidates:
            raise UsageError("no stage of the embedded-default run found (looked for "
                             + "; ".join(m["reason"] for m in missing) + "); run python examples/cpt.py first")
        options.apply_embedded(args, given, "evaluate")
    else:
        candidates = candidates_from_flags(entries, args.metrics, args.qlora)
        if not (args.domain_data or args.general_data or args.instructions):
            raise UsageError("nothing to evaluate: give --domain-data, --general-data and/or --instructions")

    try:
        # Texts are tokenised once, with the first row's tokenizer (Qwen checkpoints share the
        # vocabulary; the SFT outputs change only the eos setting).
        from models.qwen.tokenizer import load_tokenizer

        tok, _ = load_tokenizer(candidates[0].adapter_dir, candidates[0].model_dir)
        if embedded and not (args.domain_data or args.general_data or args.instructions):
            held = default_data(args, given, tok)
            domain, general = held["domain"], held["general"]
            instructions = read_instructions(held["instructions"], limit=args.max_instructions)
            data_info = held["info"]
        else:
            domain = user_documents(args.domain_data, "--domain-data", tok, args.text_field) \
                if args.domain_data else None
            general = user_documents(args.general_data, "--general-data", tok, args.text_field) \
                if args.general_data else None
            instructions = None
            if args.instructions:
                inputs.check_data_paths([args.instructions], "--instructions")
                instructions = read_instructions(args.instructions, limit=args.max_instructions)
            data_info = {k: " ".join(map(str, v)) if isinstance(v, list) else v
                         for k, v in (("domain", args.domain_data), ("general", args.general_data),
                                      ("instructions", args.instructions)) if v}
        if general is None:
            log("note: no --general-data, so no forgetting check")

        from models.qwen import QwenConfig

        max_pos = QwenConfig.from_hf(candidates[0].model_dir).max_position_embeddings
        max_length = args.max_length or min(2048, max_pos)
        if max_length < 2:
            raise UsageError(f"--max-length must be >= 2, got {max_length}")
        stride = args.stride or max(1, max_length // 2)
        if stride >= max_length:
            raise UsageError(f"--stride {stride} must be smaller than --max-length {max_length}")
        settings = EvalSettings(max_length=max_length, stride=stride, batch_size=args.batch_size,
                                max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens,
                                gen_batch_size=args.gen_batch_size, dtype=runtime.compute_dtype(args.dtype),
                                device=runtime.device(), chat_template_kwargs=args.chat_template_kwargs or {})
        out = Path(args.out)
        used = [p for c in candidates for p in (c.model_dir, c.adapter_dir) if p is not None]
        outdir.claim(out, command="evaluate", identity={"rows": [str(p) for p in used]}, inputs=used,
                     outputs=outdir.MODEL_OUTPUTS, one_shot=True)

        log("== qwen-tune evaluation ==")
        if embedded:
            log("embedded default: the stages of the default pipeline found under runs/ "
                  f"(settings: {', '.join(f'--{k.replace(chr(95), chr(45))} {getattr(args, k)}' for k in options.EVALUATE.embedded)})")
        log(f"rows: {', '.join(c.name for c in candidates)} (reference: {candidates[0].name})")
        for m in missing:
            log(f"missing stage {m['name']}: {m['reason']}")
        log(f"data: {len(domain or [])} domain documents, {len(general or [])} general documents, "
              f"{len(instructions or [])} instructions; window {max_length}, stride {stride}, "
              f"dtype {settings.dtype}")
        report = compare_models(candidates, domain=domain, general=general, instructions=instructions,
                                settings=settings, threshold=args.forgetting_threshold, out_dir=out,
                                missing=missing, data_info=data_info, log=log)
    except (ReportError, TokenizerError) as e:
        raise UsageError(str(e)) from None

    from train.report import render_markdown

    log("")
    md = render_markdown(report)
    log(md.split("\n\n## ")[0])  # the table and the forgetting note
    log(f"\nreport ({timer}): {out / 'report.md'}, {out / 'report.json'}"
          + (f", {report['plot']}" if report.get("plot") else
             ("" if not report.get("loss_curves") else " (no loss plot: matplotlib is not installed)")))
    return 0


if __name__ == "__main__":
    run_main(main)
