"""Resuming an interrupted merge: ``merge run SPEC -o OUT --resume``.

Every merge keeps a journal in its partial folder (``OUT.partial/.mergekit_lite-journal.jsonl``). Its first
line says which merge the folder belongs to: a fingerprint of the plan (every output tensor's sources with
their offsets, sizes and dtypes from the inputs' safetensors headers, parameters, shapes and dtypes; the shard
layout; the seed, the device type and the mergekit_lite version), plus the identity of every file in the input
folders (device, inode, size, modification and change times). Each later line records one finished shard
(file, size, CRC-32, and the CRC-32 of every input byte read to compute it), appended only after the shard was
flushed to disk, so a merge killed at any moment (Ctrl-C, ``kill -9``, power loss) leaves a journal that lists
only complete shards; a torn last line is ignored.

On ``--resume`` the fingerprint must match (a different spec, inputs or options are refused with an error:
mixing shards of two merges would be a silently wrong model), and every recorded shard is verified (size
and CRC-32). Inputs are identified by content: where an input folder's files are not exactly the files the
interrupted run started with (another inode, size, or change time: a file rewritten in place or replaced, even
with the same size and modification time), the kept shards computed from it have their inputs read again and
their CRC-32 compared with the recorded one; a shard whose inputs changed is computed again, with a warning.
Unchanged inputs are not read again, so resuming stays cheap. Everything else is computed again. The journal is
removed before the output is renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
from typing import Iterable, Optional, Sequence

import torch

from .. import __version__
from ..dtypes import dtype_name
from ..errors import OutputError, UsageError
from ..plan.jobs import TensorJob
from ..plan.planner import MergePlan
from ..plan.shards import ShardPlan, file_order
from ..safetensors_format import tensor_bytes
from .crc import crc32, crc32_combine
from .folder import LEFTOVER, MARKER, append_to, fsync_dir, now, read_marker, write_new
from .writer import ShardRecord, file_crc32

JOURNAL = ".mergekit_lite-journal.jsonl"
MAX_JOURNAL_BYTES = 64 << 20     # a line per shard (~150 bytes) and the input files' identities
READ_BLOCK = 64 << 20            # bytes of an input read at a time when checking a kept shard's inputs
log = logging.getLogger("mergekit_lite")
Identity = dict[str, dict[str, list[int]]]   # input folder -> file name -> [dev, inode, size, mtime_ns, ctime_ns]


def fingerprint(plan: MergePlan, layout: Sequence[ShardPlan], device: torch.device) -> str:
    """A digest of everything that decides the output's bytes (not of the spec's wording or comments)."""
    jobs = []
    for job in plan.jobs:
        sources = [[s.info.path, s.name, s.info.start, s.info.nbytes, dtype_name(s.info.dtype),
                    *([s.digest] if hasattr(s, "digest") else [])] for s in job.sources]   # a tokenizer remap's
        jobs.append([job.name, list(job.shape), dtype_name(job.dtype), dtype_name(job.merge_dtype),
                     job.load_dtype and dtype_name(job.load_dtype), job.strategy.name,
                     sorted((k, repr(v)) for k, v in job.params.items()), job.layer, repr(job.t), job.copy,
                     sources, job.base is not None])
    content = {"version": __version__, "seed": plan.seed, "device": device.type, "jobs": jobs,
               "layout": [[s.file, [e.name for e in s.entries]] for s in layout]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def input_identity(plan: MergePlan) -> Identity:
    """Every file in every input folder as the kernel identifies it (links followed: a Hub cache snapshot's
    files are links to its blobs). Rewriting a file updates its change time, which no user can set back."""
    identity: Identity = {}
    for checkpoint in plan.checkpoints.values():
        for folder in checkpoint.folders:
            if folder in identity:
                continue
            files = identity[folder] = {}
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                try:
                    info = entry.stat()
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    files[entry.name] = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
    return identity


class InputChecksums:
    """The CRC-32 of every input tensor's bytes as the engine reads them (row blocks in order), combined per
    output shard: what the journal records, so that ``--resume`` can tell an input whose content changed.
    ``add`` runs in the reader thread (and for inputs computed on a merging thread, a LoRA fold, in the loop's
    thread, in row order), ``shard`` in the writer thread once the shard's tensors are written."""

    def __init__(self) -> None:
        self._crcs: dict[str, list[int]] = {}

    def add(self, job: TensorJob, raw: Sequence[Optional[torch.Tensor]]) -> None:
        crcs = self._crcs.setdefault(job.name, [0] * len(raw))
        for i, tensor in enumerate(raw):
            if tensor is not None:   # None: this input's bytes are added later (the merge loop's deferred folds)
                crcs[i] = crc32(tensor_bytes(tensor), crcs[i])

    def add_crc(self, job: TensorJob, index: int, crc: int, nbytes: int, inputs: int = 1) -> None:
        """Add the CRC-32 of the next ``nbytes`` of input ``index`` of ``job``, computed elsewhere: by the shard
        writer, for an input written exactly as it was read (a LoRA fold), so its bytes are checksummed once."""
        crcs = self._crcs.setdefault(job.name, [0] * inputs)
        crcs[index] = crc32_combine(crcs[index], crc, nbytes)

    def shard(self, shard: ShardPlan) -> int:
        return combine(self._crcs.pop(e.name, []) for e in file_order(shard.entries))


