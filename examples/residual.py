"""Add the instruction residual (chat - base) to a model: target + scale * (chat - base).

    python examples/residual.py --base Qwen2.5-7B --chat Qwen2.5-7B-Instruct --target runs/cpt-merged \\
        --out runs/cpt-chat [--scale 1.0]
    python examples/residual.py          # the embedded default (see below)

The result restores chat ability after continued pretraining without SFT (arXiv 2410.10739).
It is computed tensor by tensor from memory-mapped shards (a 7B model fits a 24 GB machine),
carries the chat model's tokenizer, chat template and eos <|im_end|>, and a manifest.json.
See `python -m lora.delta residual --help` for the per-group scales and the special-token rule.

Embedded default (no flags): base = the small pretrained model cpt.py caches, target =
runs/cpt-merged (cpt.py + merge.py), chat = that base after a short SFT run (sft.py +
merge.py into runs/base-chat, built once), out = runs/residual; then it answers a question in
ChatML with the result and shows that generation stops at <|im_end|>.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli import flags, options, paths
from cli.delta import run_residual
from cli.errors import UsageError, run_main
from fileio.safe_load import read_json
from models.qwen import CHAT_STOP_IDS

HERE = Path(__file__).resolve().parent
DEMO_QUESTION = "What does `json.dumps` do?"


def build_parser() -> flags.Parser:
    return options.parser("residual", __doc__)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return embedded_default()
    args = flags.parse(build_parser(), argv).args
    args.command = "residual"
    return run_residual(args)


# ---------------------------------------------------------------------- embedded default
def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise UsageError(f"{' '.join(cmd[1:3])} failed with exit code {done.returncode}")


def embedded_default() -> int:
    from cli.console import chat_ids
    from cli.runtime import load_model
    from demo.base_model import base_dir
    from models.qwen import IM_END_ID
    from models.qwen.tokenizer import load_tokenizer

    base = base_dir()
    target = paths.MERGED_OUT
    if not (base / "config.json").exists() or not (target / "config.json").exists():
        raise UsageError(
            f"no flags: the embedded default needs cpt.py's cached base ({base}) and merge.py's output "
            f"({target}); run `python examples/cpt.py` and `python examples/merge.py` first, "
            f"or pass --base/--chat/--target/--out"
        )
    chat = paths.RUNS / "base-chat"
    if not (chat / "config.json").exists():
        print(f"building the tiny chat model once: SFT of the base {base} then merge -> {chat}")
        sft_out = paths.RUNS / "base-sft"
        _run([sys.executable, str(HERE / "sft.py"), "--model", str(base), "--out", str(sft_out), "--overwrite"])
        _run([sys.executable, str(HERE / "merge.py"), "--model", str(base), "--adapter", str(sft_out / "adapter"),
              "--out", str(chat), "--overwrite"])
    out = paths.RUNS / "residual"
    args = flags.parse(build_parser(), ["--base", str(base), "--chat", str(chat), "--target", str(target),
                                             "--out", str(out)]).args
    args.command = "residual"
    run_residual(args)
    manifest = read_json(out / "manifest.json", UsageError, dict)
    carried = [f"{r['tensor']}[{r['row']}]" for r in manifest["special_rows"]["rows"] if r["carried"]]
    print(f"special-token rows from the chat model: {', '.join(carried) or 'none'}")

    tok, _ = load_tokenizer(out)
    prompt = chat_ids(tok, DEMO_QUESTION)
    for name, path in (("chat model", chat), ("target (CPT, no residual)", target), ("target + residual", out)):
        model = load_model(path, "fp32")
        print(f"\n[{name}] user: {DEMO_QUESTION}\n[{name}] assistant: ", end="", flush=True)
        ids = _generate_ids(model, prompt, 64)
        stopped = bool(ids) and ids[-1] == IM_END_ID
        print(tok.decode([t for t in ids if t not in CHAT_STOP_IDS]))
        print(f"[{name}] {len(ids)} tokens, " + ("stopped at <|im_end|>" if stopped else "did not stop at <|im_end|>"))
    print(f"\nwrote {out} (manifest.json lists inputs, hashes, scales and skipped tensors)")
    return 0


def _generate_ids(model, prompt: list[int], max_new: int) -> list[int]:
    import torch

    from models.qwen import generate

    out = generate(model, torch.tensor([prompt]), max_new_tokens=max_new, temperature=0.0, eos_ids=list(CHAT_STOP_IDS))
    ids = out[0, len(prompt):].tolist()
    for i, t in enumerate(ids):  # generate pads a finished row with eos: keep up to the first stop
        if t in CHAT_STOP_IDS:
            ids = ids[: i + 1]
            break
    return ids


if __name__ == "__main__":
    run_main(main)
