"""TensorBoard event files, written by hand (no tensorflow or tensorboard package needed).

    writer = EventWriter("runs/cpt/runs")           # events.out.tfevents.<time>.<host>
    writer.scalars(step, {"train/loss": 2.31, "train/learning_rate": 1e-4}); writer.close()

The format is TFRecord framing around `Event` protocol buffers: each record is
length (uint64 LE), masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes. An
Event holds wall_time (field 1, double), step (2, varint) and either file_version (3, string:
"brain.Event:2", the first record) or a Summary (5) of Values with tag (1) and simple_value
(2, float). The tags follow the HF Trainer's and TRL's: train/loss, train/learning_rate, train/grad_norm,
eval/loss, train/rewards/chosen, eval/rewards/chosen (see train/metrics_log.py).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping, Union


def _crc32c_table() -> list[int]:
    poly = 0x82F63B78   # Castagnoli, reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def event(wall_time: float, step: int, *, file_version: str = "", scalars: Mapping[str, float] = {}) -> bytes:
    """One serialised Event protobuf."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version:
        out += _bytes_field(3, file_version.encode("utf-8"))
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode("utf-8")) + _field(2, 5) + struct.pack("<f", v))
                          for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def record(data: bytes) -> bytes:
    """TFRecord framing of one serialised message."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


class EventWriter:
    """Appends scalar events to one new event file in `log_dir` (created)."""

    def __init__(self, log_dir: Union[str, os.PathLike]):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._file.write(record(event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None}
        if finite:
            self._file.write(record(event(time.time(), step, scalars=finite)))
            self._file.flush()

    def close(self) -> None:
        self._file.close()
