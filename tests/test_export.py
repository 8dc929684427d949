"""The out-of-core merge stage on tiny multi-shard checkpoints (a layer split across shards):
parity with the in-memory merge for every rule, exact bytes read, the output folder, resume after
a real SIGKILL, bad inputs that must write nothing, Ray parity, and transformers logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import safetensors.torch
import torch

from slm_dist import cli
from slm_dist.arch import get_arch, prune_config
from slm_dist.checkpoint.export import ExportError, check_disk_space, plan_export, write_export
from slm_dist.checkpoint.index import CheckpointError, TensorInfo, open_index, read_safetensors_header
from slm_dist.checkpoint.verify import verify_model
from slm_dist.checkpoint.writer import (
    INDEX_NAME,
    MANIFEST_NAME,
    PAGE_BYTES,
    TensorEntry,
    partial_name,
    safetensors_header,
    sha256_file,
    verify_manifest,
)
from slm_dist.core.merge import merge_state_dict
from slm_dist.core.merge_jobs import MergeError, single_source
from slm_dist.core.planner import MergePlan
from slm_dist.testing import layer_split_across_shards, make_tiny_model
from slm_dist.workers.merge_worker import elements_per_block, run_jobs_in_threads

LLAMA = get_arch("llama")
WINDOWS = ((1, 2), (3, 5))      # 6 layers -> 3: [0], [1..2] at 1, [3..5] at 2
SHARD_BYTES = 20_000            # several output shards from a 6-layer hidden-32 model
RULES = ("reference", "sum", "mean", "drop", "scaled")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A bf16 6-layer Llama in ~24 KB shards, so layers straddle files; plus a chat template to copy."""
    root = make_tiny_model(tmp_path_factory.mktemp("src") / "model", dtype=torch.bfloat16)
    (root / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return root


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(str(f)))
    return out


ALPHAS = (0.5, 0.375)            # rule "scaled": one alpha per window of WINDOWS


def _plan(rule: str, windows=WINDOWS, n: int = 6) -> MergePlan:
    alphas = ALPHAS[:len(windows)] if rule == "scaled" else None
    return MergePlan(n, windows, rule, "cka", 0.9, alphas=alphas)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("memory", [64 * 1024**2, 2048], ids=["whole-tensors", "small-blocks"])
@pytest.mark.parametrize("rule", RULES)
def test_out_of_core_merge_equals_the_in_memory_merge(tiny, tmp_path, rule, memory):
    assert layer_split_across_shards(tiny), "the fixture must split a layer across shards"
    index = open_index(tiny)
    export = plan_export(index, _plan(rule), tmp_path / "out", SHARD_BYTES)
    assert len(export.shards) >= 3
    write_export(export, run_jobs_in_threads, max_parallel=2, memory_budget_bytes=memory)
    got = _tensors(tmp_path / "out")
    alpha = dict(zip(WINDOWS, ALPHAS)) if rule == "scaled" else None
    expected = merge_state_dict(_tensors(tiny), WINDOWS, 6, LLAMA, rule, alpha)
    assert list(got) and set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], tensor), key


@pytest.mark.parametrize("rule", ["drop", "reference"])
def test_copied_bytes_keep_their_offset_within_a_page(tiny, tmp_path, rule):
    """Each shard's header is padded so that the data start where `copy_page_offset` says; the
    tensors it copies most bytes of then sit at the same offset within a page as in their source
    (the kernel copies page to page), and the padded files still load."""
    out = tmp_path / "out"
    export = plan_export(open_index(tiny), _plan(rule), out, SHARD_BYTES)
    write_export(export, run_jobs_in_threads)
    source, written = open_index(tiny), open_index(out)
    aligned_bytes = 0
    for shard in export.shards:
        assert shard.page_offset is not None and shard.page_offset % 8 == 0
        assert (out / shard.name).stat().st_size == shard.file_bytes
        starts = {written.tensors[t.out_key].offset for t in shard.tensors}
        assert min(starts) % PAGE_BYTES == shard.page_offset
        for t in shard.tensors:
            src = source.tensors[t.source_keys[single_source(t)]]
            if (written.tensors[t.out_key].offset - src.offset) % PAGE_BYTES == 0:
                aligned_bytes += src.nbytes
    # One padding per shard: at least the copies the padding was chosen for line up
    assert aligned_bytes >= max(source.tensors[k].nbytes for k in source.tensors if ".layers." in k)
    files = {p: safetensors.torch.load_file(p) for p in sorted(out.glob("*.safetensors"))}
    assert sum(len(f) for f in files.values()) == len(written.tensors)


