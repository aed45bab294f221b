"""Export a model directory for other runtimes: GGUF for llama.cpp and Ollama.

    from models.qwen.export import export_gguf, write_modelfile
    summary = export_gguf("runs/sft/merged", "runs/gguf/model-q8_0.gguf", file_type="q8_0")
    write_modelfile(summary.path, "runs/sft/merged")   # then: ollama create NAME -f runs/gguf/Modelfile

Needs the `gguf` package (llama.cpp's own GGUF writer; `pip install 'qwen-tune[gguf]'`).
"""

try:
    import gguf  # noqa: F401
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError("models.qwen.export needs the gguf package (llama.cpp's GGUF writer): "
                      "pip install 'qwen-tune[gguf]' or pip install gguf") from e

from .errors import ExportError
from .gguf_file import ExportSummary, export_gguf, read_config
from .gguf_tensors import FILE_TYPES, TensorPlan, ggml_type_for, plan_tensors
from .gguf_vocab import GGUFVocab, looks_special, read_vocab
from .modelfile import MODELFILE, TEMPLATE, modelfile_owner, modelfile_path, modelfile_text, ollama_chat, write_modelfile

__all__ = [
    "export_gguf", "ExportSummary", "ExportError", "FILE_TYPES", "TensorPlan", "ggml_type_for", "plan_tensors",
    "GGUFVocab", "read_vocab", "looks_special", "read_config", "MODELFILE", "modelfile_path", "modelfile_text",
    "write_modelfile", "modelfile_owner", "ollama_chat", "TEMPLATE",
]
