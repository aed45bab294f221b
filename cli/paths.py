"""Default locations of the pipeline's outputs, relative to the working directory, so that each
script finds the previous one's outputs with no flags (cpt.py -> merge.py -> sft.py -> dpo.py)."""

from pathlib import Path

RUNS = Path("runs")
CPT_OUT = RUNS / "cpt"
MERGED_OUT = RUNS / "cpt-merged"
SFT_OUT = RUNS / "sft"
DPO_OUT = RUNS / "dpo"