def test_page_offset_pads_the_header_by_less_than_a_page():
    entries = [TensorEntry("x", "BF16", (3, 2))]
    plain = safetensors_header(entries)
    for page_offset in (0, 8, 2616, PAGE_BYTES - 8):
        raw = safetensors_header(entries, page_offset=page_offset)
        assert len(raw) % PAGE_BYTES == page_offset and 0 <= len(raw) - len(plain) < PAGE_BYTES
        assert json.loads(raw[8:]) == json.loads(plain[8:])
    with pytest.raises(ValueError, match="multiple of 8"):
        safetensors_header(entries, page_offset=12)


def test_blocks_are_sized_to_the_memory_share_by_hand():
    info = TensorInfo("w", "f", "BF16", (64, 32), 64 * 32 * 2, offset=0)
    # a 3-layer merge maps one block of each member: 3000 // 3 = 1000 bytes -> 500 bf16 elements
    assert elements_per_block(info, 3, 3000) == 500
    assert elements_per_block(info, 1, 2048) == 1024        # a copy maps one block
    assert elements_per_block(info, 2, 3) == 1              # never less than one element
    assert elements_per_block(info, 1, 10**12) == 2048      # never more than the tensor
    big = TensorInfo("e", "f", "F32", (2**20, 64), 2**28, offset=0)
    assert elements_per_block(big, 1, 10**12) == 16 * 2**20  # blocks stop at 64 MiB


@pytest.mark.parametrize("rule", ["reference", "sum"])
def test_jobs_read_only_the_tensors_the_rule_needs(tiny, tmp_path, rule):
    index = open_index(tiny)
    layer = {}
    for key, info in index.tensors.items():
        split = LLAMA.split_key(key)
        if split:
            kind = "norm" if LLAMA.role(split[1]) == "norm" else "proj"
            layer.setdefault(split[0], {"norm": 0, "proj": 0})[kind] += info.nbytes
    proj, norm = layer[0]["proj"], layer[0]["norm"]
    assert all(v == layer[0] for v in layer.values())
    other = index.total_bytes - 6 * (proj + norm)
    # reference keeps the top projections and bottom norms of a window: one layer's bytes per window;
    # sum reads every projection of a window and the bottom norms.
    expected = {"reference": other + 3 * (proj + norm),
                "sum": other + (proj + norm) + (2 * proj + norm) + (3 * proj + norm)}[rule]
    result = write_export(plan_export(index, _plan(rule), tmp_path / "out", SHARD_BYTES), run_jobs_in_threads)
    assert result.bytes_read == expected
    assert result.bytes_written == sum((tmp_path / "out" / n).stat().st_size for n in result.shards_written)


