"""What a run writes for the next tool: complete model folders (tokenizer included) that
transformers and PEFT load with the trained function, and TensorBoard event files that
TensorBoard's own reader reads."""

from __future__ import annotations

import json

import pytest
import torch

import lora
from models.qwen import Tokenizer, load, save
from tests.helpers import max_rel_err, random_ids, save_hf_model, hf_model
from train import Trainer, TrainConfig


def data(n=8, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (10 + i % 3,), generator=g)} for i in range(n)]


def cfg(out, **kw):
    base = dict(out_dir=str(out), max_steps=4, batch_size=2, grad_accum=1, dtype="fp32", progress=False, lr=5e-3,
                pad_id=0, warmup_steps=0, grad_checkpointing=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = save_hf_model(hf_model("qwen2", seed=7), tmp_path_factory.mktemp("base") / "m")
    Tokenizer.default().save_pretrained(path)
    return path


def test_save_without_a_tokenizer_copies_the_source_folders_or_warns(base, tmp_path):
    from transformers import AutoTokenizer

    save(load(base, dtype=torch.float32), tmp_path / "copy")   # no tokenizer given: the source folder's
    hf = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert hf.encode("Hello world") == [9707, 1879]
    from models.qwen import Qwen, QwenConfig

    with pytest.warns(UserWarning, match="written without tokenizer files"):
        save(Qwen(QwenConfig.preset("tiny", vocab_size=320)), tmp_path / "bare")


def test_full_training_exports_a_model_folder_transformers_loads(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load(base, dtype=torch.float32)
    summary = Trainer(model, cfg(tmp_path / "run", mode="full"), data(), tokenizer=Tokenizer.default()).fit()
    out = tmp_path / "run" / "model"
    assert summary["paths"]["model"] == str(out)
    assert AutoTokenizer.from_pretrained(out).encode("Hello world") == [9707, 1879]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_ids(1, 9)
    with torch.no_grad():
        # observed 0.0: the same weights and kernels (1e-5 leaves room for another CPU's kernel choice)
        assert max_rel_err(hf(ids).logits, model.eval()(ids)) < 1e-5


def test_full_then_lora_exports_the_full_phase_model_and_an_adapter_on_it(base, tmp_path):
    """The product PEFT loads: out/model (the weights after the full phase, complete) + out/adapter
    whose base_model_name_or_path is out/model; together they are the trained function."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load(base, dtype=torch.float32)
    settings = lora.LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    trainer = Trainer(model, cfg(tmp_path / "run", mode="full-then-lora", full_fraction=0.5), data(),
                      lora_config=settings, tokenizer=Tokenizer.default())
    trainer.fit()
    out = tmp_path / "run"
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((out / "model").resolve())
    full_phase = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    moved = max(float((a - b).abs().max()) for a, b in zip(full_phase.parameters(), original.parameters()))
    assert moved > 1e-4                                          # the full phase changed the weights
    ids = random_ids(2, 11)
    with torch.no_grad():
        model.eval()
        with lora.disable_adapters(model):                       # model/ is our model without its adapter
            # observed 0.0 here and below: the same weights and kernels
            assert max_rel_err(full_phase.eval()(ids).logits, model(ids)) < 1e-5
        peft_model = PeftModel.from_pretrained(full_phase, out / "adapter").eval()   # (wraps full_phase in place)
        assert max_rel_err(peft_model(ids).logits, model(ids)) < 1e-5


def test_tensorboard_events_read_back_with_tensorboards_reader(base, tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = load(base, dtype=torch.float32)
    lora.inject(model, r=4, alpha=8)
    Trainer(model, cfg(tmp_path / "run", report_to="tensorboard", eval_every=2), data(), eval_dataset=data(4, seed=1)
            ).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = ea.EventAccumulator(str(tmp_path / "run" / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= tags
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if "loss" in r]
    evals = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert evals == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in rows if "val_loss" in r]


def test_importing_quant_prints_nothing():
    """bitsandbytes' 'Failed to load CPU gemm_4bit_forward ... pip install kernels' is not ours to print."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import quant, lora, train"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
