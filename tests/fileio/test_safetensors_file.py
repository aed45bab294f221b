"""fileio/safetensors_file.py: the one reader and writer, checked against the safetensors library
(the reference: files we write it reads back exactly, files it writes we read back exactly)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load as st_load, load_file as st_load_file, save_file as st_save_file

from fileio.errors import CheckpointError
from fileio.safetensors_file import (
    SafetensorsWriter, file_slices, load_tensors, tensors_from_bytes, tensors_to_bytes, write_streamed, write_tensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.transposed": torch.randn(3, 5, generator=g).t(),    # not contiguous
        "ids": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
    }


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_files_we_write_read_back_exactly_with_the_safetensors_library(tmp_path):
    t = _tensors()
    write_tensors(t, tmp_path / "a.safetensors", metadata={"format": "pt"})
    _assert_same(st_load_file(str(tmp_path / "a.safetensors")), t)
    _assert_same(st_load(tensors_to_bytes(t)), t)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o666 & ~_umask()
    assert os.listdir(tmp_path) == ["a.safetensors"]   # the staged sibling was renamed into place


def test_files_the_library_writes_read_back_whole_by_name_and_by_rows(tmp_path):
    t = _tensors()
    st_save_file({k: v.contiguous() for k, v in t.items()}, str(tmp_path / "b.safetensors"))
    _assert_same(load_tensors(tmp_path / "b.safetensors"), t)
    _assert_same(tensors_from_bytes((tmp_path / "b.safetensors").read_bytes()), t)
    pieces = file_slices(tmp_path / "b.safetensors")
    w = t["w.transposed"]
    for start, stop in ((1, 3), (0, None), (3, 99), (None, 2)):
        assert torch.equal(pieces["w.transposed"].read(start, stop), w[start:stop])
    assert torch.equal(pieces["scalar"].read(), t["scalar"])


def test_rewriting_a_file_gives_the_same_bytes(tmp_path):
    write_tensors(_tensors(), tmp_path / "a.safetensors")
    write_tensors(load_tensors(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_streamed_rows_and_copied_slices_make_one_file(tmp_path):
    t = _tensors()
    write_tensors(t, tmp_path / "src.safetensors")
    src = file_slices(tmp_path / "src.safetensors")
    big = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    with SafetensorsWriter(tmp_path / "out.safetensors", [("big", torch.float32, (6, 4)), ("ids", "I64", (7,))]) as w:
        w.write("big", big[:4])
        w.write("big", big[4:])
        w.copy("ids", src["ids"])
    _assert_same(st_load_file(str(tmp_path / "out.safetensors")), {"big": big, "ids": t["ids"]})
    write_streamed({"half": src["half"], "more": big}, tmp_path / "mixed.safetensors")
    _assert_same(st_load_file(str(tmp_path / "mixed.safetensors")), {"half": t["half"], "more": big})


def test_an_incomplete_or_misordered_write_leaves_no_file(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(RuntimeError, match="expected 'a'"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed before 'b' was written"):
        w.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:5], "shorter than its 8-byte header length"),
    (lambda raw: raw[:-1], "truncated or padded"),
    (lambda raw: raw + b"\0", "truncated or padded"),
    (lambda raw: raw.replace(b'"F32"', b'"F99"', 1), "has dtype 'F99'"),
])
def test_a_damaged_file_is_one_error_naming_it(tmp_path, damage, message):
    st_save_file({"x": torch.ones(4), "y": torch.zeros(2)}, str(tmp_path / "ok.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage((tmp_path / "ok.safetensors").read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        load_tensors(bad)
    assert str(bad) in str(info.value)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
