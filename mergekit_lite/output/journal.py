"""Resuming an interrupted merge: ``merge run SPEC -o OUT --resume``.

Every merge keeps a journal in its partial folder (``OUT.partial/.mergekit_lite-journal.jsonl``). Its first
line says which merge the folder belongs to: a fingerprint of the plan (every output tensor's sources,
parameters, shapes and dtypes; the input files' sizes and modification times; the shard layout; the seed,
the device type and the mergekit_lite version). Each later line records one finished shard (file, size,
CRC-32), appended only after the shard was flushed to disk, so a merge killed at any moment (Ctrl-C,
``kill -9``, power loss) leaves a journal that lists only complete shards; a torn last line is ignored.

On ``--resume`` the fingerprint must match (a different spec, inputs or options are refused with an error:
mixing shards of two merges would be a silently wrong model), and every recorded shard is verified (size
and CRC-32) and kept; everything else is computed again. The journal is removed before the output is
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Optional, Sequence

import torch

from .. import __version__
from ..dtypes import dtype_name
from ..errors import UsageError
from ..plan.planner import MergePlan
from ..plan.shards import ShardPlan
from .folder import fsync_dir
from .writer import ShardRecord, file_crc32

JOURNAL = ".mergekit_lite-journal.jsonl"
log = logging.getLogger("mergekit_lite")


def fingerprint(plan: MergePlan, layout: Sequence[ShardPlan], device: torch.device) -> str:
    """A digest of everything that decides the output's bytes (not of the spec's wording or comments)."""
    files: dict[str, list] = {}
    jobs = []
    for job in plan.jobs:
        sources = []
        for source in job.sources:
            info = source.info
            if info.path not in files:
                stat = os.stat(info.path)
                files[info.path] = [stat.st_size, stat.st_mtime_ns]
            sources.append([info.path, source.name, info.start, info.nbytes, dtype_name(info.dtype)])
        jobs.append([job.name, list(job.shape), dtype_name(job.dtype), dtype_name(job.merge_dtype),
                     job.load_dtype and dtype_name(job.load_dtype), job.strategy.name,
                     sorted((k, repr(v)) for k, v in job.params.items()), job.layer, repr(job.t), job.copy,
                     sources, job.base is not None])
    content = {"version": __version__, "seed": plan.seed, "device": device.type, "jobs": jobs,
               "files": sorted(files.items()), "layout": [[s.file, [e.name for e in s.entries]] for s in layout]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class Journal:
    """The partial folder's record of finished shards; ``record`` may be called from any thread."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def start(cls, partial: str, digest: str, spec_file: Optional[str]) -> "Journal":
        journal = cls(os.path.join(partial, JOURNAL))
        head = {"merge": digest, "spec": spec_file, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with open(journal.path, "w", encoding="utf-8") as f:
            f.write(json.dumps(head) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(partial)
        return journal

    def record(self, shard: ShardRecord) -> None:
        line = json.dumps({"file": shard.file, "size": shard.size, "crc32": shard.crc32}) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

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
    path = os.path.join(partial, JOURNAL)
    if not resume or not os.listdir(partial):
        return Journal.start(partial, digest, plan.spec.file), {}
    _refuse_links(partial)
    head, records = _read(path, partial)
    if head.get("merge") != digest:
        started = f" (started {head['started']} from {head.get('spec') or 'a spec'})" if head.get("started") else ""
        raise UsageError(f"the partial output belongs to a different merge{started}: the spec, the inputs, "
                         "the options or the mergekit_lite version differ", file=partial,
                         hint="resume with exactly the same spec, inputs and options, or run without --resume "
                              "to start over (the partial folder is replaced)")
    planned = {shard.file for shard in layout}
    done = {}
    for record in records.values():
        if record.file in planned and _intact(os.path.join(partial, record.file), record):
            done[record.file] = record
        else:
            log.warning("%s changed after it was recorded as finished; computing it again", record.file)
    journal = Journal(path)
    if len(done) != len(records):   # rewrite the journal with the shards that are kept
        journal = Journal.start(partial, digest, plan.spec.file)
        for record in done.values():
            journal.record(record)
    log.info("resuming: %d of %d shards verified and kept", len(done), len(layout))
    return journal, done


def _read(path: str, partial: str) -> tuple[dict, dict[str, ShardRecord]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        head = json.loads(lines[0])
        if not isinstance(head, dict):
            raise ValueError("not a journal")
    except (OSError, ValueError, IndexError):
        raise UsageError("cannot resume: the partial folder has no readable journal of finished shards "
                         f"({JOURNAL})", file=partial,
                         hint="run without --resume to start over (the partial folder is replaced)") from None
    records: dict[str, ShardRecord] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            records[entry["file"]] = ShardRecord(str(entry["file"]), int(entry["size"]), int(entry["crc32"]))
        except (ValueError, KeyError, TypeError):
            break   # the last line may be torn by a crash; nothing after it was written
    return head, records


def _refuse_links(partial: str) -> None:
    """A merge never puts a symbolic link in its partial folder; resuming through one would read or overwrite
    whatever it points to."""
    for name in sorted(os.listdir(partial)):
        if os.path.islink(os.path.join(partial, name)):
            raise UsageError(f"cannot resume: {name} in the partial folder is a symbolic link, which a merge never "
                             "writes", file=partial,
                             hint="run without --resume to start over (the partial folder is replaced)")


def _intact(path: str, record: ShardRecord) -> bool:
    try:
        return os.path.getsize(path) == record.size and file_crc32(path) == record.crc32
    except OSError:
        return False
