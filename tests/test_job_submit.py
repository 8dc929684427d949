"""`ray job submit` as users run it: a two-node local cluster started by `cluster/local_cluster.sh`
(a head with the job server on loopback and one worker node), the tiny config submitted through
launch.py on the Ray backend with one stage per node, the verified output checked, the cluster stopped.

The cluster is this test's own: free ports, its own folder (short: Ray's socket paths are capped at
107 bytes), every node in its own session, RAY_AUTH_MODE set the same for the nodes, the submitter and
(through the head) the job. The script stops it by process group, never with `ray stop` (which would
stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slm_dist import preflight
from slm_dist.checkpoint.verify import verify_model
from slm_dist.config import ClusterSection

REPO = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray")
SCRIPT = REPO / "cluster" / "local_cluster.sh"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None, reason="the `ray` command line is not installed")]


def test_ray_job_submit_runs_the_tiny_config_across_two_nodes(tiny_model, tiny_text_file, tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="slmjob-", dir="/tmp"))
    env = {**os.environ, "SLM_CLUSTER_DIR": str(folder), "CPUS_PER_NODE": "2", "OBJECT_STORE_MB": "256",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "run"
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start", "1"], env=env, capture_output=True, text=True,
                                 timeout=300)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        ports = {name: (folder / f"{name}_port").read_text().strip() for name in ("gcs", "dashboard", "client")}
        url = f"http://127.0.0.1:{ports['dashboard']}"
        assert f"export RAY_ADDRESS={url}" in started.stdout   # what the script tells a user to export

        # The preflight's probe against a live head: the GCS and the Ray Client server are Ray; the
        # dashboard accepts TCP too, yet is refused as cluster.address, with the port to use instead.
        gcs, client, dashboard = (f"127.0.0.1:{ports['gcs']}", f"ray://127.0.0.1:{ports['client']}",
                                  f"127.0.0.1:{ports['dashboard']}")
        probe = {a: preflight.cluster_problems(ClusterSection(backend="ray", address=a)) for a in (gcs, client, dashboard)}
        assert probe[gcs] == [] and probe[client] == [], probe
        assert "not a Ray GCS" in probe[dashboard][0] and "6379" in probe[dashboard][0]

        submit = subprocess.run(
            [RAY, "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
             sys.executable, "launch.py", "--quiet", "configs/tiny.yaml", f"model.path={tiny_model}",
             f"calibration.source={tiny_text_file}", f"eval.heldout={tiny_text_file}", f"run.dir={run_dir}",
             "cluster.backend=ray", "cluster.num_stages=2", "cluster.cpus_per_stage=1",
             "cluster.placement=STRICT_SPREAD"],
            env=env, capture_output=True, text=True, timeout=900)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        assert "succeeded" in output, output[-4000:]
        # The driver found the job's cluster by itself (Ray hands the job RAY_ADDRESS; nothing is
        # hard-coded), and its stages ran one per node: every stage actor it created is in this
        # head's records, on two different nodes.
        listed = subprocess.run([RAY, "list", "actors", "--address", url, "--format", "json", "--limit", "1000",
                                 "--detail"], env=env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr[-2000:]
        stages = [a for a in json.loads(listed.stdout) if a.get("class_name") == "StageActor"]
        assert len(stages) >= 2, stages
        assert len({a["node_id"] for a in stages}) == 2, [a["node_id"] for a in stages]
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
    # the verified output: every manifest hash, the index, the config
    assert verify_model(run_dir / "model") == []
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["layers_before"], report["layers_after"]) == (6, 4)
    assert report["perplexity_after"] is not None
    state = json.loads((run_dir / "state.json").read_text())
    assert set(state["stages"]) == {"calibrate", "plan", "merge", "eval", "report"}
    assert (run_dir / "similarity.png").stat().st_size > 10_000
