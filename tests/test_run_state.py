"""Scheduled pipelines: stage keys, skip / resume / --force, and a real kill in the middle of a run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slm_dist import pipeline, run_state
from slm_dist.checkpoint.index import CheckpointIndex, TensorInfo
from slm_dist.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, main
from slm_dist.config import load_config
from slm_dist.core import planner
from slm_dist.workers.stage_worker import StageWorker
from slm_dist.workers.stats_reducer import StatsReducer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def overrides(model: Path, text: Path, run_dir: Path, *extra: str) -> list[str]:
    # 1 KB shards: dozens of output files, so a merge has a middle to be interrupted in
    return [f"model.path={model}", f"calibration.source={text}", f"eval.heldout={text}", f"run.dir={run_dir}",
            "merge.max_shard_bytes=1024", *extra]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """mtime and sha256 of every file below ``folder``: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def digests(folder: Path, names=None) -> dict[str, str]:
    paths = sorted(folder.rglob("*")) if names is None else [folder / n for n in names]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


RESULT_FILES = ("calibration.parquet", "stats.parquet", "similarity.json", "plan.json", "eval.json")


@pytest.fixture(scope="module")
def finished(tiny_model, tiny_text_file, tmp_path_factory) -> Path:
    """One uninterrupted run: the reference every other run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    pipeline.run(load_config(TINY, overrides(tiny_model, tiny_text_file, run_dir)), show_progress=False)
    return run_dir


# ------------------------------------------------------------------------------ keys
def _inputs(tmp_path: Path, text: Path) -> run_state.RunInputs:
    return run_state.RunInputs(tmp_path / "m", text, text, tmp_path / "out", "cpu", "float32")


def test_stage_keys_change_only_where_the_config_matters(tmp_path, tiny_text_file):
    base = ["model.path=/m", "calibration.source=/c"]
    inputs = _inputs(tmp_path, tiny_text_file)

    def keys(*extra: str) -> dict[str, str]:
        return run_state.stage_keys(load_config(TINY, [*base, *extra]), inputs, "index-fp")

    ref = keys()
    changed = lambda k: [s for s in run_state.STAGES if k[s] != ref[s]]  # noqa: E731
    assert changed(keys("plan.threshold=0.9")) == ["plan", "merge", "eval", "report"]
    assert changed(keys("merge.rule=mean")) == ["plan", "merge", "eval", "report"]  # plan.json names the rule
    # the planner fits what these ask for (plan.json and the corrections file change)
    for setting in ("merge.correction=refit", "merge.correction_weight=none", "merge.correction_batches=4",
                    "merge.alpha_batches=3", "merge.pool_cap=3"):
        assert changed(keys(setting)) == ["plan", "merge", "eval", "report"], setting
    assert changed(keys("merge.max_shard_bytes=2048")) == ["merge", "eval", "report"]
    assert changed(keys("eval.seq_len=16")) == ["eval", "report"]
    assert changed(keys("heal.epochs=3")) == ["eval", "report"]  # healing runs in the eval stage
    assert changed(keys("calibration.seed=5")) == list(run_state.STAGES)
    assert changed(keys("similarity.kernel=rbf")) == list(run_state.STAGES)
    # how the work is spread never changes what it writes
    assert changed(keys("cluster.num_stages=3", "cluster.max_inflight=4", "merge.max_parallel=4")) == []
    assert run_state.run_key(load_config(TINY, [*base, "cluster.num_stages=3"]), "index-fp") != \
        run_state.run_key(load_config(TINY, base), "index-fp")
    # another checkpoint, or other calibration text, invalidates everything
    other = run_state.stage_keys(load_config(TINY, base), inputs, "other-index")
    assert all(other[s] != ref[s] for s in run_state.STAGES)
    text2 = tmp_path / "t2.txt"
    text2.write_text(tiny_text_file.read_text() + "more\n")
    moved = run_state.stage_keys(load_config(TINY, base), replace(inputs, calibration_source=text2), "index-fp")
    assert moved["calibrate"] != ref["calibrate"]


def test_index_fingerprint_sees_shapes_not_just_names(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    info = TensorInfo("w", "a.safetensors", "F32", (2, 3), 24)
    index = CheckpointIndex(tmp_path, {"model_type": "llama"}, {"w": info}, ("a.safetensors",), "safetensors")
    same = CheckpointIndex(tmp_path, {"model_type": "llama"}, {"w": info}, ("a.safetensors",), "safetensors")
    other = CheckpointIndex(tmp_path, {"model_type": "llama"}, {"w": replace(info, shape=(3, 2))},
                            ("a.safetensors",), "safetensors")
    assert run_state.index_fingerprint(index) == run_state.index_fingerprint(same)
    assert run_state.index_fingerprint(index) != run_state.index_fingerprint(other)


def test_stages_to_run_and_the_output_criterion(tmp_path, tiny_text_file):
    keys = {s: f"k-{s}" for s in run_state.STAGES}
    state = run_state.RunState(tmp_path, keys, "run", _inputs(tmp_path, tiny_text_file), {"stages": {}})
    assert state.stages_to_run() == run_state.STAGES
    for s in ("calibrate", "plan"):
        state.mark_done(s, 1.0)
    assert state.stages_to_run() == ("merge", "eval", "report")
    state.data["stages"]["plan"]["key"] = "stale"
    assert state.stages_to_run("cka") == ("plan", "merge", "eval", "report")
    # the published loop scores candidates on hidden states only a calibration pass caches
    assert state.stages_to_run("output") == run_state.STAGES
    assert state.stages_to_run("cka", stop_after="plan") == ("plan",)


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, tiny_text_file):
    a = run_state.RunState(tmp_path, {}, "k", _inputs(tmp_path, tiny_text_file), {"stages": {}})
    b = run_state.RunState(tmp_path, {}, "k", _inputs(tmp_path, tiny_text_file), {"stages": {}})
    a.lock()
    try:
        with pytest.raises(run_state.RunStateError, match="another slm-dist process"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


# ------------------------------------------------------------------------------ runs
def test_rerun_of_a_finished_run_does_nothing(finished, tiny_model, tiny_text_file, caplog, monkeypatch):
    before = snapshot(finished)
    monkeypatch.setattr(StageWorker, "__init__", lambda *a, **k: pytest.fail("a finished run loaded a stage"))
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="slm_dist"):
        report = pipeline.run(load_config(TINY, overrides(tiny_model, tiny_text_file, finished)), show_progress=False)
    code = main(["--quiet", "run", str(TINY), *overrides(tiny_model, tiny_text_file, finished)])
    assert code == EXIT_OK and time.perf_counter() - start < 5
    assert snapshot(finished) == before
    assert "is already complete: nothing to do" in caplog.text
    assert report == json.loads((finished / "report.json").read_text())
    assert set(json.loads((finished / "state.json").read_text())["stages"]) == set(run_state.STAGES)


def test_replanning_reuses_the_statistics_without_a_forward_pass(finished, tiny_model, tiny_text_file, tmp_path,
                                                                 monkeypatch):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    stats_before = snapshot(run_dir)["stats.parquet"]
    # no stage worker may even be built: calibration statistics come from stats.parquet, eval is off
    monkeypatch.setattr(StageWorker, "__init__", lambda *a, **k: pytest.fail("re-planning ran the model"))
    cfg = load_config(TINY, overrides(tiny_model, tiny_text_file, run_dir, "plan.threshold=0.9",
                                      "eval.enabled=false"))
    report = pipeline.run(cfg, show_progress=False)
    assert snapshot(run_dir)["stats.parquet"] == stats_before
    cka = StatsReducer.load(run_dir / "stats.parquet").cka()
    assert report["threshold"] == 0.9
    assert report["windows"] == [list(w) for w in planner.plan_windows_cka(cka, 0.9, 1, 1, None)]
    assert report["layers_after"] == 6 - sum(hi - lo for lo, hi in report["windows"])


def test_crash_in_merge_resumes_without_recalibrating(finished, tiny_model, tiny_text_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, overrides(tiny_model, tiny_text_file, run_dir))

    def crash(folder, *a, **k):
        raise RuntimeError("simulated crash after the shards were written")

    monkeypatch.setattr(pipeline, "verify_model", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(cfg, show_progress=False)
    assert set(json.loads((run_dir / "state.json").read_text())["stages"]) == {"calibrate", "plan"}
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "calibrate", lambda *a: pytest.fail("resume recalibrated"))
    pipeline.run(cfg, show_progress=False)
    assert digests(run_dir / "model") == digests(finished / "model")
    assert digests(run_dir, RESULT_FILES) == digests(finished, RESULT_FILES)


# A real `slm-dist run` in a child process, held at a point inside one stage: the test's signal lands
# there. Each hook runs the real function first, so the stage has done (and written) part of its work.
PAUSED_RUN = """
import functools, pathlib, sys, time
marker, phase, argv = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
from slm_dist.checkpoint.writer import ShardWriter
from slm_dist.core import planner
from slm_dist.workers.stats_reducer import StatsReducer
owner, names = {"calibrate": (StatsReducer, ["add"]),       # the first batch's statistics counted
                "plan": (planner, ["search_threshold"]),     # the plan chosen, plan.json not yet written
                "merge": (ShardWriter, ["write", "write_bytes"])}[phase]  # a shard half written (computed or copied)
