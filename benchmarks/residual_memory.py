"""Peak memory of the instruction residual on three Qwen2.5-1.5B-shaped checkpoints on disk.

    python benchmarks/residual_memory.py [--preset 1.5b] [--dir /tmp/residual-bench] [--shard-size 5GB] [--keep]

Writes random bf16 base / chat / target checkpoints of the preset's shape (chat and target
are the base plus small noise), then runs `lora.delta.instruction_residual` in a fresh
subprocess and reports its peak resident set size (VmHWM, which counts touched pages of
memory-mapped files too) against the size of one checkpoint. Target: below 25%.
A second subprocess that only imports lora.delta gives the interpreter + torch baseline.
A few output tensors are checked against the closed form computed here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fileio.safetensors_file import SafetensorsWriter, file_slices  # noqa: E402
from models.qwen import Qwen, QwenConfig  # noqa: E402
from models.qwen.checkpoint import parse_size  # noqa: E402


def write_family(root: Path, cfg: QwenConfig, shard_bytes: int, seed: int = 0) -> int:
    """base, chat, target dirs of random bf16 weights, tensor by tensor. Returns one checkpoint's bytes."""
    with torch.device("meta"):
        model = Qwen(cfg)
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()
              if not (cfg.tie_word_embeddings and k == "lm_head.weight") and not k.endswith("inv_freq")]
    shards, size = [[]], 0
    for k, s in shapes:
        n = 2 * int(torch.tensor(s).prod())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((k, s))
        size += n
    total = sum(2 * int(torch.tensor(s).prod()) for _, s in shapes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    roles = ("base", "chat", "target")
    for role in roles:
        d = root / role
        d.mkdir(parents=True, exist_ok=True)
        hf = cfg.to_hf()
        hf["torch_dtype"] = hf["dtype"] = "bfloat16"
        (d / "config.json").write_text(json.dumps(hf, indent=2))
        if len(shards) > 1:
            wm = {k: name for name, shard in zip(names, shards) for k, _ in shard}
            (d / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    g = torch.Generator().manual_seed(seed)
    for name, shard in zip(names, shards):
        writers = {r: SafetensorsWriter(root / r / name, [(k, torch.bfloat16, s) for k, s in shard],
                                        metadata={"format": "pt"}, fsync=True) for r in roles}
        for k, s in shard:
            base = torch.randn(s, generator=g) * 0.02 if len(s) > 1 else 1.0 + 0.1 * torch.randn(s, generator=g)
            writers["base"].write(k, base.bfloat16())
            for r, amount in (("chat", 0.002), ("target", 0.001)):
                writers[r].write(k, (base + amount * torch.randn(s, generator=g)).bfloat16())
            del base
        for w in writers.values():
            w.close()
    return total


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (large) parent.
HWM = """
def vm_hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

CHILD = HWM + """
import json, sys, time
t0 = time.time()
from lora.delta import instruction_residual
t1 = time.time()
root = sys.argv[1]
instruction_residual(root + "/base", root + "/chat", root + "/target", root + "/out", overwrite=True)
t2 = time.time()
print(json.dumps({"import_s": t1 - t0, "residual_s": t2 - t1,
                  "maxrss_kb": vm_hwm_kb()}))
"""

BASELINE = HWM + """
import json
import lora.delta
print(json.dumps({"maxrss_kb": vm_hwm_kb()}))
"""


def child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_some_tensors(root: Path, keys: list[str]) -> float:
    """max |out - (target + chat - base)| over `keys`, closed form in float32 then cast to bf16."""
    def get(role: str, key: str) -> torch.Tensor:
        d = root / role
        idx = d / "model.safetensors.index.json"
        name = json.loads(idx.read_text())["weight_map"][key] if idx.exists() else "model.safetensors"
        return file_slices(d / name)[key].read()

    worst = 0.0
    for k in keys:
        ref = (get("target", k).float() + (get("chat", k).float() - get("base", k).float())).bfloat16()
        worst = max(worst, float((get("out", k).float() - ref.float()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1.5b", help="QwenConfig preset of the checkpoints (default 1.5b)")
    ap.add_argument("--dir", default="/tmp/residual-bench", help="where the checkpoints are written")
    ap.add_argument("--shard-size", default="5GB", help="max shard size of the inputs (5GB: one file, as published)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = ap.parse_args()
    cfg = QwenConfig.preset(args.preset)
    root = Path(args.dir)
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    need = 4 * 2 * cfg.num_parameters()
    if free < need * 1.1:
        raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB; use a smaller --preset")
    if root.exists():
        shutil.rmtree(root)
    t = time.time()
    size = write_family(root, cfg, parse_size(args.shard_size))
    print(f"wrote 3 x {size / 1e9:.2f} GB ({args.preset}, bf16, {cfg.num_parameters() / 1e9:.2f}B params) "
          f"in {time.time() - t:.0f} s")
    base = child(BASELINE)
    run = child(CHILD, str(root))
    peak = run["maxrss_kb"] * 1024
    err = check_some_tensors(root, ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias",
                                    "model.layers.5.mlp.down_proj.weight", "model.norm.weight"])
    result = {
        "preset": args.preset, "checkpoint_bytes": size, "peak_rss_bytes": peak,
        "peak_rss_fraction": peak / size, "baseline_rss_bytes": base["maxrss_kb"] * 1024,
        "residual_seconds": run["residual_s"], "max_abs_err_vs_closed_form": err,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    print(f"peak RSS {peak / 2**20:.0f} MiB = {100 * peak / size:.1f}% of one checkpoint "
          f"({size / 2**20:.0f} MiB); import-only baseline {base['maxrss_kb'] / 1024:.0f} MiB; "
          f"target < 25%: {'PASS' if peak < 0.25 * size else 'FAIL'}")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
