"""The files that travel with a model folder besides its weights and config: the tokenizer's and
the processor's. The one list: `models.qwen.save`, the tokenizer loader, the weight-delta tools
(`lora.delta`), evaluation and --out's overwrite rules all read it from here.

    TOKENIZER_FILES   what a tokenizer reads (written by `Tokenizer.save_pretrained` when one is given)
    PROCESSOR_FILES   what a vision-language checkpoint's processor reads beside the tokenizer
                      (Qwen3.5: image and video preprocessors, the processor's chat template);
                      no tokenizer writes them, so they are always copied from the input folder
    FOLDER_FILES      both
    VOCABULARY_FILES  one of these makes a folder's tokenizer usable
    holds_tokenizer(folder)  whether a folder has tokenizer files at all (vocabulary or tokenizer_config.json)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "qwen.tiktoken",
                   "tokenizer.model", "chat_template.jinja", "special_tokens_map.json", "added_tokens.json")
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json")
FOLDER_FILES = TOKENIZER_FILES + PROCESSOR_FILES
# A folder holds a usable tokenizer when it has one of these (models.qwen.tokenizer reads them).
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "qwen.tiktoken")
# A folder holds a tokenizer (to load, or to load the special tokens of) when it has one of these.
TOKENIZER_MARKERS = VOCABULARY_FILES + ("tokenizer_config.json",)


def holds_tokenizer(folder: Optional[Union[str, Path]]) -> bool:
    """Whether `folder` is a directory with one of TOKENIZER_MARKERS."""
    return folder is not None and any((Path(folder) / name).is_file() for name in TOKENIZER_MARKERS)


def copy_folder_files(source: Optional[Union[str, Path]], target: Path,
                      names: Sequence[str] = FOLDER_FILES) -> list[str]:
    """Copy those of `names` that `source` holds and `target` does not yet hold; returns the
    names copied (none when `source` is not a directory)."""
    if not source or not Path(source).is_dir():
        return []
    copied = []
    for name in names:
        src = Path(source) / name
        if src.is_file() and not (target / name).exists():
            shutil.copyfile(src, target / name)
            copied.append(name)
    return copied