def pause_after(real):
    @functools.wraps(real)
    def paused(*args, **kwargs):
        out = real(*args, **kwargs)
        marker.touch()
        time.sleep(120)
        return out
    return paused
for name in names:
    setattr(owner, name, pause_after(getattr(owner, name)))
from slm_dist.cli import main
sys.exit(main(argv))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "sigint"])
@pytest.mark.parametrize("phase", ["calibrate", "plan", "merge"])
def test_an_interrupted_run_reruns_to_the_uninterrupted_output(finished, tiny_model, tiny_text_file, tmp_path,
                                                               phase, sig):
    """Kill -9 or Ctrl-C a real `slm-dist run` in the middle of a stage; the rerun's every output byte
    equals the uninterrupted run's, and nothing of the interrupted attempt is taken for finished."""
    run_dir, marker = tmp_path / "run", tmp_path / "paused"
    # merge.max_parallel=1 keeps the shard writes on the main thread, where SIGINT lands
    args = overrides(tiny_model, tiny_text_file, run_dir, "merge.max_parallel=1")
    script = tmp_path / "paused_run.py"
    script.write_text(PAUSED_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(marker), phase, "--quiet", "run", str(TINY), *args],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the run never reached the point to interrupt"
            time.sleep(0.005)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr[-2000:]
    if sig == signal.SIGINT:
        assert "interrupted: rerun the same command to resume" in stderr
    state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {"stages": {}}
    assert phase not in state["stages"] and not (run_dir / "report.json").exists()   # not taken for finished
    if phase == "merge":   # the signal landed mid-shard: kill -9 leaves the .partial file, Ctrl-C removes it
        assert bool(list((run_dir / "model").glob(".*.partial"))) == (sig == signal.SIGKILL)
        assert not (run_dir / "model" / "model.safetensors.index.json").exists()
    assert main(["--quiet", "run", str(TINY), *args]) == EXIT_OK
    assert digests(run_dir / "model") == digests(finished / "model")
    assert digests(run_dir, RESULT_FILES) == digests(finished, RESULT_FILES)


