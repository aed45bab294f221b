"""The command-line layer every stage script shares (examples/*.py, `qwen-tune <stage>`).

    errors.py       exit codes and `run_main`: one line on stderr for bad input (2) or a failure
                    at run time (1); 130 / 143 after SIGINT / SIGTERM
    options.py      every script's options, declared once: flags, defaults, help, --config keys,
                    LLaMA-Factory keys, the embedded default's values, per-stage recommendations
    flags.py        the argparse parser, value types, and parsing with provenance (`given`)
    config_file.py  --config FILE: our flag names or LLaMA-Factory's keys, in YAML or JSON
    llama_factory.py  LLaMA-Factory's conventions: stage names, harmless keys, value translations
    inputs.py       checks of --model / --adapter / --data before anything loads
    outdir.py       what a script may do with --out: the run's identity, --overwrite, the lock
    runtime.py      device, dtype and model loading for a stage (LoRA / QLoRA / full)
    console.py      what the scripts print: progress lines, loss curves, streamed generation
    paths.py        the default locations of the pipeline's outputs (runs/cpt, runs/sft, ...)

The training logic itself lives in the packages (models, quant, lora, data, train); the
embedded default's corpus and base model live in `demo`.
"""

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)
