#!/usr/bin/env python
"""Checkpoint save/load throughput against raw file I/O and TensorFlow.

Writes and reads ``--size-mb`` of float32 tensors (``--tensors`` of equal size) in a
temp dir on local disk, three ways, interleaved in every repeat (order rotated):

- raw: one file, sequential ``write`` of each tensor's buffer, then ``fsync``; read
  back with ``readinto`` into a fresh array per tensor, no checking. The floor any
  format pays.
- ours: ``write_checkpoint`` (data file and index fsync'd) / ``load_checkpoint`` +
  ``get_tensor`` of every tensor (CRC checked).
- tf: ``tf.train.Checkpoint.write`` then an fsync of every file it wrote (inside the
  timed region, so it is as durable as the others) / ``Checkpoint.read`` into the
  same variables.

Loads are timed "warm" (right after the save, pages cached) and "cold" (after
``posix_fadvise(DONTNEED)`` on every file, which evicts its clean pages), the same
for all three. Raw and ours drop each array before reading the next, and TF reads
into variables that already exist, so no contender times fresh-memory page faults:
on a VM with lazily backed memory those cost more than the I/O and land at random.
Throughput is the best of ``--repeats`` (the median is printed too), in GB/s (1e9 B/s).

After raw's warm read, raw's file is read once more with every byte CRC32C-checked
and no format at all (``VerifiedRead``, "raw+crc"): the ceiling of any verified
load on this machine, so ``raw+crc / raw`` is what checking every byte costs.

    python scripts/bench_checkpoint.py --size-mb 1024 --repeats 7
"""

from __future__ import annotations

import argparse
import gc
import glob
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.checkpoint import crc  # noqa: E402
from orchestrator.checkpoint.reader import load_checkpoint, read_threads  # noqa: E402
from orchestrator.checkpoint.writer import write_checkpoint  # noqa: E402

PHASES = ("save", "load_warm", "load_cold")
TARGET_VS_RAW = 0.9
TARGET_VS_TF = 1.5


