"""Extend the Qwen vocabulary with domain tokens: mine them (or take a list), report, add them.

    python examples/extend_vocab.py                                  # mine the embedded corpus, report
    python examples/extend_vocab.py --model /models/Qwen2.5-7B --data corpus/ --out runs/qwen-ext
    python examples/extend_vocab.py --model DIR --tokens terms.txt    # one token per line

Mining trains a sentencepiece model (--sp-model-type unigram|bpe) on the corpus and keeps the
candidates that save the most Qwen tokens per occurrence and occur at least --min-frequency
times, each measured by re-tokenising the corpus (data.vocab.mine_tokens). The report lists
token, frequency, the Qwen pieces before and the saving; the totals are what the extended
tokenizer gives on the corpus.

--out receives report.txt, report.json, the extended tokenizer files (tokenizer.json,
tokenizer_config.json added_tokens, qwen.tiktoken, ...) and, with --model, the model with
rows for the new tokens: the untrained padding rows first (the matrices grow to a multiple
of 128 only when those run out), each initialised to the mean of its old pieces. Train the
rows with data.vocab.train_new_rows (old rows stay bit-identical) or lora modules_to_save.
"""

from __future__ import annotations

import json
from pathlib import Path

from cli import flags, inputs, options, outdir, runtime
from cli.console import Timer, list_outputs, log
from cli.errors import UsageError, run_main
from fileio.atomic import atomic_directory
from models.qwen.tokenizer import load_tokenizer



def build_parser() -> flags.Parser:
    return options.parser("extend_vocab", __doc__)


def read_token_file(path: str) -> list[str]:
    """Tokens, one per line, verbatim (only the line break removed); blank lines skipped."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--tokens {path}: file not found")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--tokens {path}: not UTF-8 text (byte {e.start})") from None
    tokens = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.rstrip("\r")]
    if not tokens:
        raise UsageError(f"--tokens {path}: holds no tokens")
    return tokens


def check_tokens(numbered: list[tuple[int, str]], tok, where: str) -> list[str]:
    """Every token must be addable: the first bad one is named with its line (or position)."""
    from models.qwen.tokenizer import TokenizerError

    seen: dict[str, int] = {}
    for n, token in numbered:
        token = token.rstrip("\r")
        try:
            tok.check_new_token(token)
        except TokenizerError as e:
            raise UsageError(f"{where}:{n}: {e}") from None
        if token in seen:
            raise UsageError(f"{where}:{n}: token {token!r} is listed twice (first at {seen[token]})")
        seen[token] = n
    return list(seen)


def read_corpus(args) -> tuple[list[str], str]:
    from data.errors import InputReport
    from data.sources import find_files, iter_documents

    if not args.data:
        from demo.corpus import domain_documents

        return domain_documents(args.max_chars), "the embedded Python-documentation domain corpus"
    docs: list[str] = []
    chars = 0
    report = InputReport()
    for file in find_files(args.data):
        for _where, text in iter_documents(file, report, text_field=args.text_field):
            docs.append(text)
            chars += len(text)
            if args.max_chars and chars >= args.max_chars:
                return docs, " ".join(args.data)
    if not docs:
        raise UsageError(f"--data {' '.join(args.data)}: no documents with text")
    return docs, " ".join(args.data)


def main(argv=None) -> int:
    args = flags.parse(build_parser(), argv).args
    timer = Timer()
    model_dir = inputs.check_model_dir(args.model) if args.model else None
    data = inputs.check_data_paths(args.data) if args.data else []
    out = Path(args.out)
    identity = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "overwrite", "config")}
    outdir.claim(out, command="extend_vocab", identity=json.loads(json.dumps(identity, default=str)),
                 inputs=[model_dir, *data], overwrite=args.overwrite, outputs=outdir.MODEL_OUTPUTS, one_shot=True)

    from data import vocab

    tok, tok_source = load_tokenizer(model_dir)
    if model_dir is not None:
        runtime.check_vocab(model_dir, tok)
    log("== qwen-tune extend_vocab ==")
    log(f"tokenizer: {tok_source} ({len(tok)} tokens)")
    if args.tokens:
        given = check_tokens(read_token_file(args.tokens), tok, f"--tokens {args.tokens}")
    elif args.token:
        given = check_tokens(list(enumerate(args.token, 1)), tok, "--token")
    else:
        given = None
    docs, corpus_source = read_corpus(args)
    log(f"corpus: {corpus_source}: {len(docs)} documents, {sum(map(len, docs)):,} characters")

    if given is None:
        log(f"mining: sentencepiece {args.sp_model_type} ({args.sp_vocab_size} pieces), up to {args.max_tokens} "
              f"tokens occurring >= {args.min_frequency} times, ranked by {args.rank.replace('_', ' ')}")
        report = vocab.mine_tokens(docs, tok, max_tokens=args.max_tokens, min_frequency=args.min_frequency,
                                   model_type=args.sp_model_type, sp_vocab_size=args.sp_vocab_size, rank=args.rank)
        if not report.rows:
            raise UsageError(f"--min-frequency {args.min_frequency}: no candidate saves enough tokens on this "
                             "corpus; lower it or give --tokens")
    else:
        report = vocab.measure_tokens(docs, tok, given)
    log("\n" + report.table() + "\n")

    new_tok = report.tokenizer
    if model_dir is not None:
        from models.qwen import load, save

        model = load(model_dir)  # in its stored dtype: rows are copied, never recomputed
        log(f"model: {vocab.extend_model(model, tok, new_tok)}")
        save(model, out, tokenizer=new_tok)
    else:
        with atomic_directory(out, fsync=False) as tmp:
            new_tok.save_pretrained(tmp)
        log(f"model: none given (--model DIR gives the {len(report.rows)} tokens rows in a checkpoint)")
    for name, text in (("report.txt", report.table()),
                       ("report.json", json.dumps(report.to_dict(), indent=2, ensure_ascii=False))):
        (out / f".{name}.tmp").write_text(text + "\n", encoding="utf-8")
        (out / f".{name}.tmp").replace(out / name)

    log(f"\noutputs ({timer}):")
    log(list_outputs(out))
    if model_dir is not None:
        log(f"\nnext: train with the new rows (data.vocab.train_new_rows after lora.inject), starting from {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
