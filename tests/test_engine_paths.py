"""The fast paths give the same bytes as the plain ones: cache-sized blocks vs whole tensors, O_DIRECT vs the
page cache, in-order vs out-of-order shard writes; and each shard's CRC-32 is that of its file."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import mergekit_lite.engine.compute as compute
import mergekit_lite.engine.loop as engine
from mergekit_lite import make_plan
from mergekit_lite.engine.compute import merge_blocks, merge_tensor, read_sources
from mergekit_lite.engine.loop import write_shard
from mergekit_lite.output.direct_io import DirectStream
from mergekit_lite.output.writer import ShardWriter
from mergekit_lite.plan.shards import Entry, file_order, output_layout


def specs(root):
    models = [{"model": str(root / n), "parameters": {"weight": w}} for n, w in (("ft-a", 0.6), ("ft-b", [0.1, 0.9]))]
    return {
        "linear, f32 inputs rounded to bf16": {"merge_method": "linear", "models": models, "dtype": "bfloat16"},
        "task arithmetic, f32 out as f16": {"merge_method": "task_arithmetic", "base_model": str(root / "base"),
                                            "models": models, "out_dtype": "float16",
                                            "parameters": {"lambda": 0.8}},
    }


@pytest.mark.parametrize("name", ["linear, f32 inputs rounded to bf16", "task arithmetic, f32 out as f16"])
def test_blocks_equal_whole_tensors(models_f32, monkeypatch, name):
    monkeypatch.setattr(compute, "BLOCK_ELEMENTS", 100)   # many blocks, and a short last one, per tensor
    plan = make_plan(specs(models_f32)[name])
    try:
        for job in plan.jobs:
            whole = merge_tensor(plan, job, read_sources(job), torch.device("cpu"))
            blocked = merge_blocks(plan, job, read_sources(job), job.shape)
            assert blocked.dtype == whole.dtype == job.dtype
            assert torch.equal(blocked.view(torch.uint8), whole.view(torch.uint8)), job.name
    finally:
        plan.close()


def test_write_shard_is_a_unit_of_work(models_bf16, tmp_path):
    """Any shard computed on its own (as a Ray task does) equals the same shard of a whole run."""
    spec = specs(models_bf16)["linear, f32 inputs rounded to bf16"]
    plan = make_plan(spec)
    try:
        layout = output_layout(plan, 60_000)
        whole = tmp_path / "whole"
        whole.mkdir()
        records = []
        engine.write_shards(plan, layout, str(whole), torch.device("cpu"), on_shard=records.append)
        assert len(layout) > 3 and sorted(r.file for r in records) == sorted(s.file for s in layout)
        shard = layout[2]
        record = write_shard(plan, shard, str(tmp_path / "alone.safetensors"), torch.device("cpu"))
        data = (tmp_path / "alone.safetensors").read_bytes()
        assert data == (whole / shard.file).read_bytes()
        assert (record.size, record.crc32) == (len(data), zlib.crc32(data))
        assert {r.file: r.crc32 for r in records}[shard.file] == record.crc32
    finally:
        plan.close()


def tensors_for(entries):
    generator = torch.Generator().manual_seed(0)
    return {e.name: torch.randn(e.shape, generator=generator).to(e.dtype) for e in entries}


ENTRIES = (Entry("a", torch.bfloat16, (3000, 7)), Entry("b", torch.float32, (5, 3)), Entry("c", torch.int64, (11,)),
           Entry("d", torch.bfloat16, (1,)), Entry("e", torch.float16, (4097,)))


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("order", ["file order", "reversed, in row blocks"])
def test_shard_bytes_and_crc_do_not_depend_on_write_path(tmp_path, direct, order):
    tensors = tensors_for(ENTRIES)
    reference = tmp_path / "reference.safetensors"
    writer = ShardWriter(str(reference), ENTRIES, direct=False)
    for entry in file_order(ENTRIES):
        writer.write(entry.name, tensors[entry.name])
    expected = writer.close()
    path = tmp_path / "shard.safetensors"
    writer = ShardWriter(str(path), ENTRIES, direct=direct)
    if order == "file order":
        for entry in file_order(ENTRIES):
            writer.write(entry.name, tensors[entry.name])
    else:
        for entry in reversed(file_order(ENTRIES)):
            if entry.name == "a":
                for start in (2000, 1000, 0):
                    writer.write("a", tensors["a"][start:start + 1000], (start, start + 1000))
            else:
                writer.write(entry.name, tensors[entry.name])
    record = writer.close()
    data = path.read_bytes()
    assert data == reference.read_bytes()
    assert record.file == "shard.safetensors"
    assert (record.size, record.crc32) == (len(data), zlib.crc32(data)) == (expected.size, expected.crc32)
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


@pytest.mark.parametrize("refused_at", ["open", "first write"])
def test_where_o_direct_is_refused_shards_go_through_the_page_cache(tmp_path, monkeypatch, refused_at):
    """Some filesystems refuse O_DIRECT on open, others on the first write (EINVAL): same bytes either way."""
    import errno
    import fcntl

    import mergekit_lite.output.direct_io as direct_io

    real_open, real_pwrite = os.open, os.pwrite
    refused = []

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT and refused_at == "open":
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def refusing_pwrite(fd, data, offset):
        if refused_at == "first write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("write")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)     # (direct_io.os is the os module)
    monkeypatch.setattr(direct_io.os, "pwrite", refusing_pwrite)
    path = tmp_path / "x.safetensors"
    tensors = tensors_for(ENTRIES)
    writer = ShardWriter(str(path), ENTRIES)
    for entry in file_order(ENTRIES):
        writer.write(entry.name, tensors[entry.name])
    record = writer.close()
    monkeypatch.undo()
    assert refused == ["open" if refused_at == "open" else "write"]   # refused once, then the page cache
    reference = ShardWriter(str(tmp_path / "ref.safetensors"), ENTRIES, direct=False)
    for entry in file_order(ENTRIES):
        reference.write(entry.name, tensors[entry.name])
    reference.close()
    data = path.read_bytes()
    assert data == (tmp_path / "ref.safetensors").read_bytes() and record.crc32 == zlib.crc32(data)


def _direct_stream(path, chunk):
    open(path, "wb").close()
    stream = DirectStream.open(str(path))
    if stream is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    fd = stream._fd   # the same O_DIRECT descriptor, with small buffers: a few kB cross many buffer switches
    stream._io.shutdown()
    return DirectStream(fd, chunk=chunk)


def test_direct_stream_double_buffering_keeps_every_byte_in_order(tmp_path):
    """Two staging buffers alternate (one written by the I/O thread while the other fills): pieces of odd
    sizes, some larger than a buffer, land byte for byte in order."""
    path = tmp_path / "stream.bin"
    stream = _direct_stream(path, chunk=8192)
    data = torch.randint(0, 256, (200_003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cuts = [0, 1, 4097, 8192, 8193, 30_000, 30_001, 90_000, 200_003]
    for start, end in zip(cuts, cuts[1:]):
        stream.append(memoryview(data[start:end].numpy()))
    stream.finish()
    stream.close()
    os.truncate(path, data.numel())
    assert path.read_bytes() == data.numpy().tobytes()


def test_direct_stream_error_names_where_the_disk_refused(tmp_path, monkeypatch):
    """A write refused in the I/O thread is raised in the caller at its next append or finish, with
    ``on_disk`` at the first byte that did not reach the disk."""
    import errno

    import mergekit_lite.output.direct_io as direct_io

    path = tmp_path / "stream.bin"
    stream = _direct_stream(path, chunk=8192)
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if offset >= 16384:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", pwrite)
    with pytest.raises(OSError, match="No space left on device"):
        for _ in range(10):
            stream.append(memoryview(bytearray(4096)))
        stream.finish()
    stream.close()
    assert stream.on_disk == 16384