# ------------------------------------------------------------------------------ output folder
def test_output_folder_is_complete_trimmed_and_documented(tmp_path):
    types = ["full_attention", "sliding_attention"] * 3
    src = make_tiny_model(tmp_path / "qwen", "qwen3", layer_types=types, use_sliding_window=True,
                          sliding_window=16, max_window_layers=3)
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "out"
    plan = MergePlan(6, WINDOWS, "sum", "cka", 0.8125)
    result = write_export(plan_export(open_index(src), plan, out, SHARD_BYTES), run_jobs_in_threads)

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["layer_types"] == [types[0], types[1], types[3]]    # new layers sit at old 0, 1, 3
    assert config["max_window_layers"] == 2                            # old layers 0, 1 were below 3
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert str(src) not in card and "base_model: qwen" in card  # the folder's name, never its local path
    assert "[1..2], [3..5]" in card and "`sum`" in card and "0.8125" in card
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["plan"]["windows"] == [[1, 2], [3, 5]]
    assert set(manifest["files"]) == {r.name for r in result.records} and verify_manifest(out) == []
    weight_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert set(weight_map) == set(_tensors(out)) and verify_model(out) == []
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_output_loads_in_transformers_with_the_logits_of_a_model_pruned_in_memory(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "out"
    write_export(plan_export(open_index(tiny), _plan("sum"), out, SHARD_BYTES), run_jobs_in_threads, max_parallel=2)
    # the in-memory way: load the bf16 model, merge its state dict, load it into the pruned config
    source = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    merged = merge_state_dict(source.state_dict(), WINDOWS, 6, LLAMA, "sum")
    config = prune_config(json.loads((tiny / "config.json").read_text()), _plan("sum").new_to_old, LLAMA)
    in_memory = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    in_memory.load_state_dict(merged, strict=True)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert loaded.config.num_hidden_layers == 3
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = in_memory.float().eval()(ids).logits, loaded.float().eval()(ids).logits
        unpruned = source.float().eval()(ids).logits
    # both paths round the float32 merge to bf16 once: the same weights, so the same logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, unpruned, atol=1e-3)   # and the pruning did change the model


# ------------------------------------------------------------------------------------ resume
KILLER = textwrap.dedent("""
    import os, signal, sys
    from slm_dist.checkpoint import writer
    original, calls = writer.ShardWriter.write, [0]
    def write(self, key, chunk, **kwargs):
        if self.path.name.startswith("model-00003-"):
            calls[0] += 1
            if calls[0] == 3:  # mid-way through the third shard: the kill leaves a partial file
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key, chunk, **kwargs)
    writer.ShardWriter.write = write
    from slm_dist import cli
    sys.exit(cli.main(["-q", "merge", sys.argv[1]]))
""")


def _run_dir(tmp_path: Path, name: str, src: Path, parallel: int) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "plan.json").write_text(json.dumps({**_plan("sum").to_json(), "details": {}}))
    (run / "config.yaml").write_text(json.dumps({
        "model": {"path": str(src)}, "run": {"dir": str(run)},
        "merge": {"rule": "sum", "max_shard_bytes": SHARD_BYTES, "max_parallel": parallel}}))
    return run


def test_a_killed_merge_resumes_to_a_folder_identical_to_an_uninterrupted_run(tiny, tmp_path):
    killed = _run_dir(tmp_path, "killed", tiny, parallel=1)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed / "config.yaml")], capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    out = killed / "model"
    names = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = int(names[0][-16:-12])
    assert names == [f"model-0000{k}-of-{n:05d}.safetensors" for k in (1, 2)]
    partial = partial_name(out / f"model-00003-of-{n:05d}.safetensors")
    assert partial.is_file()
    assert not (out / "config.json").exists() and not (out / INDEX_NAME).exists()   # visibly unfinished
    assert "did not finish" in verify_manifest(out)[0]
    # damage on top of the kill: a finished shard with one byte flipped (same size: only its hash can
    # tell), and the truncated bytes of the killed shard under its final name
    first = out / names[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    shutil.copy(partial, out / f"model-00003-of-{n:05d}.safetensors")

    assert cli.main(["-q", "merge", str(killed / "config.yaml")]) == cli.EXIT_OK
    summary = json.loads((killed / "merge.json").read_text())
    assert summary["shards_skipped"] == [names[1]]
    assert sorted(summary["shards_written"]) == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)
                                                 if k != 2]

    clean = _run_dir(tmp_path, "clean", tiny, parallel=2)
    assert cli.main(["-q", "merge", str(clean / "config.yaml")]) == cli.EXIT_OK
    assert _files(out) == _files(clean / "model")
    assert verify_model(out) == []

    # a rerun of a finished folder verifies every shard and rewrites nothing it holds
    assert cli.main(["-q", "merge", str(killed / "config.yaml")]) == cli.EXIT_OK
    assert len(json.loads((killed / "merge.json").read_text())["shards_skipped"]) == n
    assert _files(out) == _files(clean / "model")


