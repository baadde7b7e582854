"""TensorBoard event files, written by hand: no TensorFlow or tensorboard import at run time.

An event file is a sequence of TFRecords, each framing one serialized ``Event`` proto:

    uint64 length (LE) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

The protobuf fields used (from tensorflow/core/util/event.proto and summary.proto):
``Event{wall_time=1 double, step=2 int64, file_version=3 string, summary=5 Summary}``,
``Summary{value=1 repeated Value}``, ``Value{tag=1 string, simple_value=2 float}``.
The first record names the format, ``file_version = "brain.Event:2"``.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Mapping

from orchestrator.checkpoint.crc import masked_crc32c
from orchestrator.errors import InvalidArgumentError

FILE_VERSION = "brain.Event:2"

# wire types
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(payload)) + payload


def encode_scalar_value(tag: str, value: float) -> bytes:
    """``Summary.Value{tag, simple_value}``."""
    return _len_delimited(1, tag.encode("utf-8")) + _key(2, _FIXED32) + struct.pack("<f", value)


def encode_event(wall_time: float, step: int | None = None, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """One serialized ``Event``; ``scalars`` become its ``Summary`` values."""
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
    if step is not None:
        out += _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        out += _len_delimited(3, file_version.encode("utf-8"))
    if scalars:
        summary = b"".join(_len_delimited(1, encode_scalar_value(t, v)) for t, v in scalars.items())
        out += _len_delimited(5, summary)
    return out


def frame_record(data: bytes) -> bytes:
    """TFRecord framing of one record."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


class EventFileWriter:
    """Appends scalar summaries to ``<logdir>/events.out.tfevents.<time>.<host>.<pid>``.

    Each ``add_scalars`` call is flushed, so a TensorBoard watching the directory sees
    the curve while the run goes on. Safe to call from several threads.
    """

    def __init__(self, logdir: str, clock=time.time):
        os.makedirs(logdir, exist_ok=True)
        self._clock = clock
        name = f"events.out.tfevents.{int(clock())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._lock = threading.Lock()
        self._write(encode_event(clock(), step=0, file_version=FILE_VERSION))

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One event at ``step`` holding every ``tag -> value`` of ``scalars``."""
        if scalars:
            self._write(encode_event(self._clock(), step=step, scalars={t: float(v) for t, v in scalars.items()}))

    def _write(self, event: bytes) -> None:
        with self._lock:
            if self._file.closed:
                raise InvalidArgumentError(f"event file {self.path} is closed")
            self._file.write(frame_record(event))
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
