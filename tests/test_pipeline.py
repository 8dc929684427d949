"""The whole run on a tiny model, in-process, through the real entry point; and its bad inputs."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from slm_dist import cli, pipeline
from slm_dist.arch import get_arch
from slm_dist.calibration import load_calibration_parquet
from slm_dist.config import load_config
from slm_dist.core import planner
from slm_dist.core.merge import merge_state_dict
from tests.conftest import folder_digest


def tiny_overrides(model: Path, text: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"calibration.source={text}", f"eval.heldout={text}", f"run.dir={run_dir}",
            "calibration.num_samples=16", "calibration.seq_len=32", "calibration.batch_size=4",
            "similarity.tokens_per_batch=64", "eval.seq_len=32", "eval.max_windows=4",
            "merge.max_shard_bytes=40000", "cluster.num_stages=2", *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_model, tiny_text_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, run_dir, "plan.target_layers_removed=2"))
    report = pipeline.run(config, show_progress=False)
    return run_dir, report


def test_run_writes_every_artifact(finished_run):
    run_dir, report = finished_run
    for name in ("config.resolved.yaml", "calibration.parquet", "similarity.json", "plan.json", "report.json"):
        assert (run_dir / name).is_file(), name
    ids = load_calibration_parquet(run_dir / "calibration.parquet")
    assert ids.shape == (16, 32) and ids.dtype == torch.int64
    sim = json.loads((run_dir / "similarity.json").read_text())
    assert sim["labels"] == ["embed", 0, 1, 2, 3, 4, 5]
    cka = torch.tensor(sim["cka"])
    assert cka.shape == (7, 7) and torch.allclose(cka, cka.T) and torch.allclose(cka.diagonal(), torch.ones(7))
    assert sim["kernel"] == "linear" and sim["unit"] == "token" and "HSIC" in sim["estimator"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["num_layers_before"] == 6 and plan["num_layers_after"] == 4
    assert sum(hi - lo for lo, hi in plan["windows"]) == 2
    assert len(plan["index_map"]) == 6 and plan["rule"] == "reference" and plan["criterion"] == "cka"
    assert 0 < plan["threshold"] <= 1
    assert report["layers_before"] == 6 and report["layers_after"] == 4
    assert report["params_after"] < report["params_before"]
    assert report["perplexity_before"] > 1 and report["perplexity_after"] > 1
    assert set(report["seconds"]) >= {"calibrate", "plan", "merge", "verify", "eval"}
    assert "position 0" in report["similarity"]["note"]


def test_the_model_card_reports_the_measured_perplexity_and_the_folder_still_verifies(finished_run):
    from huggingface_hub import ModelCard

    from slm_dist.checkpoint.verify import verify_model

    run_dir, report = finished_run
    out = Path(report["output"])
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == Path(report["model"]).name and card.data.library_name == "transformers"
    assert f"| {report['perplexity_before']:.3f} |" in card.text and f"| {report['perplexity_after']:.3f} |" in card.text
    assert verify_model(out) == []     # the rewritten card's hash was re-recorded
    config = load_config(run_dir / "config.resolved.yaml")
    state = pipeline.open_run_state(pipeline.context.resolve_inputs(config, None, False),
                                    pipeline.open_index(config.model.path), False)
    assert state.stages_to_run() == ()  # and the run still counts as finished


def test_output_loads_generates_and_equals_in_memory_merge(finished_run, tiny_model):
    run_dir, _ = finished_run
    plan = json.loads((run_dir / "plan.json").read_text())
    out = run_dir / "model"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    ids = torch.randint(3, 60, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.isfinite(logits).all() and generated.shape == (1, 15)
    source = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    expected = merge_state_dict(source, [tuple(w) for w in plan["windows"]], 6, get_arch("llama"), "reference")
    got = model.state_dict()
    assert set(expected) == set(got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)
    assert cli.main(["verify", str(out)]) == 0


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, as written (same helper as tests/test_export.py)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(str(f)))
    return out


@pytest.mark.parametrize("rule", ["sum", "mean", "drop"])
def test_each_rule_runs_at_a_fixed_threshold(tiny_model, tiny_text_file, tmp_path, rule):
    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "plan.threshold=0.5",
                                              f"merge.rule={rule}", "eval.enabled=false"))
    report = pipeline.run(config, show_progress=False)
    assert report["rule"] == rule and report["perplexity_after"] is None
    # The plan is the sliding window at 0.5 on the CKA matrix this run measured, with the config's protection.
    cka = torch.tensor(json.loads((tmp_path / "similarity.json").read_text())["cka"])
    p = config.plan
    expected_windows = planner.plan_windows_cka(cka, 0.5, p.protect_first, p.protect_last, p.max_window)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert expected_windows, "threshold 0.5 must merge something on the tiny model, or this test checks nothing"
    assert [tuple(w) for w in plan["windows"]] == [tuple(w) for w in expected_windows]
    assert (plan["rule"], plan["threshold"]) == (rule, 0.5)
    assert [tuple(w) for w in report["windows"]] == [tuple(w) for w in expected_windows]
    assert report["layers_after"] == 6 - sum(hi - lo for lo, hi in expected_windows)
    # The checkpoint on disk holds exactly the in-memory merge of the source with that rule and those windows.
    expected = merge_state_dict(_tensors(tiny_model), expected_windows, 6, get_arch("llama"), rule)
    got = _tensors(tmp_path / "model")
    assert list(got) and set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)


def test_output_criterion_runs_locally(tiny_model, tiny_text_file, tmp_path):
    config = load_config(None, tiny_overrides(tiny_model, tiny_text_file, tmp_path, "similarity.criterion=output",
                                              "plan.threshold=0.3", "eval.enabled=false"))
    pipeline.run(config, show_progress=False)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["criterion"] == "output" and plan["details"]["trace"]
    assert plan["details"]["trace"][0]["trial"] == [3, 4]  # hi starts at N-2, lo at hi-1


# ------------------------------------------------------------------------------- bad input
def run_cli(caplog, *args) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="slm_dist"):
        code = cli.main(["-q", "run", *args])
    return code, caplog.text


@pytest.fixture()
def model_copy(tiny_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def base_args(model: Path, text: Path, run_dir: Path) -> list[str]:
    return tiny_overrides(model, text, run_dir, "eval.enabled=false", "plan.target_layers_removed=2")


def first_shard(model: Path) -> Path:
    return sorted(model.glob("model-*.safetensors"))[0]


def corrupt_truncate(model: Path) -> None:
    shard = first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-100])


def corrupt_delete(model: Path) -> None:
    first_shard(model).unlink()


def corrupt_model_type(model: Path) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))


def corrupt_bin_only(model: Path) -> None:
    for f in model.glob("model*.safetensors*"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")


def corrupt_index_names_missing_file(model: Path) -> None:
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-99999-of-99999.safetensors"
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("corrupt,message", [
    (corrupt_truncate, r"is truncated.*Re-download"),
    (corrupt_delete, r"names 1 missing file\(s\).*fetch those shards again"),
    (corrupt_index_names_missing_file, r"missing file.*model-99999-of-99999"),
    (corrupt_model_type, r"model_type 'gpt2' is not supported; supported: \['llama', 'mistral', 'qwen2', 'qwen3'\]"),
    (corrupt_bin_only, r"only pickle \(\.bin\) weights.*model\.allow_pickle=true"),
])
def test_bad_checkpoints_are_named_and_left_untouched(model_copy, tiny_text_file, tmp_path, caplog, corrupt, message):
    corrupt(model_copy)
    before = folder_digest(model_copy)
    code, text = run_cli(caplog, *base_args(model_copy, tiny_text_file, tmp_path / "run"))
    assert code == cli.EXIT_BAD_INPUT
    assert re.search(message, text, re.S), text
    assert folder_digest(model_copy) == before
    assert not (tmp_path / "run" / "model").exists()


def test_empty_calibration_source(tiny_model, tmp_path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, text = run_cli(caplog, *base_args(tiny_model, empty, tmp_path / "run"))
    assert code == cli.EXIT_BAD_INPUT and "empty.txt" in text


def test_samples_shorter_than_seq_len(tiny_model, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[5, 6, 7, 8] * 10] * 20 + [[5, 6]] * 20}), src)
    code, text = run_cli(caplog, *base_args(tiny_model, src, tmp_path / "run"), "calibration.num_samples=40")
    assert code == cli.EXIT_BAD_INPUT
    # 40 rows, all sampled; the seeded permutation (seed 0) meets short row 21 first.
    assert ("pre-tokenized row 21 has 2 tokens, fewer than calibration.seq_len=32; use a shorter seq_len or "
            "drop rows shorter than it.") in text, text


@pytest.mark.parametrize("value", ["0", "1.2"])
def test_threshold_outside_range(tiny_model, tiny_text_file, tmp_path, caplog, value):
    code, text = run_cli(caplog, *base_args(tiny_model, tiny_text_file, tmp_path / "run"), f"plan.threshold={value}")
    assert code == cli.EXIT_BAD_INPUT and "plan.threshold must be in (0, 1]" in text


def test_target_removing_too_many_layers(tiny_model, tiny_text_file, tmp_path, caplog):
    code, text = run_cli(caplog, *base_args(tiny_model, tiny_text_file, tmp_path / "run"),
                         "plan.target_layers_removed=5")
    assert code == cli.EXIT_BAD_INPUT
    assert "plan.target_layers_removed=5" in text and "at most 3 layers" in text
    assert not (tmp_path / "run" / "calibration.parquet").exists()  # refused before any forward pass


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_folder_in_input_refused(model_copy, tiny_text_file, tmp_path, caplog, where):
    out = model_copy if where == "same" else model_copy / "pruned"
    before = folder_digest(model_copy)
    code, text = run_cli(caplog, *base_args(model_copy, tiny_text_file, tmp_path / "run"), f"merge.output_dir={out}")
    assert code == cli.EXIT_BAD_INPUT and "never writes into its input" in text
    assert folder_digest(model_copy) == before
