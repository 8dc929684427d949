"""Checkpoint I/O: the streaming shard writer byte for byte, the row reader, the header-only index,
and every bad input the merge stage must refuse with a message naming the file or tensor."""

from __future__ import annotations

import errno
import hashlib
import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
import xxhash

from slm_dist.checkpoint.export import ExportError, check_output_dir
from slm_dist.checkpoint.index import CheckpointError, open_index, read_safetensors_header
from slm_dist.checkpoint.reader import LazyReader, RowReader, torch_dtype
from slm_dist.checkpoint.writer import (
    INDEX_NAME,
    MANIFEST_NAME,
    FileRecord,
    ShardWriter,
    TensorEntry,
    hash_file,
    partial_name,
    plan_shards,
    safetensors_header,
    shard_name,
    verify_manifest,
    write_manifest,
    write_safetensors,
)


def _folder(tmp_path: Path, shards: dict[str, dict[str, torch.Tensor]], config: dict | None = None) -> Path:
    """A checkpoint folder: config.json, the given shards and an index mapping every key to its shard."""
    root = tmp_path / "model"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config or {"model_type": "llama", "num_hidden_layers": 1}))
    weight_map = {}
    for name, tensors in shards.items():
        safetensors.torch.save_file(tensors, str(root / name))
        weight_map.update({k: name for k in tensors})
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


# ---------------------------------------------------------------------------------- writer
def test_write_safetensors_matches_the_format_byte_for_byte(tmp_path):
    record = write_safetensors(tmp_path / "x.safetensors", {"w": torch.tensor([1.0, -2.0])})
    header = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    header += b" " * (-len(header) % 8)  # padded so tensor data starts 8-byte aligned
    expected = struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, -2.0)
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == expected
    assert record == FileRecord("x.safetensors", xxhash.xxh3_128(expected).hexdigest(), len(expected), "xxh3_128")
    assert not partial_name(tmp_path / "x.safetensors").exists()


def test_writeback_is_started_block_by_block_over_the_whole_file(tmp_path, monkeypatch):
    """The writer hands each stretch of the file to the disk as it goes (sync_file_range, WRITE only),
    contiguous from byte 0, so that `finish`'s fsync waits only for the tail; the bytes are the same."""
    from slm_dist.checkpoint import writer

    t = torch.arange(4096, dtype=torch.float32)
    entries = [TensorEntry("t", "F32", (4096,))]
    with ShardWriter(tmp_path / "plain.safetensors", entries) as w:
        w.write("t", t)
        w.finish()
    calls = []
    monkeypatch.setattr(writer, "_SYNC_FILE_RANGE", lambda fd, offset, nbytes, flags: calls.append((offset, nbytes,
                                                                                                     flags)))
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 1000)
    with ShardWriter(tmp_path / "s.safetensors", entries) as w:
        for a in range(0, 4096, 512):
            w.write("t", t[a:a + 512])   # 2 KiB per write
        w.finish()
    size = (tmp_path / "s.safetensors").stat().st_size
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    assert calls and calls[0][0] == 0 and all(flags == 2 for _, _, flags in calls)
    assert all(a + n == b for (a, n, _), (b, _, _) in zip(calls, calls[1:]))   # contiguous, no byte twice
    assert size - 2048 <= calls[-1][0] + calls[-1][1] <= size


