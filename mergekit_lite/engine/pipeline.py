"""The merge loop's two helper threads: one reads the next pieces' inputs, one writes finished pieces.

With the main thread computing, reading, arithmetic and writing then run at the same time on different
cores: positional reads and writes, torch conversions and the CRC (output/crc.py) all release the GIL. Profiled on
3 x 1B bf16 inputs, copying the output into the page cache (``pwrite``) alone cost about a third of all CPU
time, as much as the arithmetic, so it must not sit on the computing thread. Both threads work within
byte budgets, so memory stays bounded by a few pieces whatever the model or shard size. A third thread
(``ReadAhead``) asks the kernel for the inputs of the pieces after the reader's, so that inputs not in the
page cache come from the disk many requests at a time: a cold 3 x 3B task arithmetic merge took 15.9-17.2 s
with it against 22.5-24.8 s without (alternated), a warm one the same time.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, Optional, Sequence, TypeVar

import torch

from ..output.crc import crc32
from ..output.writer import ShardRecord, ShardWriter
from ..safetensors_format import tensor_bytes

Piece = TypeVar("Piece")
READ_AHEAD = 256 << 20   # bytes of input asked of the kernel ahead of the reader (ReadAhead)


class Reader(Generic[Piece]):
    """Loads the next pieces in a background thread, in order, within a byte budget.

    ``load(piece)`` returns the piece's input tensors; ``cost(piece)`` is the bytes they occupy. The budget
    is the largest piece's cost plus a little (at most 64 MiB) so that, while the largest piece is merged,
    only small ones are read ahead (256 MiB cost 3 x 1B TIES 100 MB of peak RSS and no measurable time).
    """

    def __init__(self, pieces: Sequence[Piece], load: Callable[[Piece], list[torch.Tensor]],
                 cost: Callable[[Piece], int], will_read: Optional[Callable[[Piece], None]] = None):
        self._pieces = list(pieces)
        self._load = load
        self._cost = [cost(p) for p in self._pieces]
        self._ahead = ReadAhead(self._pieces, self._cost, will_read) if will_read is not None else None
        largest = max(self._cost, default=0)
        self._budget = largest + min(largest, 64 << 20)
        self._used = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mergekit-lite-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for piece, cost in zip(self._pieces, self._cost):
            with self._cond:
                while not self._stopped and self._used and self._used + cost > self._budget:
                    self._cond.wait()
                if self._stopped:
                    return
                self._used += cost
            if self._ahead is not None:
                self._ahead.reading(cost)
            try:
                item = (piece, cost, self._load(piece))
            except BaseException as exc:  # handed to the main thread, which raises it
                self._queue.put(exc)
                return
            self._queue.put(item)

    def __iter__(self) -> Iterator[tuple[Piece, list[torch.Tensor]]]:
        for _ in self._pieces:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            piece, cost, loaded = item
            yield piece, loaded
            with self._cond:   # the consumer is done with this piece's inputs
                self._used -= cost
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._ahead is not None:
            self._ahead.stop()


class ReadAhead(Generic[Piece]):
    """Asks the kernel for the inputs of the pieces after the one the reader reads, up to ``window`` bytes ahead.

    The reader reads one piece at a time, and a tensor's bytes that are not in the page cache then come from the
    disk one request after another (on a cold 3B merge, most of the run). ``will_read(piece)`` tells the kernel
    (``Checkpoint.will_read``: posix_fadvise WILLNEED) to read a piece's bytes into the page cache with many
    requests in flight; a thread of its own makes the calls, since they wait while the device's queue is full.
    Nothing is held but the page cache, which the kernel reclaims as ever; ``window`` keeps the pages asked for
    few enough to be read before they are reclaimed. Pages already cached cost a lookup (2 GB in 30 ms)."""

    def __init__(self, pieces: Sequence[Piece], cost: Sequence[int], will_read: Callable[[Piece], None],
                 window: Optional[int] = None):
        self._pieces, self._cost, self._will_read = pieces, cost, will_read
        self._window = READ_AHEAD if window is None else window
        self._read = 0          # bytes of the pieces the reader has started
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mergekit-lite-read-ahead", daemon=True)
        self._thread.start()

    def reading(self, cost: int) -> None:
        """The reader starts a piece of ``cost`` bytes."""
        with self._cond:
            self._read += cost
            self._cond.notify()

    def _run(self) -> None:
        asked = 0   # bytes of the pieces asked for (or passed: the reader got there first)
        for piece, cost in zip(self._pieces, self._cost):
            with self._cond:
                while not self._stopped and asked - self._read >= self._window:
                    self._cond.wait()
                if self._stopped:
                    return
                behind = asked + cost <= self._read   # the reader has started it: too late to ask
            asked += cost
            if not behind:
                try:
                    self._will_read(piece)
                except Exception:   # noqa: BLE001 - a hint only: the reader reads as before
                    return

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()


class WriteBehind:
    """Writes finished pieces into their shards in a background thread, in the order they are handed over;
    closes (fsyncs) each shard when its last byte is written and reports it to ``on_shard``.

    At most ``budget`` bytes wait (or one piece, if it is larger). An error in the thread is raised in the
    caller at its next ``put`` or at ``finish``.
    """

    def __init__(self, on_shard: Optional[Callable[[ShardRecord], None]] = None, budget: int = 128 << 20):
        self._on_shard = on_shard
        self._budget = budget
        self._waiting = 0
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._error: Optional[BaseException] = None
        self._open: set[ShardWriter] = set()
        self._thread = threading.Thread(target=self._run, name="mergekit-lite-writer", daemon=True)
        self._thread.start()

    def put(self, writer: ShardWriter, name: str, tensor: torch.Tensor, rows: Optional[tuple[int, int]],
            written: Optional[Callable[[int, int], None]] = None) -> None:
        """Queue a piece for writing. ``written(crc, nbytes)``, if given, gets the CRC-32 of its bytes once they
        are written (in the writer thread, in order, before its shard is reported)."""
        nbytes = tensor.numel() * tensor.element_size()
        with self._cond:
            while self._error is None and self._waiting and self._waiting + nbytes > self._budget:
                self._cond.wait()
            self._raise()
            self._waiting += nbytes
            self._open.add(writer)
        self._queue.put((writer, name, tensor, rows, nbytes, written))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            writer, name, tensor, rows, nbytes, written = item
            try:
                if self._error is None:
                    crc = writer.write(name, tensor, rows)
                    if written is not None:   # the writer's CRC, or (written out of order) one computed here
                        written(crc32(tensor_bytes(tensor)) if crc is None else crc, nbytes)
                    if writer.complete:
                        self._open.discard(writer)
                        record = writer.close()
                        if self._on_shard is not None:
                            self._on_shard(record)
            except BaseException as exc:
                self._error = exc
            del tensor, item
            with self._cond:
                self._waiting -= nbytes
                self._cond.notify_all()

    def finish(self) -> None:
        """Wait until everything handed over is written; raise the thread's error, if any."""
        self._queue.put(None)
        self._thread.join()
        with self._cond:
            self._raise()

    def abort(self) -> None:
        """Stop after the current write and close the unfinished shards (left incomplete)."""
        with self._cond:
            if self._error is None:
                self._error = RuntimeError("aborted")
            self._cond.notify_all()
        self._queue.put(None)
        self._thread.join()
        for writer in self._open:
            writer.abort()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error
