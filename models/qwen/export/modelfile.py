"""An Ollama Modelfile next to an exported GGUF, so `ollama create NAME -f Modelfile` imports it.

    FROM ./model-q8_0.gguf
    PARAMETER stop "<|im_end|>"
    PARAMETER stop "<|endoftext|>"

Ollama reads the chat template from the GGUF (`tokenizer.chat_template`); the stop strings
end a reply at the end of the assistant turn whatever eos the model was saved with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..special_tokens import IM_END
from ..tokenizer import ENDOFTEXT

MODELFILE = "Modelfile"
STOP_TOKENS = (IM_END, ENDOFTEXT)


def modelfile_text(gguf_path: Union[str, os.PathLike]) -> str:
    """The Modelfile for the GGUF at `gguf_path`, which lives in the same directory (FROM is relative)."""
    lines = [f"FROM ./{Path(gguf_path).name}"]
    lines += [f'PARAMETER stop "{s}"' for s in STOP_TOKENS]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Union[str, os.PathLike]) -> Path:
    return Path(gguf_path).with_name(MODELFILE)


def write_modelfile(gguf_path: Union[str, os.PathLike]) -> Path:
    """Write `Modelfile` beside the GGUF (temp file + rename); returns its path."""
    path = modelfile_path(gguf_path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(modelfile_text(gguf_path), encoding="utf-8")
    os.replace(tmp, path)
    return path
