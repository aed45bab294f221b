"""models.qwen.cpu_fast_paths: reused CPU temporaries and the shared cast of one input."""

from __future__ import annotations

import torch

from models.qwen.cpu_fast_paths import cast_shared, scratch


def test_scratch_reuses_one_buffer_per_slot_and_grows():
    a = scratch((4, 8), torch.float32, torch.device("cpu"), "test.a")
    b = scratch((2, 8), torch.float32, torch.device("cpu"), "test.a")
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8) and b.is_contiguous()
    other = scratch((4, 8), torch.float32, torch.device("cpu"), "test.b")
    assert other.data_ptr() != a.data_ptr()  # another slot: other memory
    assert scratch((4, 8), torch.bfloat16, torch.device("cpu"), "test.a").data_ptr() != a.data_ptr()
    big = scratch((64, 8), torch.float32, torch.device("cpu"), "test.a")
    assert big.shape == (64, 8) and big.numel() == 512
    assert scratch((4, 8), torch.float32, torch.device("cpu"), "test.a").data_ptr() == big.data_ptr()


def test_scratch_off_the_cpu_is_a_fresh_tensor():
    a = scratch((4, 8), torch.float32, torch.device("meta"), "test.meta")
    b = scratch((4, 8), torch.float32, torch.device("meta"), "test.meta")
    assert a is not b and a.device.type == "meta"
    x = torch.empty(2, 3, 8, dtype=torch.bfloat16, device="meta")  # off the CPU a cast is a plain cast
    cast = cast_shared(x, torch.float32, "test.meta")
    assert cast.shape == (6, 8) and cast.dtype == torch.float32 and cast.device.type == "meta"
    assert cast_shared(x, torch.float32, "test.meta") is not cast  # nothing memoised


def test_cast_shared_computes_once_per_unchanged_input():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    first = cast_shared(x, torch.float32, "test.cast")
    assert first.shape == (6, 8) and torch.equal(first, x.reshape(6, 8).float())
    again = cast_shared(x, torch.float32, "test.cast")
    assert again is first  # the same input: no second cast
    x.mul_(2)  # an in-place change bumps the version: the cast must be redone
    changed = cast_shared(x, torch.float32, "test.cast")
    assert torch.equal(changed, x.reshape(6, 8).float())
    y = x.clone()  # equal values, another tensor: cast again (identity, not value, is the key)
    assert torch.equal(cast_shared(y, torch.float32, "test.cast"), y.reshape(6, 8).float())
    assert cast_shared(x.float(), torch.float32, "test.cast").dtype == torch.float32  # same dtype: a view


def test_cast_shared_input_of_the_same_dtype_is_a_view():
    x = torch.randn(3, 4)
    assert cast_shared(x, torch.float32, "test.cast").data_ptr() == x.data_ptr()
