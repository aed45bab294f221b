"""Training data: CPT packing and SFT chat encoding with label masks, mixing, resumable loading.

    import data
    ids, labels = data.encode_chat(example, tok, max_len=1024)         # SFT sample
    sft = data.SFTDataset("train.jsonl", tok, max_len=1024)            # alpaca / messages (+ tools) / ShareGPT
    corpus = data.load_corpus(["papers/"], tok)                        # cached uint32 tokens
    train_docs, val_docs = corpus.split(val_fraction=0.01, seed=0)
    blocks = data.pack_documents(train_docs, block_size=2048)          # CPT blocks, document masking
    mixed = data.MixedDataset([general, domain], ratios=[1, 1])        # mix by tokens
    loader = data.DataLoader(blocks, batch_size=4, seed=0)             # deterministic, resumable
    report = data.vocab.mine_tokens(texts, tok)                        # domain tokens (see data/vocab)
    pairs = data.PreferenceDataset("pairs.jsonl", tok, max_len=1024)   # DPO pairs (see data/preference)
    batch = data.preference_collate([pairs[0], pairs[1]])              # chosen rows, then rejected rows
    rows = data.KTODataset("feedback.jsonl", tok, max_len=1024)        # KTO's unpaired rows (see data/kto)
    train, held_out, info = data.sft_datasets(paths, tok, max_len=1024)  # a stage's data (data/build.py)

Batches are dicts of LongTensors [B, T]: input_ids, labels, and optionally position_ids,
document_ids, attention_mask. Bad input raises `data.DataError` naming the file and line (or
is skipped and counted with on_error="skip").
"""

import _qwen_tune

_qwen_tune.claim(__name__)  # our sibling packages, not a user's same-named files (see _qwen_tune)

from .build import (
    StageData,
    cpt_datasets,
    cpt_held_out_documents,
    held_out_questions,
    kto_datasets,
    preference_datasets,
    sft_datasets,
)
from .cache import cache_root
from .collate import IGNORE_INDEX, pad_collate
from .cpt import Corpus, Documents, load_corpus, split_for_encoding, tokenize_file
from .errors import DataError, InputReport
from .kto import KTO_FORMATS, KTODataset, detect_kto_format, kto_collate, to_unpaired, unpair
from .loader import DataLoader
from .mix import MixedDataset
from .packing import PackedDataset, PackedSFTDataset, pack_block, pack_documents
from .preference import (
    PREFERENCE_FORMATS,
    EncodedPair,
    PreferenceDataset,
    detect_preference_format,
    encode_pair,
    pairs_from_sft,
    preference_collate,
    to_preference,
)
from .sft import (
    FORMATS,
    Conversation,
    EncodedChat,
    SFTDataset,
    Subset,
    check_roles,
    detect_format,
    encode_chat,
    encode_chat_detailed,
    to_conversation,
    to_messages,
)
from .sources import find_files
from . import vocab

__all__ = [
    "cache_root", "IGNORE_INDEX", "PackedSFTDataset", "pad_collate", "Corpus", "Documents", "PackedDataset",
    "load_corpus", "pack_documents", "pack_block", "split_for_encoding", "tokenize_file", "DataError", "InputReport", "DataLoader",
    "MixedDataset", "FORMATS", "Conversation", "EncodedChat", "SFTDataset", "Subset", "check_roles", "detect_format",
    "encode_chat", "encode_chat_detailed", "to_conversation", "to_messages", "find_files", "vocab", "PREFERENCE_FORMATS",
    "EncodedPair", "PreferenceDataset", "detect_preference_format", "encode_pair", "pairs_from_sft",
    "preference_collate", "to_preference", "StageData", "cpt_datasets", "cpt_held_out_documents", "sft_datasets",
    "preference_datasets", "held_out_questions", "kto_datasets", "KTO_FORMATS", "KTODataset", "detect_kto_format",
    "kto_collate", "to_unpaired", "unpair",
]