def test_streamed_chunks_equal_the_whole_tensors_and_the_reference_loader_reads_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g).bfloat16(), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(3.5, dtype=torch.float16), "ids": torch.arange(6, dtype=torch.int64)}
    entries = [TensorEntry(k, {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16",
                               torch.int64: "I64"}[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    path = tmp_path / "s.safetensors"
    with ShardWriter(path, entries) as w:
        for rows in ((0, 3), (3, 4), (4, 7)):      # "a" in three uneven chunks
            w.write("a", tensors["a"][rows[0]:rows[1]])
        # "empty" is never written: a zero-byte tensor is complete as planned
        w.write("scalar", tensors["scalar"])
        w.write("ids", tensors["ids"][:2])
        w.write("ids", tensors["ids"][2:])
        record = w.finish()
    back = safetensors.torch.load_file(str(path))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert record.digest == hash_file(path) and record.bytes == path.stat().st_size
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "fallback-write"])
def test_bytes_copied_file_to_file_are_hashed_and_equal(tmp_path, monkeypatch, kernel_copy):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 8, generator=g)
    root = _folder(tmp_path, {"model.safetensors": {"w": w}})
    info = open_index(root).tensors["w"]
    if not kernel_copy:
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr("slm_dist.checkpoint.writer.os.copy_file_range", refuse)
    with RowReader(root) as reader, ShardWriter(tmp_path / "c.safetensors", [TensorEntry("w", "F32", (40, 8))]) as out:
        for a in (0, 100, 250):   # three uneven blocks, each copied by the kernel and hashed from the mapping
            b = {0: 100, 100: 250, 250: 320}[a]
            out.write("w", reader.map_flat(info, a, b), source=reader.byte_range(info, a))
        record = out.finish()
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "c.safetensors"))["w"], w)
    assert record.digest == hash_file(tmp_path / "c.safetensors")
    assert out._kernel_copy is kernel_copy


@pytest.mark.parametrize(("writes", "message"), [
    ([("b", torch.zeros(2))], "expected bytes of 'a'"),
    ([("a", torch.zeros(2, dtype=torch.float16))], "planned as F32"),
    ([("a", torch.zeros(3))], "got 12 bytes"),
    ([("a", torch.zeros(1))], "only 4 of 12 data bytes"),
])
def test_writer_refuses_bytes_out_of_plan_and_leaves_no_file(tmp_path, writes, message):
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=message):
        with ShardWriter(path, [TensorEntry("a", "F32", (2,)), TensorEntry("b", "F32", (1,))]) as w:
            for key, chunk in writes:
                w.write(key, chunk)
            w.finish()
    assert not path.exists() and not partial_name(path).exists()


def test_a_full_disk_while_writing_the_header_leaves_no_partial_file(tmp_path, monkeypatch):
    # The header is written in the constructor, before any `with` block owns the file: a full disk there
    # used to leave `.s.safetensors.partial` behind (seen when a merge filled the disk between two shards).
    def no_room(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("slm_dist.checkpoint.writer.os.write", no_room)
    path = tmp_path / "s.safetensors"
    with pytest.raises(OSError, match="no space left on the device writing"):
        ShardWriter(path, [TensorEntry("a", "F32", (2,))])
    assert list(tmp_path.iterdir()) == []


def test_header_offsets_are_back_to_back_and_duplicate_keys_refused():
    raw = safetensors_header([TensorEntry("x", "BF16", (3, 2)), TensorEntry("y", "I8", (5,))])
    header = json.loads(raw[8:])
    assert header["x"]["data_offsets"] == [0, 12] and header["y"]["data_offsets"] == [12, 17]
    with pytest.raises(ValueError, match="appears twice"):
        safetensors_header([TensorEntry("x", "F32", (1,)), TensorEntry("x", "F32", (1,))])


def test_plan_shards_caps_bytes_and_gives_a_big_tensor_its_own_shard():
    sizes = [("a", 40), ("b", 50), ("c", 200), ("d", 10), ("e", 95)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert shard_name(2, 5) == "model-00002-of-00005.safetensors"
    with pytest.raises(ValueError, match="max_shard_bytes"):
        plan_shards(sizes, 0)


def test_a_manifest_written_with_sha256_still_verifies(tmp_path):
    """Manifests from before xxh3_128 name sha256 per file, written the old way by hand here."""
    (tmp_path / "a.bin").write_bytes(b"abc")
    old = {"complete": True, "files": {"a.bin": {"sha256": hashlib.sha256(b"abc").hexdigest(), "bytes": 3}}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(old))
    assert verify_manifest(tmp_path) == []
    record = FileRecord.from_json("a.bin", old["files"]["a.bin"])
    assert record.algorithm == "sha256" and record.matches(tmp_path / "a.bin")
    assert record.to_json() == old["files"]["a.bin"]  # rewritten as it was read
    (tmp_path / "a.bin").write_bytes(b"abd")
    assert verify_manifest(tmp_path) == ["a.bin: sha256 differs from the manifest"]
    assert not record.matches(tmp_path / "a.bin")


def test_verify_manifest_finds_changed_missing_and_unfinished(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"xyz")
    records = [FileRecord("a.bin", hash_file(tmp_path / "a.bin"), 3),
               FileRecord("b.bin", hash_file(tmp_path / "b.bin"), 3)]
    write_manifest(tmp_path, records, extra={"complete": True})
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["files"]["a.bin"] == {"xxh3_128": xxhash.xxh3_128(b"abc").hexdigest(), "bytes": 3}
    assert verify_manifest(tmp_path) == []
    (tmp_path / "a.bin").write_bytes(b"abd")
    (tmp_path / "b.bin").unlink()
    assert sorted(verify_manifest(tmp_path)) == ["a.bin: xxh3_128 differs from the manifest",
                                                 "b.bin: listed in the manifest but missing"]
    write_manifest(tmp_path, [], extra={"complete": False})
    assert "did not finish" in verify_manifest(tmp_path)[0]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"files": {"a.bin": {"md5": "00", "bytes": 3}}}))
    assert "no hash slm-dist knows" in verify_manifest(tmp_path)[0]
    (tmp_path / MANIFEST_NAME).unlink()
    assert "is missing" in verify_manifest(tmp_path)[0]


