"""Peak host memory of a streaming 4-bit load of a Qwen2.5-1.5B-shaped checkpoint.

    python benchmarks/nf4_load.py [--dir /tmp/qwen15b-random] [--keep] [--shards 1]

Writes random bf16 weights of the Qwen2.5-1.5B shape (28 layers, hidden 1536, MLP 8960,
12/2 heads, vocab 151936, tied embeddings: 1.54e9 parameters, 3.09 GB) once into --dir (reused
when it already holds them), then runs `models.qwen.load(dir, dtype=bf16, quantize=quant.NF4Quantizer())` in
a fresh subprocess and reports that process's peak RSS against the bf16 checkpoint size
(target: below 60%), next to quant.memory_report's predicted bytes per component. The
subprocess also reports its RSS right after `import torch, models.qwen, quant` (the baseline
every Python + torch process pays).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

QWEN25_15B = dict(
    architectures=["Qwen2ForCausalLM"],
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=151643,
    eos_token_id=151643,
    torch_dtype="bfloat16",
    use_sliding_window=False,
    sliding_window=32768,
    max_window_layers=21,
    attention_dropout=0.0,
    initializer_range=0.02,
)


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names -> shapes for one decoder layer (prefix model.layers.{i}.)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }


def write_checkpoint(root: Path, cfg: dict, shards: int = 1) -> int:
    """Random bf16 checkpoint in `root` (std 0.02), written layer by layer; returns its bytes."""
    import torch
    from fileio.safetensors_file import write_tensors

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab_size"], cfg["hidden_size"]))]
    for i in range(cfg["num_hidden_layers"]):
        names += [(f"model.layers.{i}.{k}", s) for k, s in layer_shapes(cfg).items()]
    names.append(("model.norm.weight", (cfg["hidden_size"],)))
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        chunk = names[s * per_shard : (s + 1) * per_shard]
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for k, shape in chunk:
            tensors[k] = torch.ones(shape, dtype=torch.bfloat16) if "norm" in k else rand(shape)
        write_tensors(tensors, str(root / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: fname for k in tensors})
        del tensors
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    (root / ".complete").write_text(str(total))
    return total


# Peak RSS is read from /proc/self/status VmHWM: unlike getrusage's ru_maxrss (which a child
# inherits from its parent across fork+exec) it belongs to this process image alone.
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def pread_iter_tensors(files):
    """Proposed replacement for models.qwen.checkpoint.iter_tensors: the same (key, tensor, file)
    stream, but each tensor is read with a plain file read into its own buffer instead of being
    a view of a memory-mapped shard. With safe_open's mmap every page a loader touches stays
    resident (counted in RSS) until the whole shard is closed, so a single-file 3 GB checkpoint
    costs 3 GB of RSS however small the model it becomes."""
    import torch

    for file in files:
        with open(file, "rb", buffering=0) as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for key in sorted(header):  # safe_open's key order
                info = header[key]
                begin, end = info["data_offsets"]
                tensor = torch.empty(info["shape"], dtype=getattr(torch, _ST_DTYPES[info["dtype"]]))
                raw = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else bytearray(0)
                fh.seek(8 + n + begin)
                if fh.readinto(memoryview(raw)) != end - begin:
                    raise ValueError(f"{file}: tensor {key!r} is truncated")
                yield key, tensor, Path(file)


CHILD = r"""
import json, sys, time, torch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import models.qwen, quant
if sys.argv[2] == "pread":  # the loader change proposed in benchmarks/RESULTS-nf4.md
    from benchmarks.nf4_load import pread_iter_tensors
    models.qwen.checkpoint.iter_tensors = pread_iter_tensors
base = hwm()
t0 = time.perf_counter()
model = models.qwen.load(sys.argv[1], dtype=torch.bfloat16, quantize=quant.NF4Quantizer())
seconds = time.perf_counter() - t0
peak = hwm()
for p in model.parameters():  # as in QLoRA before adapters: the base is frozen
    p.requires_grad_(False)
rep = quant.memory_report(model)
n_nf4 = sum(isinstance(m, quant.NF4Linear) for m in model.modules())
print(json.dumps(dict(baseline_rss=base, peak_rss=peak, seconds=seconds, nf4_modules=n_nf4,
                      components=rep.components, predicted_total=rep.predicted_total)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "qwen2.5-1.5b-random-bf16"))
    ap.add_argument("--shards", type=int, default=1, help="safetensors files to write (Qwen2.5-1.5B ships 1)")
    ap.add_argument("--reader", choices=("loader", "pread"), default="loader",
                    help="loader: models.qwen.load as it is; pread: with pread_iter_tensors patched in")
    args = ap.parse_args()

    root = Path(args.dir)
    if (root / ".complete").exists():
        size = int((root / ".complete").read_text())
        print(f"reusing {root} ({size / 1e9:.2f} GB bf16)")
    else:
        # Written in its own process so that this one (and the measured child) stay small.
        t0 = time.perf_counter()
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.nf4_load import *; " \
               f"write_checkpoint(Path({str(root)!r}), QWEN25_15B, {args.shards})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        size = int((root / ".complete").read_text())
        print(f"wrote {root} ({size / 1e9:.2f} GB bf16) in {time.perf_counter() - t0:.0f} s")

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), args.reader], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        sys.exit(out.returncode)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    gb = lambda b: f"{b / 1e9:6.3f} GB"  # noqa: E731
    print(f"reader                      {args.reader}")
    print(f"bf16 checkpoint size        {gb(size)}")
    print(f"load time                   {res['seconds']:6.1f} s   ({res['nf4_modules']} NF4Linear modules)")
    print(f"peak RSS after imports           {gb(res['baseline_rss'])}")
    print(f"peak RSS during load        {gb(res['peak_rss'])}   = {100 * res['peak_rss'] / size:.1f}% of bf16 size (target < 60%)")
    print(f"peak RSS minus imports      {gb(res['peak_rss'] - res['baseline_rss'])}   = "
          f"{100 * (res['peak_rss'] - res['baseline_rss']) / size:.1f}%")
    print("predicted (quant.memory_report):")
    for k, v in res["components"].items():
        print(f"  {k:<28}{gb(v)}")
    print(f"  {'total':<28}{gb(res['predicted_total'])}")


if __name__ == "__main__":
    main()
