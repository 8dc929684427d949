"""The command line as tools around it expect it (issue 18): `--version`, `python -m slm_dist`,
`--json`, JSON logs with tracebacks, exit 130 on Ctrl-C with a resumable run folder, light
imports on the paths that need no model, and the progress switch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slm_dist import __version__, cli, logs, progress
from slm_dist.checkpoint.writer import FileRecord, hash_file, write_manifest
from slm_dist.testing import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
HEAVY = ("torch", "matplotlib", "transformers", "ray", "safetensors", "deepspeed", "peft", "gguf", "lm_eval")

# Runs `slm-dist ARGS` in a fresh interpreter with the optional extras made unimportable (as in a
# base `pip install slm-dist`), then prints the exit code and which heavy packages got loaded.
PROBE = f"""
import json, sys

class NoExtras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("deepspeed", "peft", "gguf", "lm_eval"):
            raise ModuleNotFoundError(f"{{name}} is not installed (base install)")
        return None

sys.meta_path.insert(0, NoExtras())
from slm_dist.cli import main
rc = main(sys.argv[1:])
print(json.dumps({{"rc": rc, "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))}}))
"""


def finished_folder(path: Path) -> Path:
    """A tiny model folder with a manifest, as `slm-dist merge` leaves one (verify passes on it)."""
    model = make_tiny_model(path)
    records = [FileRecord(p.name, hash_file(p), p.stat().st_size) for p in sorted(model.iterdir())]
    write_manifest(model, records)
    return model


def probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- imports
def test_verify_and_dry_run_import_no_torch_matplotlib_transformers_or_extras(tmp_path):
    model = finished_folder(tmp_path / "model")
    verify = probe("verify", str(model))
    assert verify == {"rc": 0, "loaded": []}
    dry = probe("plan", "--dry-run", "--json", str(TINY), f"model.path={model}", f"run.dir={tmp_path / 'run'}")
    assert dry == {"rc": 0, "loaded": []}


@pytest.mark.parametrize("rule, computes", [("drop", False), ("reference", False), ("sum", True)])
def test_a_merge_that_only_copies_never_imports_torch(tmp_path, rule, computes):
    """`drop` and `reference` keep one window member as it is: every tensor moves as bytes and the
    command never pays torch's import; `sum` computes and loads it. Either way the checkpoint written
    is the in-memory merge's."""
    import safetensors.torch

    from slm_dist.arch import get_arch
    from slm_dist.core.merge import merge_state_dict
    from slm_dist.core.planner import MergePlan

    model = make_tiny_model(tmp_path / "model")
    run = tmp_path / "run"
    run.mkdir()
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    windows = ((1, 2), (3, 5))
    (run / "plan.json").write_text(json.dumps(MergePlan(layers, windows, rule, "cka", None).to_json()))
    result = probe("-q", "merge", str(TINY), f"model.path={model}", f"run.dir={run}", f"merge.rule={rule}")
    assert result["rc"] == cli.EXIT_OK
    assert ("torch" in result["loaded"]) == computes
    source = {k: v for f in sorted(model.glob("*.safetensors")) for k, v in safetensors.torch.load_file(f).items()}
    written = {k: v for f in sorted((run / "model").glob("*.safetensors"))
               for k, v in safetensors.torch.load_file(f).items()}
    expected = merge_state_dict(source, windows, layers, get_arch("llama"), rule)
    assert written.keys() == expected.keys()
    assert all(written[k].dtype == v.dtype and written[k].equal(v) for k, v in expected.items())


def test_the_probe_sees_a_heavy_import(tmp_path):
    """Not vacuous: inspecting a pickle checkpoint needs torch.load, and the probe says so."""
    import torch
    from safetensors.torch import load_file

    model = make_tiny_model(tmp_path / "model")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(model / "config.json", pickled / "config.json")
    state = {k: v for f in sorted(model.glob("*.safetensors")) for k, v in load_file(f).items()}
    torch.save(state, pickled / "pytorch_model.bin")
    result = probe("-q", "inspect", "--allow-pickle", str(pickled))
    assert result["rc"] == cli.EXIT_OK and "torch" in result["loaded"]


# ---------------------------------------------------------------------------- entry points
def test_version_through_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "slm_dist", "--version"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"slm-dist {__version__}"


def test_verify_json_through_python_dash_m(tmp_path):
    model = finished_folder(tmp_path / "model")
    ok = subprocess.run([sys.executable, "-m", "slm_dist", "-q", "verify", "--json", str(model)], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == cli.EXIT_OK
    assert json.loads(ok.stdout) == {"model": str(model), "ok": True, "problems": []}
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    bad = subprocess.run([sys.executable, "-m", "slm_dist", "-q", "verify", "--json", str(model)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    result = json.loads(bad.stdout)
    assert bad.returncode == cli.EXIT_FAILURE and not result["ok"]
    assert len(result["problems"]) == 1 and result["problems"][0].startswith("config.json: ")   # size changed


def test_report_json_prints_the_report(monkeypatch, tmp_path, capsys):
    from slm_dist import report

    monkeypatch.setattr(report, "write_report", lambda run: {"run": str(run), "figures": {"similarity": "s.png",
                                                                                             "block_influence": "b.png"}})
    assert cli.main(["-q", "report", "--json", str(tmp_path)]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["run"] == str(tmp_path)


# ------------------------------------------------------------------------------------ logs
def test_json_log_lines_keep_the_traceback(capsys):
    logs.install(logging.INFO, as_json=True)
    try:
        try:
            raise ValueError("the cause")
        except ValueError:
            logging.getLogger("slm_dist.test").exception("it failed")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        logs.install(logging.INFO, as_json=False)
    assert line["message"] == "it failed" and line["level"] == "ERROR"
    assert "Traceback" in line["exc_info"] and "ValueError: the cause" in line["exc_info"]
    assert logs.current() == (logging.INFO, False)


def test_an_actor_process_copies_the_drivers_log_settings(capsys):
    logs.install(logging.DEBUG, as_json=True)
    try:
        assert logs.current() == (logging.DEBUG, True)
        logs.setup_worker(*logs.current())
        logging.getLogger("slm_dist.backends.ray").debug("stage 1 loaded")
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        logging.getLogger(logs.ROOT).handlers.clear()
        logging.getLogger(logs.ROOT).propagate = True
        logs.install(logging.INFO, as_json=False)
    assert line["message"] == "stage 1 loaded" and line["logger"] == "slm_dist.backends.ray"


# -------------------------------------------------------------------------------- progress
@pytest.mark.parametrize("flags, shown", [([], True), (["--quiet"], False), (["--log-json"], False)])
def test_every_command_takes_its_bars_from_one_switch(monkeypatch, tmp_path, flags, shown):
    """merge and heal included: they drew bars under --log-json before."""
    from slm_dist import heal, merging

    seen = {}

    def recorder(name):
        def stage(*args, show_progress, **kwargs):
            seen[name] = show_progress
            raise RuntimeError("stub")   # exit 1: only what the stage was given matters here
        return stage

    monkeypatch.setattr(merging, "merge_from_plan", recorder("merge"))
    monkeypatch.setattr(heal, "run_heal", recorder("heal"))
    args = [f"model.path={tmp_path}", f"run.dir={tmp_path / 'run'}"]
    try:
        assert cli.main([*flags, "merge", *args]) == cli.EXIT_FAILURE
        assert cli.main([*flags, "heal", *args]) == cli.EXIT_FAILURE
    finally:
        logs.install(logging.INFO, as_json=False)
    assert seen == {"merge": shown, "heal": shown}


def test_a_switched_off_bar_draws_nothing(capsys):
    with progress.bar(False, 3, "merge", "shard") as bar:
        bar.update(3)
        bar.set_postfix(loss="1.0")
    assert list(progress.wrap([1, 2], False, "calibrate")) == [1, 2]
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ interrupts
def test_keyboard_interrupt_exits_130(monkeypatch, caplog):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert cli.main(["inspect", "anything"]) == 130
    assert "interrupted: rerun the same command to resume" in caplog.text


def test_ctrl_c_that_surfaces_as_another_error_still_exits_130(monkeypatch, caplog):
    """Ctrl-C hits the whole process group: Ray's workers can die of it first, and the driver then
    sees their error instead of a KeyboardInterrupt. It is still an interruption; without Ctrl-C the
    same error is a failure."""
    def workers_died_of_it(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)   # the handler raises here
        except KeyboardInterrupt:
            pass           # swallowed on the way, as a library waiting on its workers may do
        raise RuntimeError("the training workers died")

    monkeypatch.setattr(cli, "cmd_inspect", workers_died_of_it)
    assert cli.main(["inspect", "anything"]) == 130
    assert "interrupted (RuntimeError: the training workers died): rerun the same command" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # Python's own handler is back

    def failed(args):
        raise RuntimeError("the training workers died")

    monkeypatch.setattr(cli, "cmd_inspect", failed)
    assert cli.main(["inspect", "anything"]) == cli.EXIT_FAILURE


def test_a_run_started_immune_to_ctrl_c_stays_immune(monkeypatch, caplog):
    """nohup, a script's background job or a scheduler starts the process with SIGINT ignored: a SIGINT
    then neither interrupts the command nor turns its result into an interruption, and stays ignored."""
    def finishes_despite_sigint(args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)   # a handler, had one been installed, would raise here
        return 0

    monkeypatch.setattr(cli, "cmd_inspect", finishes_despite_sigint)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cli.main(["inspect", "anything"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert "interrupted" not in caplog.text


@pytest.mark.slow
def test_sigint_mid_calibration_exits_130_and_the_rerun_completes(tiny_model, tiny_text_file, tmp_path):
    """A real `slm-dist run` on Ray (3 stages of 1 CPU on this 2-core machine: the private Ray it starts
    is sized to them), SIGINT once the first batch is counted; exit 130, then the rerun finishes."""
    run_dir = tmp_path / "run"
    args = [f"model.path={tiny_model}", f"calibration.source={tiny_text_file}", f"eval.heldout={tiny_text_file}",
            f"run.dir={run_dir}", "cluster.backend=ray", "cluster.num_stages=3", "cluster.cpus_per_stage=1",
            "cluster.checkpoint_every=1", "calibration.num_samples=96", "calibration.batch_size=2"]
    cmd = [sys.executable, "-m", "slm_dist", "run", str(TINY), *args]
    # A fresh, short Ray temp dir: no other cluster on this node is discovered (as on a clean machine).
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=temp_dir)
    log_path = tmp_path / "first.log"
    try:
        with open(log_path, "w") as log_file:
            first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log_file,
                                     start_new_session=True)
            try:
                deadline = time.monotonic() + 240
                while not (run_dir / "stats.parquet").exists():   # the first batch is counted and saved
                    assert first.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, "calibration never started"
                    time.sleep(0.05)
                os.kill(first.pid, signal.SIGINT)
                first.wait(timeout=120)
            finally:
                if first.poll() is None:
                    os.killpg(first.pid, signal.SIGKILL)
                    first.wait()
        text = log_path.read_text()
        assert first.returncode == 130, text[-3000:]
        assert "interrupted: rerun the same command to resume" in text
        assert "'CPU': 4.0" in text   # private Ray sized to 3 stages x 1 CPU + 1, not to the 2 cores
        assert not (run_dir / "report.json").exists()

        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "resuming from" in second.stderr   # the reducer's INFO line, forwarded from its actor
        assert "StageActor(stage=2, layers=[4,6))" in second.stderr   # Ray's log prefix names the stage
        report = json.loads((run_dir / "report.json").read_text())
        assert report["layers_after"] == report["layers_before"] - 2
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
