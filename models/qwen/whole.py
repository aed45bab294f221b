"""Checkpoints that hold more than the text model we train, written back whole.

A Qwen3.5 vision-language checkpoint (`qwen3_5` / `qwen3_5_moe`, Qwen3_5[Moe]ForConditionalGeneration)
holds its text model under `model.language_model.`, a vision tower (`model.visual.*`) and a
multi-token-prediction head (`mtp.*`). `load` reads the text model only and records a
`CheckpointSource` on the model (`model.checkpoint_source`): the input folder, its config.json,
and which tensors it left on disk. `save` (and `lora.save` for adapter names) then writes what the
input had:

* the text tensors under the input's names (`model.language_model.*`, `lm_head.weight`);
* every tensor that was not loaded, its bytes copied from the input shard as they are, one
  chunk at a time (a 27B checkpoint's vision tower never sits in memory);
* the input's config.json, with only the text-config values that changed since loading (eos
  after chat tuning, the dtype after a cast, ...) updated in `text_config`.

A text-only `qwen3_5_text` checkpoint with an MTP head gets its `mtp.*` tensors back the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from .errors import CheckpointError
from fileio.safetensors_file import FileSlice, file_slices

TEXT_PREFIX = "model.language_model."
# Keys of a nested config that transformers reads at the top level, not from text_config.
TOP_LEVEL_KEYS = ("tie_word_embeddings",)
# Keys written per model class, never copied from our text config into the outer one.
CLASS_KEYS = ("architectures", "model_type")


@dataclass
class CheckpointSource:
    """Where a model was loaded from, for writing it back whole.

    root: the input folder. config: its config.json as read. text_hf: our text config.json dict
    (QwenConfig.to_hf) as loaded, against which `hf_config` sees what changed. nested: the text
    model sits under model.language_model. skipped: name -> shard file of every tensor not loaded.
    """

    root: Path
    config: dict
    text_hf: dict
    nested: bool
    skipped: dict[str, Path] = field(default_factory=dict)

    def checkpoint_name(self, name: str) -> str:
        """Our tensor or module name -> the input checkpoint's (model.X -> model.language_model.X)."""
        if self.nested and name.startswith("model."):
            return TEXT_PREFIX + name[len("model."):]
        return name

    def hf_config(self, text_hf: dict) -> dict:
        """The config.json to write for our text config `text_hf`: a text-only input's is `text_hf`
        itself; a nested input's is its own config.json with the changed text values updated."""
        if not self.nested:
            return text_hf
        out = copy.deepcopy(self.config)
        out.pop("quantization_config", None)  # save writes it again if the weights still are 4-bit
        text = out.setdefault("text_config", {})
        missing = object()
        for key, value in text_hf.items():
            if key in CLASS_KEYS or self.text_hf.get(key, missing) == value:
                continue  # unchanged since loading: the input's own spelling stays
            text[key] = value
            if key in out or key in TOP_LEVEL_KEYS:
                out[key] = value
        return out

    def skipped_slices(self) -> dict[str, FileSlice]:
        """The skipped tensors as FileSlices of the input shards, checked still to be there."""
        out: dict[str, FileSlice] = {}
        by_file: dict[Path, list[str]] = {}
        for name, file in self.skipped.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if not file.is_file():
                raise CheckpointError(f"{file}: the shard this model's vision tower / MTP tensors are copied from is "
                                      "gone (the input folder changed since the model was loaded)")
            slices = file_slices(file)
            for name in names:
                if name not in slices:
                    raise CheckpointError(f"{file}: tensor {name!r} is no longer in it (the input folder changed "
                                          "since the model was loaded)")
                out[name] = slices[name]
        return out


def source_of(model: nn.Module) -> Optional[CheckpointSource]:
    return getattr(model, "checkpoint_source", None)


def checkpoint_name(model: nn.Module, name: str) -> str:
    """`name` (a tensor or module of our model) as the checkpoint the model came from spells it."""
    source = source_of(model)
    return source.checkpoint_name(name) if source is not None else name


def our_name(name: str) -> str:
    """A checkpoint's (or PEFT adapter's) nested text-model name -> ours (model.language_model.X -> model.X)."""
    return "model." + name[len(TEXT_PREFIX):] if name.startswith(TEXT_PREFIX) else name


def record(model: nn.Module, root: Path, config: dict, nested: bool, skipped: dict[str, Path]) -> None:
    """Attach the CheckpointSource of a model just loaded from `root` (only where there is more
    to write back than the text model: a nested config or skipped tensors)."""
    if nested or skipped:
        text_hf = model.config.to_hf()
        text_hf.setdefault("torch_dtype", text_hf.get("dtype"))  # save writes both spellings
        model.checkpoint_source = CheckpointSource(Path(root).resolve(), config, text_hf, nested,
                                                   {k: Path(f).resolve() for k, f in skipped.items()})