def test_a_second_merge_into_a_folder_being_written_is_refused_and_harms_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    export = plan_export(open_index(tiny), _plan("sum"), out, SHARD_BYTES)
    seen = []

    def second_merge(job, result):  # runs while the first merge holds the folder
        if not seen:
            with pytest.raises(ExportError, match=r"another merge is writing .*out.*pid \d+.*merge\.output_dir"):
                write_export(plan_export(open_index(tiny), _plan("sum", ((1, 4),)), out, SHARD_BYTES), run_jobs_in_threads)
        seen.append(job.name)

    write_export(export, run_jobs_in_threads, on_shard=second_merge)
    assert len(seen) == len(export.shards)
    assert verify_model(out) == []
    assert set(_tensors(out)) == set(merge_state_dict(_tensors(tiny), _plan("sum").windows, 6, LLAMA, "sum"))
    write_export(export, run_jobs_in_threads)  # the lock went with the first merge: a rerun proceeds


def test_a_new_plan_in_the_same_folder_replaces_every_shard(tiny, tmp_path):
    out = tmp_path / "out"
    write_export(plan_export(open_index(tiny), _plan("sum"), out, SHARD_BYTES), run_jobs_in_threads)
    result = write_export(plan_export(open_index(tiny), _plan("sum", ((1, 4),)), out, SHARD_BYTES), run_jobs_in_threads)
    assert result.shards_skipped == ()
    assert set(_tensors(out)) == set(merge_state_dict(_tensors(tiny), ((1, 4),), 6, LLAMA, "sum"))
    assert verify_model(out) == []


def test_a_folder_whose_manifest_names_sha256_resumes_and_verifies(tiny, tmp_path):
    """A folder merged before xxh3_128 (per-file sha256 in manifest.json): its shards are verified by
    the hash their entries name and kept, and the folder verifies."""
    out = tmp_path / "out"
    export = plan_export(open_index(tiny), _plan("sum"), out, SHARD_BYTES)
    first = write_export(export, run_jobs_in_threads)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name, entry in manifest["files"].items():
        manifest["files"][name] = {"sha256": sha256_file(out / name), "bytes": entry["bytes"]}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    before = {n: (out / n).read_bytes() for n in first.shards_written}
    assert verify_model(out) == []
    again = write_export(export, run_jobs_in_threads)
    assert sorted(again.shards_skipped) == sorted(first.shards_written)
    assert {n: (out / n).read_bytes() for n in first.shards_written} == before
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert all("sha256" in files[n] for n in first.shards_written)  # kept as verified
    assert verify_model(out) == []


# -------------------------------------------------------------------------------- bad inputs
def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _cli_merge(tmp_path: Path, src: Path, capsys) -> tuple[int, str]:
    run = _run_dir(tmp_path, "run", src, parallel=2)
    code = cli.main(["-q", "merge", str(run / "config.yaml")])
    return code, capsys.readouterr().err


def _shard_of(root: Path, key: str) -> Path:
    return root / json.loads((root / INDEX_NAME).read_text())["weight_map"][key]