def combine(per_job: Iterable[list[int]]) -> int:
    crc = 0
    for crcs in per_job:
        for value in crcs:
            crc = crc32(value.to_bytes(4, "little"), crc)
    return crc


def read_checksums(job: TensorJob) -> list[int]:
    """What ``InputChecksums.add`` computes for a job, from reading its inputs again (in blocks of rows)."""
    crcs = []
    for source in job.sources:
        shape, crc = source.info.shape, 0
        if not shape or not shape[0]:
            crc = crc32(tensor_bytes(source.read()))
        else:
            step = max(1, READ_BLOCK // max(1, source.info.nbytes // shape[0]))
            for start in range(0, shape[0], step):
                rows = (start, min(start + step, shape[0]))
                crc = crc32(tensor_bytes(source.read(rows)), crc)
        crcs.append(crc)
    return crcs


class Journal:
    """The partial folder's record of finished shards; ``record`` may be called from any thread."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def start(cls, partial: str, digest: str, spec_file: Optional[str], started: str,
              inputs: Identity) -> "Journal":
        journal = cls(os.path.join(partial, JOURNAL))
        head = {"merge": digest, "spec": spec_file, "started": started, "inputs": inputs}
        try:
            write_new(journal.path, (json.dumps(head) + "\n").encode(), replace=True)
        except OSError as exc:
            raise journal._error(exc) from None
        fsync_dir(partial)
        return journal

    def record(self, shard: ShardRecord) -> None:
        line = json.dumps({"file": shard.file, "size": shard.size, "crc32": shard.crc32, "inputs": shard.inputs})
        with self._lock:
            try:
                append_to(self.path, (line + "\n").encode())
            except OSError as exc:
                raise self._error(exc) from None

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write the journal of finished shards: {exc.strerror}", file=self.path,
                           hint=f"free some disk space and run again ({LEFTOVER})" if exc.errno == errno.ENOSPC else
                           "check the permissions of the output folder")

    def remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def open_journal(partial: str, plan: MergePlan, layout: Sequence[ShardPlan], device: torch.device,
                 resume: bool) -> tuple[Journal, dict[str, ShardRecord]]:
    """The journal to record this merge's shards in, and the shards already done (verified; ``resume`` only).

    Without ``resume`` the partial folder is new and nothing is done yet.
    """
    digest = fingerprint(plan, layout, device)
    started = (read_marker(partial) or {}).get("started") or now()
    identity = input_identity(plan)
    if not resume or set(os.listdir(partial)) <= {MARKER}:
        return Journal.start(partial, digest, plan.spec.file, started, identity), {}
    _refuse_links(partial)
    head, records = _read(os.path.join(partial, JOURNAL), partial)
    if head.get("merge") != digest:
        begun = f" (started {head['started']} from {head.get('spec') or 'a spec'})" if head.get("started") else ""
        raise UsageError(f"the partial output belongs to a different merge{begun}: the spec, the inputs, "
                         "the options or the mergekit_lite version differ", file=partial,
                         hint="resume with exactly the same spec, inputs and options, or run with --overwrite instead "
                              "of --resume to start over (the partial folder is replaced)")
    planned = {shard.file for shard in layout}
    done = {}
    for record in records.values():
        if record.file in planned and _intact(os.path.join(partial, record.file), record):
            done[record.file] = record
        else:
            log.warning("%s changed after it was recorded as finished; computing it again", record.file)
    before = head.get("inputs")
    done = _same_inputs(plan, layout, done, before if isinstance(before, dict) else {}, identity)
    journal = Journal.start(partial, digest, plan.spec.file, started, identity)   # with the shards that are kept
    for record in done.values():
        journal.record(record)
    log.info("resuming: %d of %d shards verified and kept", len(done), len(layout))
    return journal, done


def _same_inputs(plan: MergePlan, layout: Sequence[ShardPlan], done: dict[str, ShardRecord], before: dict,
                 identity: Identity) -> dict[str, ShardRecord]:
    """The kept shards whose inputs are what they were computed from: unchanged files, or, in a folder whose
    files changed, the same bytes read again (their CRC-32 as recorded)."""
    changed = {folder for folder in {*before, *identity} if before.get(folder) != identity.get(folder)}
    if not changed:
        return done
    jobs = {job.name: job for job in plan.jobs}
    kept = {}
    for shard in layout:
        record = done.get(shard.file)
        if record is None:
            continue
        shard_jobs = [jobs[e.name] for e in file_order(shard.entries)]
        folders = sorted({f for job in shard_jobs for s in job.sources for f in s.checkpoint.folders} & changed)
        if folders and (record.inputs is None or combine(map(read_checksums, shard_jobs)) != record.inputs):
            log.warning("%s: an input it was computed from changed since the interrupted run (%s); computing it "
                        "again", shard.file, ", ".join(folders))
            continue
        kept[shard.file] = record
    return kept


def _read(path: str, partial: str) -> tuple[dict, dict[str, ShardRecord]]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))   # a FIFO must not block
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a file")
            data = f.read(MAX_JOURNAL_BYTES + 1)
        if len(data) > MAX_JOURNAL_BYTES:
            raise ValueError("too large")
        lines = data.decode("utf-8").split("\n")
        head = json.loads(lines[0])
        if not isinstance(head, dict):
            raise ValueError("not a journal")
    except (OSError, ValueError, IndexError, RecursionError):
        raise UsageError("cannot resume: the partial folder has no readable journal of finished shards "
                         f"({JOURNAL})", file=partial,
                         hint="run without --resume to start over (the partial folder is replaced)") from None
    records: dict[str, ShardRecord] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            inputs = entry.get("inputs")
            records[entry["file"]] = ShardRecord(str(entry["file"]), int(entry["size"]), int(entry["crc32"]),
                                                 inputs if isinstance(inputs, int) else None)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            break   # the last line may be torn by a crash; nothing after it was written
    return head, records


def _refuse_links(partial: str) -> None:
    """A merge never puts a link (symbolic or hard) in its partial folder; resuming through one would read or
    overwrite whatever it points to."""
    for name in sorted(os.listdir(partial)):
        info = os.lstat(os.path.join(partial, name))
        link = "a symbolic link" if stat.S_ISLNK(info.st_mode) else \
            "a file with other hard links" if stat.S_ISREG(info.st_mode) and info.st_nlink > 1 else None
        if link:
            raise UsageError(f"cannot resume: {name} in the partial folder is {link}, which a merge never writes",
                             file=partial, hint="move it out of the partial folder and run again")


def _intact(path: str, record: ShardRecord) -> bool:
    try:
        return os.path.getsize(path) == record.size and file_crc32(path) == record.crc32
    except OSError:
        return False