@dataclass
class Timings:
    """Wall and process-CPU seconds per phase, one entry per repeat."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})

    verified_warm: list[float] = field(default_factory=list)  # raw only: VerifiedRead's seconds

    def add(self, phase: str, wall_and_cpu: tuple[float, float]) -> None:
        self.seconds[phase].append(wall_and_cpu[0])
        self.cpu[phase].append(wall_and_cpu[1])

    def best(self, phase: str) -> float:
        return min(self.seconds[phase])

    def median(self, phase: str) -> float:
        return statistics.median(self.seconds[phase])


def make_tensors(size_mb: int, count: int) -> dict[str, np.ndarray]:
    """``count`` float32 tensors totalling ``size_mb`` MiB, random so nothing compresses."""
    rng = np.random.default_rng(0)
    elements = size_mb * 1024 * 1024 // 4 // count
    return {f"layer_{i:03d}/kernel": rng.standard_normal(elements, dtype=np.float32) for i in range(count)}


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn``; CPU counts every thread of this process."""
    gc.collect()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def fsync_paths(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(paths) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- the contenders
class Raw:
    name = "raw"

    def __init__(self, directory: str, tensors: dict[str, np.ndarray]):
        self.path = os.path.join(directory, "raw.bin")
        self.tensors = tensors

    def save(self) -> None:
        with open(self.path, "wb", buffering=0) as f:
            for array in self.tensors.values():
                f.write(memoryview(array).cast("B"))
            os.fsync(f.fileno())

    def load(self) -> None:
        with open(self.path, "rb", buffering=0) as f:
            for array in self.tensors.values():
                _read_fresh(f, array)  # dropped before the next is allocated

    def files(self) -> list[str]:
        return [self.path]


def _read_fresh(f, like: np.ndarray) -> np.ndarray:
    out = np.empty_like(like)
    f.readinto(memoryview(out).cast("B"))
    return out


class VerifiedRead:
    """Raw's file read back the fastest way a CRC32C-checked read can be done here.

    No format, no index, no bookkeeping: the reader's threads claim 1 MiB chunks of
    each tensor in turn, ``preadv`` them into a fresh array and checksum them with the
    native CRC32C while the chunk is still in cache. Timed on raw's file right after
    raw's warm reads (same cached pages), it is the ceiling of any verified read on
    this machine: ``raw+crc / raw`` is what checking every byte costs by itself.
    """

    CHUNK = 1 << 20

    def __init__(self, raw: Raw):
        self.raw = raw
        self.threads = read_threads()
        self.native = crc.native_extend()
        if self.native is None:
            raise SystemExit("raw+crc needs the native crc32c library (google-crc32c's bundled libcrc32c)")

    def load(self) -> None:
        fd = os.open(self.raw.path, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(self.threads - 1) as helpers:
                offset = 0
                for array in self.raw.tensors.values():
                    self._read_verified(fd, offset, array.nbytes, helpers)  # its array is dropped, as raw's are
                    offset += array.nbytes
        finally:
            os.close(fd)

    def _read_verified(self, fd: int, offset: int, nbytes: int, helpers: ThreadPoolExecutor) -> None:
        out = np.empty(nbytes, dtype=np.uint8)
        view, address, native, chunk = memoryview(out), out.ctypes.data, self.native, self.CHUNK
        claims = itertools.count()

        def lane() -> None:
            while (start := next(claims) * chunk) < nbytes:
                got = os.preadv(fd, [view[start:start + chunk]], offset + start)
                native(0, address + start, got)

        tasks = [helpers.submit(lane) for _ in range(1, self.threads)]
        lane()
        for task in tasks:
            task.result()


class Ours:
    name = "ours"

    def __init__(self, directory: str, tensors: dict[str, np.ndarray], num_shards: int):
        self.prefix = os.path.join(directory, "ours", "ckpt")
        self.tensors = tensors
        self.num_shards = num_shards

    def save(self) -> None:
        write_checkpoint(self.prefix, self.tensors, num_shards=self.num_shards)

    def load(self) -> None:
        with load_checkpoint(self.prefix) as reader:
            for name in self.tensors:
                reader.get_tensor(name)  # dropped before the next is read, as raw's are

    def files(self) -> list[str]:
        return glob.glob(self.prefix + ".*")


class TensorFlow:
    name = "tf"

    def __init__(self, directory: str, tensors: dict[str, np.ndarray]):
        import tensorflow as tf

        self.tf = tf
        self.prefix = os.path.join(directory, "tf", "ckpt")
        os.makedirs(os.path.dirname(self.prefix), exist_ok=True)
        self.variables = {n.replace("/", "_"): tf.Variable(a) for n, a in tensors.items()}
        self.checkpoint = tf.train.Checkpoint(**self.variables)

    def save(self) -> None:
        self.checkpoint.write(self.prefix)
        fsync_paths(self.files())  # as durable as ours, whatever TF does itself

    def load(self) -> None:
        self.checkpoint.read(self.prefix).assert_existing_objects_matched()

    def files(self) -> list[str]:
        return glob.glob(self.prefix + ".*")


# ---------------------------------------------------------------------------- running
def run_once(contender, timings: Timings) -> None:
    timings.add("save", timed(contender.save))
    timings.add("load_warm", timed(contender.load))
    if isinstance(contender, Raw):
        timings.verified_warm.append(timed(VerifiedRead(contender).load)[0])
    evict(contender.files())
    timings.add("load_cold", timed(contender.load))


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def report(results: dict[str, Timings], nbytes: int, args) -> None:
    gb = nbytes / 1e9

    def rate(name: str, phase: str, best: bool = True) -> float:
        t = results[name].best(phase) if best else results[name].median(phase)
        return gb / t

    print(f"machine: {machine_line()}")
    print(f"data: {args.tensors} float32 tensors, {nbytes / 2**20:.0f} MiB total; ours with "
          f"num_shards={args.num_shards}; {args.repeats} repeats; best (median) throughput in GB/s")
    print("durability: every save fsyncs every file it wrote inside the timed region (ours: "
          "Storage.write_atomic; TF's files: fsync'd by this script right after Checkpoint.write returns)")
    print("cache: load_warm = right after the save (pages cached, same for all); "
          "load_cold = after posix_fadvise(DONTNEED) on every file (same for all)")
    print()
    names = ("raw", "ours", "tf")
    print(f"{'phase':<10} {'raw':>15} {'ours':>15} {'tf':>15} {'ours/raw':>9} {'ours/tf':>8}  verdict")
    failures = 0
    for phase in PHASES:
        cells = [f"{rate(n, phase):6.3f} ({rate(n, phase, False):6.3f})" for n in names]
        vs_raw = rate("ours", phase) / rate("raw", phase)
        vs_tf = rate("ours", phase) / rate("tf", phase)
        ok = vs_raw >= TARGET_VS_RAW and vs_tf >= TARGET_VS_TF
        failures += not ok
        verdict = "meets targets" if ok else f"MISSES (targets >= {TARGET_VS_RAW}x raw, >= {TARGET_VS_TF}x tf)"
        print(f"{phase:<10} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {vs_raw:8.2f}x {vs_tf:7.2f}x  {verdict}")
    print()
    print("all targets met" if failures == 0 else f"{failures} phase(s) miss a target")
    verified = gb / min(results["raw"].verified_warm)
    print(f"raw+crc, warm: {verified:.3f} GB/s = {verified / rate('raw', 'load_warm'):.2f}x raw: raw's file read "
          f"with every byte CRC32C-checked on {read_threads()} threads and no format, the ceiling of any verified "
          f"load here; ours reached {rate('ours', 'load_warm') / verified:.2f}x of it")
    print()
    print("process CPU seconds per GiB (median; all threads; less sensitive to other load than wall time):")
    gib = nbytes / 2**30
    for phase in PHASES:
        cells = "  ".join(f"{n} {statistics.median(results[n].cpu[phase]) / gib:5.2f}" for n in names)
        print(f"  {phase:<10} {cells}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="total MiB of float32 tensors")
    parser.add_argument("--tensors", type=int, default=64, help="number of equal-size tensors")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-shards", type=int, default=1, help="data files of our checkpoint")
    parser.add_argument("--dir", default=None, help="parent of the temp dir (local disk)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tensors = make_tensors(args.size_mb, args.tensors)
    nbytes = sum(a.nbytes for a in tensors.values())
    directory = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir)
    try:
        contenders = [Raw(directory, tensors), Ours(directory, tensors, args.num_shards),
                      TensorFlow(directory, tensors)]
        results = {c.name: Timings() for c in contenders}
        load_before = os.getloadavg()[0]
        for repeat in range(args.repeats):
            shift = repeat % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:  # rotate: no position bias
                run_once(contender, results[contender.name])
                clean_contender(contender)
            seconds = {n: [round(t.seconds[p][-1], 2) for p in PHASES] for n, t in results.items()}
            print(f"repeat {repeat + 1}/{args.repeats}: seconds (save, load_warm, load_cold) {seconds}")
        report(results, nbytes, args)
        print(f"load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs (other work on the machine skews 'median' more than 'best')")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def clean_contender(contender) -> None:
    for path in contender.files():
        os.remove(path)


if __name__ == "__main__":
    sys.exit(main())
