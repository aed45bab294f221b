"""Before/after of each optimisation in the training step, one component at a time.

    python benchmarks/components.py                  # every component, the bench-100m shapes
    python benchmarks/components.py head-ce lora     # some of them
    python benchmarks/components.py --with-compile   # also torch.compile of one decoder block

Every variant runs in its own process on the shapes of the bench-100m model (hidden 512,
MLP 1536, 8 heads / 2 KV heads, vocab 151936) at batch 2 x 512 tokens, forward + backward
where there is one. Reported: the median of --reps timed repetitions after two warm-ups (the
best such median of --rounds processes, the variants taking turns), and the peak RSS the
variant added on top of its inputs. "before" variants are the plain
implementations the optimisation replaces (written out here); "ours" is the library's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

B, T, HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB, R = 2, 512, 512, 1536, 8, 2, 64, 151936, 16
BF16 = torch.bfloat16


# ------------------------------------------------------------------ head + cross-entropy
def head_ce(variant: str):
    from models.qwen.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, HIDDEN, generator=g).to(BF16).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).to(BF16)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)

    def full_logits():  # transformers: the whole [B, T, V] logits, upcast, then cross-entropy
        logits = F.linear(hidden, weight).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
        loss.backward()

    def chunked():
        loss, _ = linear_cross_entropy(hidden, weight, labels)
        loss.backward()

    return {"before: full fp32 logits (transformers)": full_logits, "ours: chunked, fused gradient": chunked}[variant]


# ------------------------------------------------------------------ LoRA update
def lora_update(variant: str):
    from torch import nn

    import lora

    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(HIDDEN, MLP, bias=False).to(BF16), r=R, alpha=R)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.02)
    x = torch.randn(B * T, HIDDEN).to(BF16).requires_grad_()
    W, A, Bw, s = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scale

    def materialised():  # W + s·B·A built every call, then one matmul
        y = F.linear(x.float(), W.float() + s * (Bw @ A)).to(BF16)
        y.float().sum().backward()

    def autograd_xab():  # (x·Aᵀ)·Bᵀ through autograd: fp32 copy of x, three [N, out] temporaries
        out = F.linear(x, W)
        y = out + (F.linear(F.linear(x.to(A.dtype), A), Bw) * s).to(out.dtype)
        y.float().sum().backward()

    def fused():
        layer(x).float().sum().backward()

    return {"before: W + s·B·A materialised": materialised, "before: (x·A)·B via autograd": autograd_xab,
            "ours: (x·A)·B, one fused function": fused}[variant]


class _FreshTemporariesUpdate(torch.autograd.Function):
    """The LoRA update as it was before CPU scratch (5518094): the same math, a fresh fp32
    tensor for every temporary and one fp32 cast of the input per adapter."""

    @staticmethod
    def forward(ctx, base_out, x, A, B, scale):
        n_in, n_out = A.shape[1], B.shape[0]
        xa = x.reshape(-1, n_in).to(A.dtype) @ A.t()
        y = torch.addmm(base_out.reshape(-1, n_out).to(A.dtype), xa, B.t(), alpha=scale)
        ctx.save_for_backward(x, xa, A, B)
        ctx.scale = scale
        return y.to(base_out.dtype).view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, A, B = ctx.saved_tensors
        g = grad_y.reshape(-1, B.shape[0]).to(A.dtype)
        grad_B = (g.t() @ xa).mul_(ctx.scale)
        g_xa = (g @ B).mul_(ctx.scale)
        grad_A = g_xa.t() @ x.reshape(-1, A.shape[1]).to(A.dtype)
        grad_x = (g_xa @ A).to(x.dtype).view(x.shape)
        return grad_y, grad_x, grad_A, grad_B, None


def lora_siblings(variant: str):
    """The seven adapters of one decoder block (q/k/v and gate/up read one input each)."""
    from torch import nn

    import lora
    import lora.fused_update

    if variant.startswith("before"):
        lora.fused_update._LoRAUpdate = _FreshTemporariesUpdate
    torch.manual_seed(0)

    def adapter(inp, out):
        layer = lora.LoRALinear(nn.Linear(inp, out, bias=False).to(BF16), r=R, alpha=R)
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.02)
        return layer

    q, k, v, o = adapter(HIDDEN, HIDDEN), adapter(HIDDEN, 128), adapter(HIDDEN, 128), adapter(HIDDEN, HIDDEN)
    gate, up, down = adapter(HIDDEN, MLP), adapter(HIDDEN, MLP), adapter(MLP, HIDDEN)
    x = torch.randn(B * T, HIDDEN).to(BF16).requires_grad_()
    m = torch.randn(B * T, HIDDEN).to(BF16).requires_grad_()

    def block():
        attn = q(x).float().sum() + k(x).float().sum() + v(x).float().sum() + o(x).float().sum()
        h = F.silu(gate(m)) * up(m)
        (attn + down(h).float().sum()).backward()

    return block


# ------------------------------------------------------------------ attention
def attention(variant: str):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HEADS, T, HEAD_DIM, generator=g).to(BF16).requires_grad_()
    k = torch.randn(B, KV_HEADS, T, HEAD_DIM, generator=g).to(BF16).requires_grad_()
    v = torch.randn(B, KV_HEADS, T, HEAD_DIM, generator=g).to(BF16).requires_grad_()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rep = HEADS // KV_HEADS

    def eager():  # transformers' "eager": repeated KV, a dense T x T mask, fp32 softmax
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ kk.transpose(-1, -2)) * HEAD_DIM**-0.5
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), -1).to(BF16)
        (probs @ vv).float().sum().backward()

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float().sum().backward()

    return {"before: eager (dense mask)": eager, "ours: SDPA is_causal (no mask tensor)": sdpa}[variant]


# ------------------------------------------------------------------ NF4 dequantisation
def nf4_dequant(variant: str):
    from quant.nf4 import _blocks, quantize

    torch.manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (128, HIDDEN), (128, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN),
              (HIDDEN, MLP)] * 8  # the 56 linears of the model
    qs = [quantize(torch.randn(*s).to(BF16)) for s in shapes]
    buffers = [torch.empty(s, dtype=BF16) for s in shapes]

    def nibbles():  # unpack both nibbles, gather each level, scale, round
        for q in qs:
            flat = q.packed.reshape(-1)
            idx = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1).long()
            (_blocks(q.code[idx], q.blocksize) * q.float_absmax().unsqueeze(1)).reshape(q.shape).to(BF16)

    def table():
        for q in qs:
            q.dequantize(BF16)

    def table_buffer():
        for q, buf in zip(qs, buffers):
            q.dequantize(BF16, out=buf)

    def bitsandbytes_kernel():  # what NF4Linear uses on CPU when bitsandbytes is installed
        from quant import backend

        for q in qs:
            backend.dequantize(q, BF16)

    return {"before: nibble unpack + gather": nibbles, "ours: byte-pair table": table,
            "ours: byte-pair table into a reused buffer": table_buffer,
            "ours: bitsandbytes' CPU kernel (quant.backend)": bitsandbytes_kernel}[variant]


# ------------------------------------------------------------------ AdamW
def adamw(variant: str):
    import train

    torch.manual_seed(0)
    shapes = [(R, HIDDEN), (HIDDEN, R), (R, HIDDEN), (128, R), (R, HIDDEN), (128, R), (R, HIDDEN), (HIDDEN, R),
              (R, HIDDEN), (MLP, R), (R, HIDDEN), (MLP, R), (R, MLP), (HIDDEN, R)] * 8  # the LoRA A/B of the model
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = {"before: one parameter at a time": lambda: train.AdamW(params, lr=1e-4, foreach=False),
           "ours: multi-tensor (foreach)": lambda: train.AdamW(params, lr=1e-4, foreach=True),
           "reference: torch.optim.AdamW(foreach=True)": lambda: torch.optim.AdamW(params, lr=1e-4, foreach=True),
           }[variant]()
    return opt.step


# ------------------------------------------------------------------ bf16 matmul on CPU
def bf16_linear(variant: str):
    from models.qwen.cpu_fast_paths import _UpcastLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B * T, HIDDEN, generator=g).to(BF16).requires_grad_()
    w = torch.randn(MLP, HIDDEN, generator=g).to(BF16)

    def native():
        F.linear(x, w).float().sum().backward()

    def fp32_kernels():
        _UpcastLinear.apply(x, w, None).float().sum().backward()

    return {"bf16 kernels": native, "fp32 kernels on upcast operands (linear.py)": fp32_kernels}[variant]


# ------------------------------------------------------------------ torch.compile of a block
def compiled_block(variant: str):
    from torch.utils.checkpoint import checkpoint

    import lora
    from models.qwen import Qwen
    from shapes import bench_config

    torch.manual_seed(0)
    cfg = bench_config("bench-100m")
    cfg.num_hidden_layers = 1
    model = Qwen(cfg).to(BF16)
    lora.inject(model, r=R, alpha=R, dropout=0.0, targets="all-linear")
    block = model.model.layers[0]
    x = torch.randn(B, T, HIDDEN).to(BF16).requires_grad_()
    cos, sin = model.model.rotary_emb(torch.arange(T).expand(B, T), BF16)
    if variant == "torch.compile":
        start = time.perf_counter()
        block.compile()
        checkpoint(block, x, cos, sin, None, None, use_reentrant=False).float().sum().backward()
        print(json.dumps({"compile_s": time.perf_counter() - start}))

    def run():
        checkpoint(block, x, cos, sin, None, None, use_reentrant=False).float().sum().backward()

    return run


COMPONENTS = {
    "head-ce": (head_ce, ["before: full fp32 logits (transformers)", "ours: chunked, fused gradient"]),
    "lora": (lora_update, ["before: W + s·B·A materialised", "before: (x·A)·B via autograd",
                           "ours: (x·A)·B, one fused function"]),
    "lora-block": (lora_siblings, ["before: fresh fp32 temporaries, a cast per adapter",
                                   "ours: CPU scratch, one cast per shared input"]),
    "attention": (attention, ["before: eager (dense mask)", "ours: SDPA is_causal (no mask tensor)"]),
    "nf4-dequant": (nf4_dequant, ["before: nibble unpack + gather", "ours: byte-pair table",
                                  "ours: byte-pair table into a reused buffer",
                                  "ours: bitsandbytes' CPU kernel (quant.backend)"]),
    "adamw": (adamw, ["before: one parameter at a time", "ours: multi-tensor (foreach)",
                      "reference: torch.optim.AdamW(foreach=True)"]),
    "bf16-linear": (bf16_linear, ["bf16 kernels", "fp32 kernels on upcast operands (linear.py)"]),
    "compile": (compiled_block, ["eager", "torch.compile"]),
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(component: str, variant: str, reps: int) -> None:
    fn = COMPONENTS[component][0](variant)
    base = rss_mib()
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"median_ms": statistics.median(times) * 1000, "added_peak_mib": max(0.0, peak - base)}))


def main() -> None:
    from vs_hf import run_worker  # this folder: one way to run a child and read its JSON lines

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("components", nargs="*", help=f"any of {', '.join(COMPONENTS)} (default: all but compile)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3,
                   help="processes per variant, alternating between variants; the fastest counts (host noise)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--with-compile", action="store_true", help="also time torch.compile of one decoder block")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(*args.child, args.reps)
    names = args.components or [c for c in COMPONENTS if c != "compile" or args.with_compile]
    for name in names:
        if name not in COMPONENTS:
            p.error(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.reps}, best of {args.rounds} "
          f"rounds (the variants alternate)")
    for name in names:
        print(f"\n{name}")
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for variant in COMPONENTS[name][1]:
                r = run_worker([sys.executable, __file__, "--child", name, variant, f"--reps={args.reps}",
                                f"--threads={args.threads}"], f"{name} / {variant}")
                if variant not in best or r["median_ms"] < best[variant]["median_ms"]:
                    best[variant] = r
        first = None
        for variant, r in best.items():
            first = first or r["median_ms"]
            extra = f"   (compile {r['compile_s']:.0f} s)" if "compile_s" in r else ""
            print(f"  {variant:46}{r['median_ms']:9.2f} ms {first / r['median_ms']:6.2f}x"
                  f"{r['added_peak_mib']:9.0f} MiB added{extra}")


if __name__ == "__main__":
    main()
