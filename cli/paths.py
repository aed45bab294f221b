"""Default locations of the pipeline's outputs, relative to the working directory, so that each
script finds the previous one's outputs with no flags (cpt.py -> merge.py -> sft.py -> dpo.py)."""

from pathlib import Path

RUNS = Path("runs")
CPT_OUT = RUNS / "cpt"
MERGED_OUT = RUNS / "cpt-merged"
SFT_OUT = RUNS / "sft"
DPO_OUT = RUNS / "dpo"
REWARD_OUT = RUNS / "rm"
GRPO_OUT = RUNS / "grpo"
KTO_OUT = RUNS / "kto"

# The tuned stages in order, latest first: (stage, its --out, the base its adapter goes on).
TUNED_STAGES = (("dpo", DPO_OUT, SFT_OUT / "merged"), ("sft", SFT_OUT, MERGED_OUT))


def is_model(d: Path) -> bool:
    """An HF-format model folder a stage wrote (config.json + safetensors)."""
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def is_adapter(d: Path) -> bool:
    """A PEFT-format adapter folder a stage wrote."""
    return (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()


def latest_tuned(prefer_adapter: bool = False, merged_only: bool = False):
    """(stage, model dir, adapter dir or None) of the latest tuned stage under runs/ (dpo, then
    sft), or None: its merged/ model, else its adapter/ on the base it was trained from
    (`--no-merge`). `prefer_adapter` takes the adapter form first (to compare with and without);
    `merged_only` skips adapters."""
    for stage, out, base in TUNED_STAGES:
        merged = (stage, out / "merged", None) if is_model(out / "merged") else None
        adapter = (stage, base, out / "adapter") if is_adapter(out / "adapter") and is_model(base) else None
        found = (merged,) if merged_only else (adapter, merged) if prefer_adapter else (merged, adapter)
        for choice in found:
            if choice is not None:
                return choice
    return None