class DiskFull:
    """The writer's ``os`` with a device that fills up after ``room`` bytes (ENOSPC, as a real disk says it)."""

    def __init__(self, room: int):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def _take(self, n: int) -> None:
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n

    def write(self, fd, data):
        self._take(len(data))
        return os.write(fd, data)

    def copy_file_range(self, src, dst, count, offset_src=None, offset_dst=None):
        self._take(count)
        return os.copy_file_range(src, dst, count, offset_src, offset_dst)


def test_a_disk_full_mid_merge_fails_naming_it_and_the_rerun_gives_the_clean_output(
        finished, tiny_model, tiny_text_file, tmp_path, monkeypatch, caplog):
    from slm_dist.checkpoint import writer

    run_dir = tmp_path / "run"
    args = overrides(tiny_model, tiny_text_file, run_dir)
    room = sum(p.stat().st_size for p in (finished / "model").glob("*.safetensors")) // 2
    monkeypatch.setattr(writer, "os", DiskFull(room))
    with caplog.at_level("ERROR", logger="slm_dist"):
        assert main(["--quiet", "run", str(TINY), *args]) == EXIT_FAILURE
    assert "no space left on the device writing" in caplog.text and "rerun the same command" in caplog.text
    out = run_dir / "model"
    assert 0 < len(list(out.glob("model-*.safetensors"))) < len(list((finished / "model").glob("model-*.safetensors")))
    assert not list(out.glob(".*.partial")) and not (out / "model.safetensors.index.json").exists()
    assert "merge" not in json.loads((run_dir / "state.json").read_text())["stages"]
    monkeypatch.undo()   # space freed
    monkeypatch.setattr(pipeline, "calibrate", lambda *a: pytest.fail("the statistics were intact"))
    assert main(["--quiet", "run", str(TINY), *args]) == EXIT_OK
    assert digests(out) == digests(finished / "model")
    assert digests(run_dir, RESULT_FILES) == digests(finished, RESULT_FILES)


