"""The stage scripts on a Qwen3-Next checkpoint (fused Gated DeltaNet projections, routed + shared
experts, a dense mlp_only_layers MLP), as a user runs them: cpt.py --qlora then merge.py (the
merged folder loads in transformers as Qwen3NextForCausalLM with PEFT's base + adapter logits), and
cpt.py under torchrun with FSDP2 equal to one process (the checks of test_qwen35_scripts.py)."""

from __future__ import annotations

import json

import pytest

from tests.examples.test_qwen35_scripts import fsdp_equals_one_process, qlora_cpt_and_merge, script_inputs

pytestmark = pytest.mark.filterwarnings("ignore:.*falling back to its reference PyTorch implementation")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Qwen3NextForCausalLM and a small corpus (script_inputs)."""
    from tests.models.test_qwen3_next import hf_qwen3_next

    return script_inputs(tmp_path_factory, "qwen3-next-scripts", hf_qwen3_next)


@pytest.mark.slow  # two script runs (~50 s of CPU)
def test_qlora_cpt_and_merge(inputs, tmp_path):
    """The adapter holds the shared expert and the dense MLP as PEFT reads them (target_parameters)."""
    out = qlora_cpt_and_merge(*inputs, tmp_path, "Qwen3NextForCausalLM")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {"mlp.shared_expert.up_proj.weight", "mlp.down_proj.weight"} <= set(config["target_parameters"])


@pytest.mark.slow  # three processes of cpt.py (~30 s of CPU)
def test_fsdp_under_torchrun_equals_one_process(inputs, tmp_path):
    """LoRA on every expert, the shared expert and the dense MLP, sharded over 2 processes."""
    adapter = fsdp_equals_one_process(*inputs, tmp_path)
    assert any("in_proj_qkvz" in k for k in adapter) and any("shared_expert" in k for k in adapter)
