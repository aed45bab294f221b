"""Hostile or damaged weight files are refused with one CheckpointError naming the file and the
tensor, exactly where the safetensors library itself refuses them (the reference), and weights
that would poison training (NaN/Inf, integer norms) are refused at load."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.qwen import CheckpointError, load
from tests.helpers import save_hf_model, hf_model


@pytest.fixture
def ckpt(tmp_path):
    return save_hf_model(hf_model("qwen2", seed=3), tmp_path / "m")


def _header(file):
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(file, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _reference_refuses(file) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return False
    except (SafetensorError, Exception):
        return True


def _shift_one(header):
    """Move one tensor's byte range by 4 bytes (overlapping its neighbour)."""
    key = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
    b, e = header[key]["data_offsets"]
    header[key]["data_offsets"] = [b + 4, e + 4]
    return key


def _share_bytes(header):
    """Point a second tensor of the same size at the first one's bytes."""
    entries = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    sizes = {}
    for k in entries:
        b, e = header[k]["data_offsets"]
        if e - b in sizes:
            header[k]["data_offsets"] = list(header[sizes[e - b]]["data_offsets"])
            return k
        sizes[e - b] = k
    raise AssertionError("no two tensors of one size")


def _unknown_dtype(header):
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "F8_E4M3X"
    return key


@pytest.mark.parametrize("damage", [_shift_one, _share_bytes, _unknown_dtype], ids=["shifted", "shared", "dtype"])
def test_headers_the_format_forbids_are_refused_like_safetensors_does(ckpt, damage):
    file = ckpt / "model.safetensors"
    header, data = _header(file)
    key = damage(header)
    _write(file, header, data)
    assert _reference_refuses(file)   # the safetensors library refuses this file too
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}'|model\.safetensors: .*{key}"):
        load(ckpt)


def test_trailing_bytes_are_refused(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes() + b"\0" * 8)
    assert _reference_refuses(file)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load(ckpt)


def test_shard_index_may_not_leave_the_folder(tmp_path):
    ref = hf_model("qwen2", seed=3, tie_word_embeddings=False)
    root = save_hf_model(ref, tmp_path / "m", max_shard_size="40KB")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"].values()))
    (tmp_path / "outside.safetensors").write_bytes((root / first).read_bytes())
    index["weight_map"] = {k: ("../outside.safetensors" if v == first else v) for k, v in index["weight_map"].items()}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard '\.\./outside\.safetensors' lies outside the model folder"):
        load(root)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_base_weight_is_refused_naming_it(ckpt, value):
    file = ckpt / "model.safetensors"
    state = load_file(file)
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = value
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' holds 1 NaN or Inf"):
        load(ckpt)


def test_integer_norm_weight_is_refused_naming_it(ckpt):
    file = ckpt / "model.safetensors"
    state = load_file(file)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is int32, expected a floating-point weight"):
        load(ckpt)