def test_dtype_clash_inside_a_window_names_both_tensors_and_writes_nothing(tiny, tmp_path, capsys):
    src = _copy(tiny, tmp_path)
    path = _shard_of(src, "model.layers.2.mlp.up_proj.weight")
    tensors = safetensors.torch.load_file(str(path))
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.2.mlp.up_proj.weight"].half()
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    code, err = _cli_merge(tmp_path, src, capsys)
    assert code == cli.EXIT_BAD_INPUT
    assert "cannot merge model.layers.2.mlp.up_proj.weight (F16[64, 32]) with model.layers.1.mlp.up_proj.weight " \
           "(BF16[64, 32]) in window (1, 2)" in err
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("damage", ["truncated shard", "missing file", "missing key"])
def test_broken_source_is_refused_before_anything_is_written(tiny, tmp_path, capsys, damage):
    src = _copy(tiny, tmp_path)
    shard = _shard_of(src, "model.layers.4.self_attn.q_proj.weight")
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-4096])
        expected = f"{shard.name} is truncated"
    elif damage == "missing file":
        shard.unlink()
        expected = f"missing file(s): ['{shard.name}']"
    else:
        index = json.loads((src / INDEX_NAME).read_text())
        del index["weight_map"]["model.layers.4.self_attn.q_proj.weight"]
        (src / INDEX_NAME).write_text(json.dumps(index))
        expected = "index does not list"
    code, err = _cli_merge(tmp_path, src, capsys)
    assert code == cli.EXIT_BAD_INPUT and expected in err
    assert not (tmp_path / "run" / "model").exists()


def test_a_missing_layer_tensor_is_named_by_the_plan_check(tiny, tmp_path):
    src = _copy(tiny, tmp_path)
    key = "model.layers.3.post_attention_layernorm.weight"
    path = _shard_of(src, key)
    tensors = safetensors.torch.load_file(str(path))
    del tensors[key]
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    index = json.loads((src / INDEX_NAME).read_text())
    del index["weight_map"][key]
    (src / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MergeError, match=key.replace(".", r"\.")):
        plan_export(open_index(src), _plan("sum"), tmp_path / "out", SHARD_BYTES)
    with pytest.raises(ExportError, match="plan is for 8 layers"):
        plan_export(open_index(tiny), _plan("sum", n=8), tmp_path / "out", SHARD_BYTES)
    assert not (tmp_path / "out").exists()


def test_untied_model_without_lm_head_is_refused(tiny, tmp_path):
    src = _copy(tiny, tmp_path)
    path = _shard_of(src, "lm_head.weight")
    tensors = safetensors.torch.load_file(str(path))
    del tensors["lm_head.weight"]
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    index = json.loads((src / INDEX_NAME).read_text())
    del index["weight_map"]["lm_head.weight"]
    (src / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ExportError, match="lack 'lm_head.weight'.*tie_word_embeddings=False"):
        plan_export(open_index(src), _plan("sum"), tmp_path / "out", SHARD_BYTES)


def test_source_truncated_during_the_merge_fails_that_shard_without_a_final_name(tiny, tmp_path):
    src = _copy(tiny, tmp_path)
    export = plan_export(open_index(src), _plan("sum"), tmp_path / "out", SHARD_BYTES)
    victim = export.shards[-1]
    source_file = src / victim.sources[-1].file
    source_file.write_bytes(source_file.read_bytes()[:victim.sources[-1].offset])
    with pytest.raises(CheckpointError, match="ended early"):
        write_export(export, run_jobs_in_threads, max_parallel=2)
    out = tmp_path / "out"
    assert not (out / victim.name).exists() and not partial_name(out / victim.name).exists()
    assert not (out / "config.json").exists() and not (out / INDEX_NAME).exists()
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"] is False


def test_disk_space_is_checked_against_the_shards_still_to_write(tiny, tmp_path, monkeypatch):
    export = plan_export(open_index(tiny), _plan("sum"), tmp_path / "out", SHARD_BYTES)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("slm_dist.checkpoint.export.shutil.disk_usage", lambda p: usage(0, 0, 64 * 1024**2))
    with pytest.raises(ExportError, match="not enough disk space"):
        check_disk_space(export)
    monkeypatch.setattr("slm_dist.checkpoint.export.shutil.disk_usage",
                        lambda p: usage(0, 0, 64 * 1024**2 + sum(s.file_bytes for s in export.shards)))
    check_disk_space(export)


