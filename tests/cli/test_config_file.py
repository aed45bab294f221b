"""A LLaMA-Factory recipe as --config: its keys become our flags; keys we cannot honour are named
in one line on stderr; a dataset name is found through dataset_info.json."""

from __future__ import annotations

import json

import pytest

from cli import flags, options
from cli.errors import UsageError

# LLaMA-Factory's examples/train_lora/qwen2_5_lora_sft.yaml shape, with seed 004's settings.
RECIPE = """\
### model
model_name_or_path: /models/Qwen2.5-7B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 64
lora_alpha: 128
lora_dropout: 0.05
lora_target: all

### dataset
dataset: my_sft
template: qwen
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/qwen2.5-7b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 32
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
max_grad_norm: 0.5
bf16: false
fp16: false
flash_attn: disabled
gradient_checkpointing: true
ddp_timeout: 180000000
"""


def _parse(argv, stage):
    return flags.parse(options.parser(stage, "test"), argv, stage=stage).args


def test_llamafactory_recipe_maps_onto_our_flags(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "my_sft.json").write_text("[]", encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"my_sft": {"file_name": "my_sft.json"}}), encoding="utf-8")
    cfg = tmp_path / "qwen_lora_sft.yaml"
    cfg.write_text(RECIPE, encoding="utf-8")
    args = _parse(["--config", str(cfg)], "sft")
    assert args.model == "/models/Qwen2.5-7B-Instruct"
    assert (args.finetuning, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets) == \
        ("lora", 64, 128.0, 0.05, "all-linear")
    assert args.data == [str(data / "my_sft.json")]
    assert (args.max_len, args.out, args.log_every, args.save_every, args.overwrite) == \
        (2048, "saves/qwen2.5-7b/lora/sft", 10, 500, True)
    assert (args.batch_size, args.grad_accum, args.lr, args.epochs, args.lr_scheduler) == (1, 32, 1e-5, 3.0, "cosine")
    assert (args.warmup_ratio, args.max_grad_norm, args.dtype) == (0.1, 0.5, "fp32")   # bf16/fp16 false: fp32
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not honoured here (ignored): max_samples" in err[0]   # one line, the one key


def test_cutoff_len_is_the_block_size_of_pretraining(tmp_path):
    cfg = tmp_path / "pt.yaml"
    cfg.write_text("stage: pt\ncutoff_len: 1024\nfinetuning_type: full\nbf16: true\nquantization_bit: 4\n")
    args = _parse(["--config", str(cfg)], "cpt")
    assert (args.block_size, args.finetuning, args.dtype, args.qlora) == (1024, "full", "bf16", True)


def test_command_line_wins_over_llamafactory_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: sft\nlearning_rate: 1.0e-5\nlora_rank: 64\n")
    args = _parse(["--config", str(cfg), "--lr", "2e-4"], "sft")
    assert (args.lr, args.lora_r) == (2e-4, 64)


@pytest.mark.parametrize("text, needle", [
    ("stage: dpo\n", "stage 'dpo' is run by examples/dpo.py, not by sft.py"),
    ("stage: ppo\n", "stage 'ppo' is not supported"),
    ("stage: rm\n", "stage 'rm' is run by examples/reward.py, not by sft.py"),
    ("stage: sft\nfinetuning_type: freeze\n", "finetuning_type 'freeze' is not supported"),
    ("stage: sft\nquantization_bit: 8\n", "quantization_bit 8: only 4-bit"),
    ("stage: sft\ndataset: nowhere\n", "dataset 'nowhere' is not in"),
])
def test_llamafactory_keys_we_cannot_run_are_errors(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=needle):
        _parse(["--config", str(cfg)], "sft")