# ---------------------------------------------------------------------------------- reader
def test_row_reader_returns_exact_rows_and_counts_bytes(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, generator=g).bfloat16()
    ids = torch.arange(5, dtype=torch.int32)
    root = _folder(tmp_path, {"model-00001-of-00001.safetensors": {"w": w, "ids": ids, "s": torch.tensor(2.0)}})
    index = open_index(root)
    with RowReader(root) as reader:
        assert torch.equal(reader.read_rows(index.tensors["w"], 2, 5), w[2:5])
        assert torch.equal(reader.read_rows(index.tensors["ids"], 0, 5), ids)
        assert torch.equal(reader.read_rows(index.tensors["s"], 0, 1), torch.tensor(2.0))
        assert reader.bytes_read == 3 * 4 * 2 + 5 * 4 + 4
        with pytest.raises(ValueError, match="outside 'w'"):
            reader.read_rows(index.tensors["w"], 4, 7)
        # flat ranges cross row boundaries; mapped and copied reads give the same elements
        flat = w.reshape(-1)
        assert torch.equal(reader.map_flat(index.tensors["w"], 3, 21), flat[3:21])
        buf = torch.zeros(32, dtype=torch.bfloat16)
        got = reader.read_flat(index.tensors["w"], 5, 13, out=buf)
        assert torch.equal(got, flat[5:13]) and got.data_ptr() == buf.data_ptr()   # landed in the given buffer
        with pytest.raises(ValueError, match="out buffer"):
            reader.read_flat(index.tensors["w"], 0, 8, out=torch.zeros(8))
    assert torch_dtype("BF16") is torch.bfloat16
    with pytest.raises(CheckpointError, match="not supported"):
        torch_dtype("F4")


def test_row_reader_reports_a_shard_truncated_after_indexing(tmp_path):
    root = _folder(tmp_path, {"model.safetensors": {"w": torch.ones(64, 64)}})
    index = open_index(root)
    path = root / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with RowReader(root) as reader:
        with pytest.raises(CheckpointError, match="ended early.*'w'"):
            reader.read_rows(index.tensors["w"], 0, 64)
        with pytest.raises(CheckpointError, match="ended early.*'w'"):   # an error, not a SIGBUS
            reader.map_flat(index.tensors["w"], 0, 64 * 64)


# ----------------------------------------------------------------------------------- index
def test_index_maps_keys_offsets_and_bytes_from_headers(tmp_path):
    root = _folder(tmp_path, {"model-00001-of-00002.safetensors": {"a": torch.zeros(3, 2)},
                              "model-00002-of-00002.safetensors": {"b": torch.zeros(4, dtype=torch.float16)}})
    index = open_index(root)
    a, b = index.tensors["a"], index.tensors["b"]
    assert (a.file, a.dtype, a.shape, a.nbytes) == ("model-00001-of-00002.safetensors", "F32", (3, 2), 24)
    header_len = struct.unpack("<Q", (root / b.file).read_bytes()[:8])[0]
    assert b.offset == 8 + header_len and (b.dtype, b.nbytes) == ("F16", 8)
    assert index.total_bytes == 32 and index.files_for(["a", "b"]) == sorted(index.files)