def test_pickle_source_merges_only_with_the_opt_in_and_gives_the_same_shards(tiny, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(tiny / "config.json", src / "config.json")
    torch.save(_tensors(tiny), src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        open_index(src)
    write_export(plan_export(open_index(src, allow_pickle=True), _plan("mean"), tmp_path / "a", SHARD_BYTES), run_jobs_in_threads,
                 allow_pickle=True, memory_budget_bytes=4096)
    write_export(plan_export(open_index(tiny), _plan("mean"), tmp_path / "b", SHARD_BYTES), run_jobs_in_threads)
    shards = sorted(p.name for p in (tmp_path / "b").glob("model-*.safetensors"))
    # The same tensors and header; only the padding differs: a pickle source has no page offsets to match
    assert shards and all(read_safetensors_header(tmp_path / "a" / s) == read_safetensors_header(tmp_path / "b" / s)
                          for s in shards)
    for s in shards:
        a, b = safetensors.torch.load_file(tmp_path / "a" / s), safetensors.torch.load_file(tmp_path / "b" / s)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_merge_command_without_a_plan_says_how_to_get_one(tiny, tmp_path, capsys):
    run = _run_dir(tmp_path, "run", tiny, parallel=1)
    (run / "plan.json").unlink()
    assert cli.main(["-q", "merge", str(run / "config.yaml")]) == cli.EXIT_BAD_INPUT
    assert "plan.json does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # address="local": a private cluster, never one another process on this machine started
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_tasks_write_the_same_folder_and_raise_the_workers_error(tiny, tmp_path, ray_cluster):
    from slm_dist.backends import ray as distributed
    from slm_dist.config import ClusterSection

    runner = distributed.RayBackend(ClusterSection(backend="ray")).run_shard_jobs
    local = write_export(plan_export(open_index(tiny), _plan("sum"), tmp_path / "local", SHARD_BYTES), run_jobs_in_threads, max_parallel=2)
    remote = write_export(plan_export(open_index(tiny), _plan("sum"), tmp_path / "ray", SHARD_BYTES), runner,
                          max_parallel=2, memory_budget_bytes=4096)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert remote.peak_worker_rss_bytes > 0 and remote.bytes_read == local.bytes_read

    src = _copy(tiny, tmp_path)
    export = plan_export(open_index(src), _plan("sum"), tmp_path / "broken", SHARD_BYTES)
    (src / export.shards[0].sources[0].file).write_bytes(b"")
    with pytest.raises(CheckpointError, match="ended early"):
        write_export(export, runner, max_parallel=2)
    assert not (tmp_path / "broken" / export.shards[0].name).exists()


def test_shards_that_only_copy_are_written_while_torch_loads_and_computing_ones_after(tmp_path):
    # `run_jobs_in_threads` imports torch beside the copy-only shards (a second it would otherwise spend
    # with nothing running), so those go first; each group keeps the planned order, and the output is the same.
    from slm_dist.workers.merge_worker import copies_only

    root = make_tiny_model(tmp_path / "src")
    export = plan_export(open_index(root), MergePlan(6, ((1, 2),), "mean", "cka", None), tmp_path / "out", 20_000)
    planned = [job.name for job in export.shards]
    computing = [job.name for job in export.shards if not copies_only(job)]
    assert computing and planned.index(computing[-1]) < len(planned) - 1  # a copy after one that computes
    order: list[str] = []
    write_export(export, run_jobs_in_threads, on_shard=lambda job, result: order.append(job.name))
    assert order == [n for n in planned if n not in computing] + computing
    assert verify_model(tmp_path / "out") == []
