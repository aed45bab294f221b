"""Held-out perplexity: token-weighted, sliding-window over documents longer than the context.

    result = perplexity(model, documents, max_length=1024, stride=512, batch_size=8)
    result.ppl == exp(result.nll_sum / result.n_tokens)

Every document is scored on its own (no attention across documents). A document longer than
`max_length` is cut into windows that start every `stride` tokens, as in Hugging Face's
"perplexity of fixed-length models": each window predicts only the tokens the previous
window did not reach, with the window's earlier tokens as context, so every token after
the first of a document is scored exactly once, with `max_length - stride` tokens or more of
left context once the first window is passed. The first token of a document has nothing to
be predicted from (Qwen has no BOS) and is not scored.

The perplexity is exp(total NLL / total scored tokens) over all documents: a long document
weighs by its tokens, not as one sample. Windows are independent, so they are batched in any
order (right-padded with label -100: causal attention keeps padding invisible to the real
tokens), and the result does not depend on the batch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from models.qwen import ENDOFTEXT_ID, IGNORE_INDEX


def perplexity_of(loss: float) -> float:
    """exp(mean negative log-likelihood); inf where that overflows a float."""
    return math.exp(loss) if loss < 709.0 else float("inf")


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [begin, end) of document `doc`; tokens [score_from, end) scored."""

    doc: int
    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin


@dataclass
class PerplexityResult:
    """What `perplexity` measured. ppl = exp(nll_sum / n_tokens); times in seconds."""

    ppl: float
    nll_sum: float
    n_tokens: int  # scored tokens (each once)
    n_documents: int
    n_windows: int
    forward_tokens: int  # tokens run through the model (context overlap counted again)
    seconds: float
    tokens_per_s: float  # scored tokens per second of forward time
    max_length: int
    stride: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def document_windows(n_tokens: int, max_length: int, stride: int, doc: int = 0) -> list[Window]:
    """The sliding windows of one document of `n_tokens` tokens.

    Window k covers [k*stride, min(k*stride + max_length, n)) and scores the tokens from the
    end of window k-1 on (token 0 is never scored: nothing predicts it). The last window
    reaches the end of the document. Needs 1 <= stride < max_length so every token is
    scored with at least one token of context.
    """
    check_window_args(max_length, stride)
    if n_tokens < 2:
        return []  # nothing to predict
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(doc, begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def check_window_args(max_length: int, stride: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a context and a prediction), got {max_length}")
    if not 1 <= stride < max_length:
        raise ValueError(
            f"stride must be in [1, max_length) = [1, {max_length}) so that every token keeps context "
            f"and is scored once; got {stride}"
        )


def window_batch(
    documents: Sequence[Sequence[int]], windows: Sequence[Window], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T] and labels [B, T] (-100 = not scored) for some windows.

    Labels are aligned with the inputs (the model shifts): labels[b, t] = input_ids[b, t] for
    the scored tokens, so position t - 1 predicts it.
    """
    T = max(w.length for w in windows)
    ids = torch.full((len(windows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), T), IGNORE_INDEX, dtype=torch.long)
    for b, w in enumerate(windows):
        tokens = torch.as_tensor(list(documents[w.doc][w.begin : w.end]), dtype=torch.long)
        ids[b, : w.length] = tokens
        first = w.score_from - w.begin
        labels[b, first : w.length] = tokens[first:]
    return ids, labels


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int]],
    max_length: int,
    stride: Optional[int] = None,
    batch_size: int = 8,
    *,
    pad_id: int = 0,
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PerplexityResult:
    """Token-weighted perplexity of `model` over tokenised `documents` (lists of ids).

    max_length: tokens per forward pass (the context); stride: step between window starts
    (default max_length // 2). batch_size: windows per forward pass — changes speed only.
    The model must accept `model(ids, labels=labels, reduction="sum")` and return
    (summed NLL, number of scored tokens), as `models.qwen.Qwen` does.
    `progress(done_windows, total_windows)` is called after every batch. pad_id can be any
    id in the vocabulary: right padding is never attended to by a real token, nor scored.
    """
    stride = max_length // 2 if stride is None else stride
    check_window_args(max_length, stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(documents) == 0:
        raise ValueError("no documents to evaluate")
    windows = [w for i, doc in enumerate(documents) for w in document_windows(len(doc), max_length, stride, i)]
    if not windows:
        raise ValueError("the documents hold no token to score (each needs at least 2 tokens)")
    # Longest first: batches of similar lengths waste little padding; order changes no result.
    windows.sort(key=lambda w: -w.length)
    device = device if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum = 0.0  # float64 accumulation across batches
    n_tokens = 0
    seconds = 0.0
    try:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            ids, labels = window_batch(documents, chunk, pad_id)
            ids, labels = ids.to(device), labels.to(device)
            t0 = time.perf_counter()
            loss_sum, count = model(ids, labels=labels, reduction="sum")
            loss_sum, count = float(loss_sum), int(count)  # syncs the device before the clock stops
            seconds += time.perf_counter() - t0
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"non-finite loss in the perplexity batch of windows {start}..{start + len(chunk) - 1}"
                )
            nll_sum += loss_sum
            n_tokens += count
            if progress is not None:
                progress(min(start + batch_size, len(windows)), len(windows))
    finally:
        model.train(was_training)
    expected = sum(w.end - w.score_from for w in windows)
    if n_tokens != expected:  # the model ignored some labels: the windows were not scored as planned
        raise RuntimeError(f"the model scored {n_tokens} tokens, expected {expected}")
    return PerplexityResult(
        ppl=perplexity_of(nll_sum / n_tokens),
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        n_documents=len(documents),
        n_windows=len(windows),
        forward_tokens=sum(w.length for w in windows),
        seconds=seconds,
        tokens_per_s=n_tokens / seconds if seconds > 0 else float("inf"),
        max_length=max_length,
        stride=stride,
    )


def encode_documents(
    tokenizer, texts: Iterable[str], append_eos: bool = True, eos_id: int = ENDOFTEXT_ID
) -> list[list[int]]:
    """Tokenise held-out texts as CPT sees them: each document followed by <|endoftext|>.

    Special-token text inside a document stays plain text (tokenizer.encode's default).
    """
    out = []
    for text in texts:
        ids = list(tokenizer.encode(text))
        if append_eos:
            ids.append(eos_id)
        out.append(ids)
    return out


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