def test_force_starts_over_and_gives_the_same_bytes(finished, tiny_model, tiny_text_file, tmp_path, monkeypatch):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    calls = []
    real = pipeline.calibrate
    monkeypatch.setattr(pipeline, "calibrate", lambda *a: calls.append(1) or real(*a))
    cfg = overrides(tiny_model, tiny_text_file, run_dir)
    assert main(["--quiet", "run", "--force", str(TINY), *cfg]) == EXIT_OK and calls == [1]
    assert digests(run_dir / "model") == digests(finished / "model")
    assert digests(run_dir, RESULT_FILES) == digests(finished, RESULT_FILES)


def test_a_damaged_artifact_redoes_its_stage_and_later_ones(finished, tiny_model, tiny_text_file, tmp_path,
                                                             monkeypatch, caplog):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    cfg = load_config(TINY, overrides(tiny_model, tiny_text_file, run_dir, "eval.enabled=false"))
    pipeline.run(cfg, show_progress=False)  # the copy's own output folder
    plan = json.loads((run_dir / "plan.json").read_text())
    (run_dir / "plan.json").write_text(json.dumps({**plan, "windows": []}))
    monkeypatch.setattr(pipeline, "calibrate", lambda *a: pytest.fail("the statistics were intact"))
    with caplog.at_level("INFO", logger="slm_dist"):
        pipeline.run(cfg, show_progress=False)
    assert "plan.json changed or vanished" in caplog.text and "stages to run: plan, merge, eval, report" in caplog.text
    assert json.loads((run_dir / "plan.json").read_text()) == plan


def test_exit_codes_distinguish_bad_input_failure_and_success(tiny_model, tiny_text_file, tmp_path, monkeypatch):
    args = overrides(tiny_model, tiny_text_file, tmp_path / "run")
    assert main(["--quiet", "run", str(TINY), *args, "plan.no_such_key=1"]) == EXIT_BAD_INPUT
    assert main(["--quiet", "run", str(TINY), *args, f"model.path={tmp_path / 'nowhere'}"]) == EXIT_BAD_INPUT

    def broken(*a, **k):
        raise RuntimeError("a stage died")

    monkeypatch.setattr(pipeline, "calibrate", broken)
    assert main(["--quiet", "run", str(TINY), *args]) == EXIT_FAILURE
    assert "calibrate" not in run_state.load_state(tmp_path / "run").get("stages", {})


def test_plan_subcommand_stops_after_the_plan(tiny_model, tiny_text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = overrides(tiny_model, tiny_text_file, run_dir, "eval.enabled=false")
    assert main(["--quiet", "plan", "--json", str(TINY), *args]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert plan == {k: v for k, v in json.loads((run_dir / "plan.json").read_text()).items() if k != "details"}
    assert not (run_dir / "model").exists()
    assert set(json.loads((run_dir / "state.json").read_text())["stages"]) == {"calibrate", "plan"}
    assert torch.equal(StatsReducer.load(run_dir / "stats.parquet").cka(),
                       torch.tensor(json.loads((run_dir / "similarity.json").read_text())["cka"], dtype=torch.float64))
