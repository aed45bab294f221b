"""The embedded default's base model: a small Qwen2-architecture model with Qwen's real 151936-row
vocabulary, pretrained once from random weights on the "general" half of the demo corpus and
cached, so that continued pretraining on the "domain" half starts from a model that already
knows some English and Python (from random weights CPT would mean nothing).

    path = ensure_base(base_dir(), tok, corpus, say=print)    # pretrains on the first call only

Pretraining runs over a compact vocabulary (data.vocab.subset: the ~17K token ids the demo's
data uses plus one row shared by the others, with a log-count logit offset, which is the same
softmax as the full vocabulary at an eighth of the head's cost), then the model is grown back to
151936 rows without changing its function. It is resumable: an interrupted pretraining (Ctrl-C,
kill) continues from its last checkpoint on the next call. Concurrent callers wait for the one
that pretrains (a file lock), then find the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from data import cache_root
from fileio.safe_load import read_json

BASE_SHAPE = dict(
    vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
)
# Full-parameter pretraining: `steps` over the compact vocabulary, then `full_vocab_steps` more
# on the full vocabulary after growing back.
PRETRAIN = dict(block_size=256, batch_size=8, grad_accum=1, steps=600, lr=3e-3, warmup_steps=30,
                full_vocab_steps=0, full_vocab_lr=5e-4, seed=0, save_every=50)
RECORD = "pretrain.json"


def base_dir() -> Path:
    """Where the pretrained base lives: keyed by its shape and recipe."""
    recipe = {k: v for k, v in PRETRAIN.items() if k != "save_every"}
    key = json.dumps([BASE_SHAPE, recipe, "pydocs-general-v3-compact-vocab"], sort_keys=True)
    return cache_root() / "models" / f"pydocs-base-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def is_demo_shape(model_dir: Path) -> bool:
    """True for the base and the models derived from it (same tiny shape)."""
    try:
        cfg = read_json(Path(model_dir) / "config.json", ValueError, dict)
    except (OSError, ValueError):
        return False
    return all(cfg.get(k) == BASE_SHAPE[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)   # blocks while another process pretrains
        yield


def ensure_base(path: Path, tok, corpus, say: Callable[[str], None] = print) -> Path:
    """The pretrained base at `path`, pretraining it first when it is not cached.

    Under torchrun rank 0 pretrains alone (the same model as on one process) while the other
    ranks wait, then they find it cached."""
    from train import distributed

    with distributed.main_process_first(), _exclusive(path.with_name(path.name + ".lock")):
        if (path / RECORD).is_file() and (path / "config.json").is_file():
            info = read_json(path / RECORD, ValueError, dict)
            say(f"base model: cached at {path} (pretrained once, {info['steps']} steps on the general corpus, "
                f"held-out loss {info['eval_loss']:.3f}, perplexity {math.exp(info['eval_loss']):.0f}; delete the "
                f"directory to pretrain again)")
            return path
        return _pretrain_base(path, tok, corpus, say)


def _pretrain_base(path: Path, tok, corpus, say: Callable[[str], None]) -> Path:
    from data import cpt_datasets, vocab
    from models.qwen import CHAT_STOP_IDS, IM_START_ID, Qwen, QwenConfig, save

    p = PRETRAIN
    tokens = p["steps"] * p["batch_size"] * p["block_size"]
    work = path.with_name(path.name + ".work")   # checkpoints of an unfinished pretraining
    resuming = (work / "compact" / "checkpoints").is_dir()
    say(f"base model: none cached yet -> pretraining a {BASE_SHAPE['num_hidden_layers']}-layer, hidden "
        f"{BASE_SHAPE['hidden_size']} Qwen2-architecture model from random weights on the general corpus "
        f"(done once, cached at {path}" + ("; continuing the interrupted pretraining)" if resuming else ")"))
    from cli.runtime import seed_everything

    t0 = time.perf_counter()
    seed_everything(p["seed"])
    full_cfg = QwenConfig(**BASE_SHAPE)
    # No barrier here: ensure_base already runs this on rank 0 alone, the other ranks waiting.
    train_ds, held_out, info = cpt_datasets([corpus.general], tok, block_size=p["block_size"], eval_fraction=0.02,
                                            seed=p["seed"])
    say(f"  data: {info}")
    # Every id the demo's data holds (general, domain and SFT) gets a compact row, so none of
    # them is an untrained row later; the specials of the chat template too.
    extra = [_token_items(corpus.domain, tok), _token_items(corpus.sft_train, tok)]
    ids = vocab.used_ids([train_ds, held_out] + extra, always=sorted(set(CHAT_STOP_IDS) | {IM_START_ID}))
    small = Qwen(replace(full_cfg, vocab_size=vocab.compact_rows(len(ids))))
    small.logit_offset = vocab.compact_logit_offset(len(ids), full_cfg.vocab_size, small.config.vocab_size)
    say(f"  phase 1: {p['steps']} steps of {p['batch_size']}x{p['block_size']} tokens ({tokens:,}, "
        f"~{tokens / max(1, len(train_ds) * p['block_size']):.1f} epochs) over a compact vocabulary: the "
        f"{len(ids):,} token ids the demo's data uses + one row the other {full_cfg.vocab_size - len(ids):,} share "
        f"(data.vocab.subset; the same softmax as the full vocabulary)")
    first = _pretrain(small, vocab.RemappedDataset(train_ds, ids), vocab.RemappedDataset(held_out, ids),
                      work / "compact", steps=p["steps"], lr=p["lr"], warmup=p["warmup_steps"], say=say)
    model = vocab.expand_vocabulary(small, ids, full_cfg)
    say(f"  phase 2: grown back to the full {full_cfg.vocab_size:,}-row vocabulary (every unused id gets the "
        f"shared row; the held-out loss must not move); {p['full_vocab_steps']} full-vocabulary steps")
    second = _pretrain(model, train_ds, held_out, work / "full", steps=p["full_vocab_steps"],
                       lr=p["full_vocab_lr"], warmup=0, say=say)
    model.config.torch_dtype = "float32"
    seconds = time.perf_counter() - t0
    record = {"steps": p["steps"] + p["full_vocab_steps"], "eval_loss": second["after"],
              "eval_loss_at_init": first["before"], "eval_loss_compact_vocab": first["after"],
              "eval_loss_after_growing_back": second["before"], "compact_vocab_ids": len(ids),
              "seconds": round(seconds, 1), "shape": BASE_SHAPE, "recipe": PRETRAIN, "corpus": str(corpus.general)}
    save(model, path, tokenizer=tok)
    (path / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    say(f"  pretrained in {seconds:.1f}s: held-out loss {first['before']:.3f} -> {second['after']:.3f} (perplexity "
        f"{math.exp(first['before']):.0f} -> {math.exp(second['after']):.0f}); saved to {path}")
    return path


def _token_items(path: Path, tok) -> list[dict]:
    """A .jsonl file's texts ("text", or the contents of "messages") as token items
    ({"input_ids"}), for counting the ids they use."""
    from data import InputReport
    from data.sources import iter_jsonl

    items = []
    for _, record in iter_jsonl(path, InputReport()):
        text = record.get("text") or "\n".join(str(m.get("content", "")) for m in record.get("messages", []))
        items.append({"input_ids": torch.tensor(tok.encode(text), dtype=torch.long)})
    return items


def _pretrain(model, train_ds, held_out, out: Path, *, steps: int, lr: float, warmup: int, say) -> dict:
    """Full-parameter fp32 training of the base, resumed from `out` when it holds a checkpoint;
    {"before", "after"} held-out losses."""
    from cli.console import loss_curve, read_metrics
    from data import pad_collate
    from train import TrainConfig, Trainer

    p = PRETRAIN
    resume = (out / "checkpoints").is_dir()
    cfg = TrainConfig(out_dir=str(out), lr=lr, warmup_steps=warmup, max_steps=max(1, steps), batch_size=p["batch_size"],
                      grad_accum=p["grad_accum"], max_grad_norm=1.0, weight_decay=0.0, betas=(0.9, 0.95),
                      dtype="fp32", grad_checkpointing=False, save_every=p["save_every"], keep_last=1, seed=p["seed"],
                      mode="full", parallel="none", eval_every=None, resume=resume, save_final=False)
    trainer = Trainer(model, cfg, train_ds, eval_dataset=held_out, collate_fn=pad_collate, say=say)
    before = trainer.evaluate()["loss"]
    if steps == 0:
        say(f"    held-out loss {before:.3f} (perplexity {math.exp(before):.0f}); no steps")
        return {"before": before, "after": before}
    after = trainer.fit()["final_eval"]["val_loss"]
    rows = read_metrics(out / "metrics.jsonl")
    say("    loss:\n" + "\n".join("      " + line for line in loss_curve(rows, height=6).splitlines()))
    say(f"    held-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.0f} -> {math.exp(after):.0f})")
    return {"before": before, "after": after}
