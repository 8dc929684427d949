"""`ray job submit` as users run it: a Ray head with a job server on loopback, the tiny config
submitted through launch.py on the Ray backend, the verified output checked, the head stopped.

The head is this test's own: free ports, its own temp folder, its own session (process group),
RAY_AUTH_MODE set the same for the head, the submitter and (through the head) the job. It is
stopped by process group, never with `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from slm_dist import preflight
from slm_dist.checkpoint.verify import verify_model
from slm_dist.config import ClusterSection

REPO = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None, reason="the `ray` command line is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_server(url: str, head: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, f"the Ray head exited with {head.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no job server at {url} after {timeout_s:.0f} s")


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the head's process group, then SIGKILL it and whatever else runs in its session
    (Ray puts workers and job drivers in groups of their own, inside the head's session)."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group and session id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    leftovers = subprocess.run(["ps", "-o", "pid=", "-s", str(pgid)], capture_output=True, text=True).stdout.split()
    for pid in leftovers:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ray_job_submit_runs_the_tiny_config(tiny_model, tiny_text_file, tmp_path):
    gcs, dashboard, client, agent = free_port(), free_port(), free_port(), free_port()
    # Short: Ray's unix sockets live below it and socket paths are capped at 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="slmray-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head_log = tmp_path / "head.log"
    with open(head_log, "wb") as log:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--temp-dir={temp_dir}", "--num-cpus=4", f"--object-store-memory={256 * 2**20}",
             "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_job_server(url, head)
        # The preflight's probe against a live head: the GCS and the Ray Client server are Ray; the
        # dashboard accepts TCP too, yet is refused as cluster.address, with the port to use instead.
        probe = {address: preflight.cluster_problems(ClusterSection(backend="ray", address=address))
                 for address in (f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}", f"127.0.0.1:{dashboard}")}
        assert probe[f"127.0.0.1:{gcs}"] == [] and probe[f"ray://127.0.0.1:{client}"] == [], probe
        assert "not a Ray GCS" in probe[f"127.0.0.1:{dashboard}"][0] and "6379" in probe[f"127.0.0.1:{dashboard}"][0]
        run_dir = tmp_path / "run"
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
             sys.executable, "launch.py", "--quiet", "configs/tiny.yaml", f"model.path={tiny_model}",
             f"calibration.source={tiny_text_file}", f"eval.heldout={tiny_text_file}", f"run.dir={run_dir}",
             "cluster.backend=ray", "cluster.num_stages=2", "cluster.cpus_per_stage=1"],
            env=env, capture_output=True, text=True, timeout=900)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        assert "succeeded" in output, output[-4000:]
        # The driver found the job's cluster by itself (Ray hands the job RAY_ADDRESS; nothing is
        # hard-coded): the stage actors it created are in this head's records.
        listed = subprocess.run([RAY, "list", "actors", "--address", url, "--format", "json", "--limit", "1000"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-2000:]
        classes = [a.get("class_name") for a in json.loads(listed.stdout)]
        assert classes.count("StageActor") >= 2, classes
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert head.poll() is not None
    # the verified output: every manifest hash, the index, the config
    assert verify_model(run_dir / "model") == []
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["layers_before"], report["layers_after"]) == (6, 4)
    assert report["perplexity_after"] is not None
    state = json.loads((run_dir / "state.json").read_text())
    assert set(state["stages"]) == {"calibrate", "plan", "merge", "eval", "report"}
    assert (run_dir / "similarity.png").stat().st_size > 10_000