def test_index_naming_a_missing_file_is_refused(tmp_path):
    root = _folder(tmp_path, {"model-00001-of-00002.safetensors": {"a": torch.zeros(2)},
                              "model-00002-of-00002.safetensors": {"b": torch.zeros(2)}})
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file.*model-00002-of-00002"):
        open_index(root)


def test_index_naming_a_key_its_file_lacks_is_refused(tmp_path):
    root = _folder(tmp_path, {"model-00001-of-00001.safetensors": {"a": torch.zeros(2)}})
    index = json.loads((root / INDEX_NAME).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00001.safetensors"
    (root / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost.weight'.*does not hold it"):
        open_index(root)


def test_truncated_shard_is_refused_before_any_read(tmp_path):
    root = _folder(tmp_path, {"model-00001-of-00001.safetensors": {"a": torch.zeros(100)}})
    path = root / "model-00001-of-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated.*describes"):
        open_index(root)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors_header(path)


def test_header_whose_byte_range_disagrees_with_its_shape_is_corrupt(tmp_path):
    root = _folder(tmp_path, {"model-00001-of-00001.safetensors": {"a": torch.zeros(4)}})
    path = root / "model-00001-of-00001.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].replace(b'"shape":[4]', b'"shape":[3]')
    path.write_bytes(data[:8] + header + data[8 + n:])
    with pytest.raises(CheckpointError, match=r"corrupt header: 'a' is F32\[3\] \(12 bytes\) but spans 16"):
        open_index(root)
    path.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_index(root)


def test_pickle_only_checkpoint_needs_the_opt_in(tmp_path):
    root = tmp_path / "bin"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    torch.save({"a": torch.arange(4.0)}, root / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=true"):
        open_index(root)
    index = open_index(root, allow_pickle=True)
    assert index.format == "pickle" and index.tensors["a"].offset == -1 and index.tensors["a"].nbytes == 16
    assert torch.equal(LazyReader(index).get("a"), torch.arange(4.0))


def test_output_folder_equal_to_or_inside_the_input_is_refused(tmp_path):
    src = _folder(tmp_path, {"model.safetensors": {"a": torch.zeros(1)}})
    for out in (src, src / "pruned", src / "a" / "b", tmp_path / "model" / ".." / "model"):
        with pytest.raises(ExportError, match="never writes into its input"):
            check_output_dir(src, out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not written by slm-dist"):
        check_output_dir(src, foreign)
    check_output_dir(src, tmp_path / "fresh")  # a new folder beside the input is fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_into_casts_chunk_by_chunk_and_checks_the_shape(tmp_path, dtype):
    weights = {"a": torch.randn(37, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
               "b": torch.arange(6, dtype=torch.int64)}
    safetensors.torch.save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    reader = LazyReader(open_index(tmp_path))
    out = torch.empty(37, 5, dtype=dtype)
    reader.read_into("a", out, chunk_bytes=14)  # 7 bf16 elements per chunk: chunks straddle rows
    assert torch.equal(out, weights["a"].to(dtype))
    ints = reader.read_into("b", torch.empty(6, dtype=torch.int64))
    assert torch.equal(ints, weights["b"]) and reader.read_keys == ["a", "b"]
    with pytest.raises(CheckpointError, match=r"'a' .* has shape \[37, 5\], the model expects \[5, 37\]"):
        reader.read_into("a", torch.empty(5, 37))
    # Every cast goes through one staging buffer, allocated once; the stored dtype needs none.
    staging = reader._staging
    assert (staging is None) == (dtype == torch.bfloat16)
    reader.read_into("a", out, chunk_bytes=14)
    assert reader._staging is staging and torch.equal(out, weights["a"].to(dtype))
    reader.close()
