"""Vocabulary extension: mine domain tokens with sentencepiece, add them, train their rows.

    from data import vocab
    report = vocab.mine_tokens(texts, tok, max_tokens=32)       # or vocab.measure_tokens(texts, tok, [...])
    print(report.table())                                       # token, frequency, Qwen pieces before, saving
    ext = vocab.add_tokens(model, tok, report.tokens)           # padding rows first, mean-of-pieces init
    lora.inject(model, r=16, alpha=16)
    vocab.train_new_rows(model, ext.ids)                        # only the new rows train; old rows bit-identical
    ... train ...
    vocab.merge(model)                                          # rows folded in, LoRA merged
    save(model, "out/merged", tokenizer=ext.tokenizer)          # ours and transformers load it, same ids

New tokens are *text tokens* of the tokenizer (`Tokenizer.with_added_tokens`): matched in the
text before BPE, like Qwen's added tokens, saved in tokenizer.json / tokenizer_config.json
(`added_tokens`, normalized=True, special=False) and loaded with the same ids by transformers.
The other way to train them: `lora.inject(..., modules_to_save=["embed_tokens", "lm_head"])`
(full trainable copies of both matrices, all rows change; PEFT's adapter format).
"""

from .mine import (
    MinedToken,
    MiningReport,
    count_tokens,
    measure_tokens,
    mine_tokens,
    sentencepiece_pieces,
)
from .rows import ROW_MULTIPLE, VocabExtension, add_tokens, extend_model, rows_for
from .subset import RemappedDataset, compact_logit_offset, compact_rows, compact_table, expand_vocabulary, used_ids
from lora.new_rows import (
    NEW_ROWS_FILE,
    NewRowsEmbedding,
    NewRowsHead,
    load_new_rows,
    merge,
    merge_new_rows,
    new_row_modules,
    new_rows_state_dict,
    save_new_rows,
    train_new_rows,
)

__all__ = [
    "MinedToken", "MiningReport", "mine_tokens", "measure_tokens", "count_tokens",
    "sentencepiece_pieces",
    "ROW_MULTIPLE", "VocabExtension", "add_tokens", "extend_model", "rows_for",
    "used_ids", "compact_rows", "compact_logit_offset", "compact_table", "RemappedDataset", "expand_vocabulary",
    "NEW_ROWS_FILE", "NewRowsEmbedding", "NewRowsHead", "train_new_rows", "merge_new_rows", "merge",
    "new_row_modules", "new_rows_state_dict", "save_new_rows", "load_new_rows",
]
