"""Throughput of CPT data preparation: tokenising + caching + packing a text corpus.

    python benchmarks/tokenize_throughput.py [--size-mb 50] [--threads 1 2] [--block-size 2048]

The corpus is real text and code: the Python standard library's own sources (``.py`` files,
read from this installation), written as a .jsonl of documents until it reaches --size-mb
(cycling through the files when the installation holds less). For each thread count it
measures, on a cold cache: tiktoken alone (the floor: ``encode_ordinary_batch`` on the same
documents), then ``data.load_corpus`` (read + NFC check + tokenise + write the uint32 cache)
and ``data.pack_documents`` + reading every block; then the warm-cache reload.
Prints one line per measurement and a JSON summary (--json FILE to keep it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from models.qwen.tokenizer import Tokenizer  # noqa: E402


def build_corpus(path: Path, size_mb: float) -> tuple:
    """Write stdlib sources as {"text": ...} lines until size_mb of UTF-8 text; -> (docs, bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    target = int(size_mb * 1e6)
    docs, written = [], 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for p in files:
                try:
                    text = p.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                docs.append(unicodedata.normalize("NFC", text))  # as the Tokenizer sees it
                written += len(text.encode("utf-8"))
                if written >= target:
                    break
    return docs, written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=50.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--block-size", type=int, default=2048)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    tok = Tokenizer.default()
    tok.fingerprint()  # computed once per process (cache key); not part of the per-corpus cost
    work = Path(tempfile.mkdtemp(prefix="tokbench-"))
    try:
        corpus_file = work / "corpus.jsonl"
        docs, n_bytes = build_corpus(corpus_file, args.size_mb)
        mb = n_bytes / 1e6
        print(f"corpus: {len(docs)} documents, {mb:.1f} MB of UTF-8 text ({corpus_file.stat().st_size / 1e6:.1f} MB jsonl)")
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "python": platform.python_version(), "corpus_mb": round(mb, 1), "documents": len(docs), "runs": []}
        for threads in args.threads:
            t0, c0 = time.perf_counter(), os.times()
            n_tok = sum(len(x) for x in tok.bpe.encode_ordinary_batch(docs, num_threads=threads))
            t_tiktoken, c1 = time.perf_counter() - t0, os.times()
            cpu_tiktoken = c1.user - c0.user + c1.system - c0.system

            cache = work / f"cache-{threads}"
            t0, c0 = time.perf_counter(), os.times()
            corpus = data.load_corpus(corpus_file, tok, cache_dir=cache, num_threads=threads, progress=False)
            t_load, c1 = time.perf_counter() - t0, os.times()
            cpu_load = c1.user - c0.user + c1.system - c0.system
            busy = cpu_load / t_load  # 2.0 = both cores busy
            t0 = time.perf_counter()
            blocks = data.pack_documents(corpus, args.block_size)
            n_blocks = len(blocks)
            for b in range(n_blocks):
                blocks[b]
            t_pack = time.perf_counter() - t0
            t0 = time.perf_counter()
            data.load_corpus(corpus_file, tok, cache_dir=cache, num_threads=threads, progress=False)
            t_warm = time.perf_counter() - t0
            run = {
                "threads": threads, "tokens": corpus.n_tokens, "blocks": n_blocks,
                "tiktoken_only_s": round(t_tiktoken, 2), "tiktoken_only_MB_s": round(mb / t_tiktoken, 2),
                "load_corpus_s": round(t_load, 2), "load_corpus_MB_s": round(mb / t_load, 2),
                "load_corpus_tokens_s": int(corpus.n_tokens / t_load),
                "pack_all_blocks_s": round(t_pack, 2), "warm_cache_reload_s": round(t_warm, 3),
                "tokenizer_share_of_load": round(t_tiktoken / t_load, 2),
                "load_corpus_cores_busy": round(busy, 2),
                # CPU-time-normalised rates: what one free core does, whatever else the machine runs
                "tiktoken_only_MB_per_cpu_s": round(mb / cpu_tiktoken, 2), "load_corpus_MB_per_cpu_s": round(mb / cpu_load, 2), "load_average_after": round(os.getloadavg()[0], 1),
            }
            assert n_tok + len(docs) == corpus.n_tokens, "cache holds a different token count than tiktoken"
            results["runs"].append(run)
            print(f"threads={threads}: tiktoken alone {run['tiktoken_only_MB_s']} MB/s; load_corpus {run['load_corpus_MB_s']} MB/s "
                  f"({run['load_corpus_tokens_s']:,} tokens/s, {t_load:.1f} s, {busy:.2f} cores busy; per CPU-second: "
                  f"tiktoken {run['tiktoken_only_MB_per_cpu_s']} MB, load_corpus {run['load_corpus_MB_per_cpu_s']} MB); packing {n_blocks} blocks of {args.block_size} "
                  f"{t_pack:.1f} s; warm reload {t_warm:.3f} s")
        print(json.dumps(results, indent=1))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
