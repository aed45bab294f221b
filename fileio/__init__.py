"""The lowest layer: the files every package reads and writes (imports only torch and the stdlib).

    safetensors_file.py  safetensors headers (checked), tensor reads (whole, by name, streamed
                         rows), the one writer (whole dicts, streamed rows, copied slices)
    atomic.py            atomic directories, crash recovery, the modes a plain open() gives
    hashing.py           sha256 of files (whole, or a sampled fingerprint)
    safe_load.py         JSON / YAML with nesting and size caps
    folder.py            the one list of files that travel with a model folder (tokenizer,
                         chat template, processor, vocabulary files)
    errors.py            QwenTuneError (the base of every error of the library; `bad_input`
                         decides a script's exit code), CheckpointError

Dependencies: fileio <- models <- quant <- lora <- data <- train <- cli, demo <- examples.
"""

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)
