"""The Ray backend against the in-process backend and the full Hugging Face model.

One simulated 2-node Ray cluster (``ray.cluster_utils.Cluster``, 4 logical CPUs per node) serves the
whole module, and stage actors are shared between tests where the layer split is the same (each
actor start imports torch and transformers: seconds on a 2-core machine).

Tolerances: Ray == local to 1e-10 (the same float32 kernels; the float64 HSIC sums may be added in
another order); stages == HF ``output_hidden_states`` to 1e-6 in CKA on the tiny model, 1e-5 on
SmolLM2 (float32 forward through the same modules, measured ~1e-9 on the tiny model).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from slm_dist import calibration, context, pipeline  # noqa: E402
from slm_dist.arch import get_arch, prune_config  # noqa: E402
from slm_dist.backends.local import LocalBackend  # noqa: E402
from slm_dist.backends.ray import RayBackend, RayBackendError  # noqa: E402
from slm_dist.checkpoint.index import open_index  # noqa: E402
from slm_dist.config import ClusterSection, load_config  # noqa: E402
from slm_dist.core import merge, planner, similarity  # noqa: E402
from slm_dist.testing import hf_layer_outputs, make_tiny_model, tiny_text, tiny_tokenizer  # noqa: E402
from slm_dist.workers.stage_worker import StageSpec, StatsSpec  # noqa: E402
from slm_dist.workers.stats_reducer import StatsReducer  # noqa: E402

STATS = StatsSpec(kernel="linear", unit="token", tokens_per_batch=48, skip_first_token=True, seed=0)
SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}
PLACEMENT = {1: "PACK", 2: "SPREAD", 3: "PACK"}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, each with its own resources; one session for the module."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("this process already holds a Ray session")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the same for the cluster and its driver
    # Logical CPUs, not cores: the module's stage actors hold 0.5 each, several sets at once.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    c.add_node(num_cpus=4)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-layer random Llama in several shards, and 8 calibration batches read back from
    calibration.parquet (the file every backend and the reference use)."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model", num_layers=6, hidden=32)
    (root / "text.txt").write_text(tiny_text())
    ids = calibration.load_calibration(root / "text.txt", tiny_tokenizer(), num_samples=32, seq_len=24, seed=0)
    calibration.save_calibration(root / "calibration.parquet", ids)
    ids = calibration.load_calibration_parquet(root / "calibration.parquet")
    return model, context.batches(ids, 4)


@pytest.fixture(scope="module")
def staged(cluster, tiny):
    """RayBackend per stage count for the tiny model, started on first use, closed at module end."""
    backends: dict[int, RayBackend] = {}

    def get(num_stages: int) -> RayBackend:
        if num_stages not in backends:
            backends[num_stages] = RayBackend(ray_cluster(num_stages=num_stages, max_inflight=3, max_restarts=2,
                                                          placement=PLACEMENT[num_stages]))
        return backends[num_stages]

    yield get
    for backend in backends.values():
        backend.close()


def ray_cluster(**overrides) -> ClusterSection:
    # Fractional CPUs: the module's stage sets (1 + 2 + 3 + 3 stages) fit the two 4-CPU nodes at once.
    return ClusterSection(**{"backend": "ray", "cpus_per_stage": 0.5, "placement_timeout_s": 60, **overrides})


def specs_for(model_dir: Path, slices, num_layers: int) -> list[StageSpec]:
    return [StageSpec(str(model_dir), a, b, num_layers) for a, b in slices]


def hf_cka(model_dir: Path, batches, stats: StatsSpec) -> torch.Tensor:
    """The reference: CKA from the full HF model's ``output_hidden_states`` on the same batches.

    The last layer's output is taken before the final norm, as the stages report it.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    n = model.config.num_hidden_layers
    acc = similarity.HsicAccumulator(n + 1)
    for batch_id, ids in batches:
        reps = hf_layer_outputs(model, ids)
        b, s = ids.shape
        index = similarity.sample_token_index(b, s, stats.tokens_per_batch, stats.seed, batch_id,
                                              skip_first=stats.skip_first_token)
        grams = torch.stack([similarity.gram(similarity.layer_representation(r, stats.unit, index), stats.kernel)
                             for r in reps])
        acc.add(batch_id, similarity.hsic_matrix(grams))
    return acc.cka()


def assert_holds_only_its_layers(report: dict, model_dir: Path, num_layers: int) -> None:
    """The stage read exactly its layers' tensors (+ embeddings first, final norm/lm_head last)."""
    index = open_index(model_dir)
    arch = get_arch(index.model_type)
    start, stop = report["start"], report["stop"]
    expected = {k for k in index.tensors if (arch.split_key(k) or (-1,))[0] in range(start, stop)}
    if start == 0:
        expected |= {k for k in index.tensors if k.startswith(arch.embed_module)}
    if stop == num_layers:
        expected |= {k for k in index.tensors if arch.split_key(k) is None and not k.startswith(arch.embed_module)}
    loaded = report["loaded_keys"]
    assert len(loaded) == len(set(loaded)), "a tensor was read twice"
    assert set(loaded) == expected
    outside = [k for k in loaded if (arch.split_key(k) or (start,))[0] not in range(start, stop)]
    assert not outside
    assert report["held_bytes"] == sum(index.tensors[k].nbytes for k in loaded)  # float32 in, float32 held


# ---------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_ray_equals_local_equals_hf_output_hidden_states(staged, tiny, num_stages):
    model, batches = tiny
    specs = specs_for(model, SPLITS[num_stages], 6)
    backend = staged(num_stages)
    on_ray = backend.calibrate(specs, STATS, batches)
    reports = backend.stage_reports()
    logp_ray = backend.logprobs(specs, batches)
    local = LocalBackend()
    in_process = local.calibrate(specs, STATS, batches)
    logp_local = local.logprobs(specs, batches)

    assert on_ray.num_batches == in_process.num_batches == len(batches)
    torch.testing.assert_close(on_ray.cka(), in_process.cka(), atol=1e-10, rtol=0)
    torch.testing.assert_close(on_ray.cka(), hf_cka(model, batches, STATS), atol=1e-6, rtol=0)
    torch.testing.assert_close(on_ray.block_influence(), in_process.block_influence(), atol=1e-10, rtol=0)
    for a, b in zip(logp_ray, logp_local):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for report in reports:
        assert_holds_only_its_layers(report, model, 6)
    if PLACEMENT[num_stages] == "SPREAD":
        # Two nodes with equal free resources: SPREAD puts each stage on its own node.
        assert len({r["node_id"] for r in reports}) == num_stages == 2


@pytest.mark.parametrize("placement, cpus, reason", [
    ("STRICT_SPREAD", 0.5, r"STRICT_SPREAD needs 3 nodes that each hold one bundle; 2 of 2 do"),
    # 7.5 CPUs of bundles on 8 CPUs, yet each 4-CPU node holds one 2.5-CPU bundle: counted per node
    ("PACK", 2.5, r"the nodes hold 2 such bundles in all \(\[1, 1\] per node\), 3 are needed"),
])
def test_bundles_that_can_never_fit_fail_without_waiting(cluster, tiny, monkeypatch, placement, cpus, reason):
    """Compared with the nodes' total resources before any placement group exists: no wait at all
    (placement_timeout_s is an hour, and creating a placement group fails this test)."""
    import slm_dist.backends.ray as ray_backend

    model, _ = tiny
    monkeypatch.setattr(ray_backend, "placement_group", lambda *a, **k: pytest.fail("waited for a placement group"))
    backend = RayBackend(ray_cluster(num_stages=3, placement=placement, cpus_per_stage=cpus, placement_timeout_s=3600))
    with pytest.raises(RayBackendError, match=r"can never place 3 stage bundles .*" + reason):
        backend.calibrate(specs_for(model, SPLITS[3], 6), STATS, [])
    backend.close()


def test_an_autoscaling_cluster_waits_for_nodes_then_says_so(cluster, tiny):
    model, _ = tiny
    backend = RayBackend(ray_cluster(num_stages=3, placement="STRICT_SPREAD", placement_timeout_s=2, autoscaling=True))
    with pytest.raises(RayBackendError, match=r"could not place 3 stage bundles .*STRICT_SPREAD.*2 node"):
        backend.calibrate(specs_for(model, SPLITS[3], 6), STATS, [])
    backend.close()


def test_stage_process_killed_mid_run_gives_the_clean_run_matrix(staged, tiny):
    model, batches = tiny
    specs = specs_for(model, SPLITS[3], 6)
    backend = staged(3)
    clean = backend.calibrate(specs, STATS, batches)
    victim = backend.stage_handles()[1]
    pid = backend.stage_reports()[1]["pid"]
    killed: list[int] = []

    def kill_stage_1(batch_id: int) -> None:
        if killed:
            return
        killed.append(batch_id)
        # Keep the stage busy so the next batches queue on it, then kill its process under them.
        victim.__ray_call__.remote(lambda self: time.sleep(5))
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()

    crashed = backend.calibrate(specs, STATS, batches, on_batch=kill_stage_1)
    counts = backend.counts
    new_pid = backend.stage_reports()[1]["pid"]
    assert len(killed) == 1  # killed after the first batch was counted, with the others in flight
    assert new_pid != pid, "the stage actor should have been restarted in a new process"
    assert counts.retried >= 1 and counts.sent == len(batches) + counts.retried
    assert crashed.num_batches == len(batches)
    torch.testing.assert_close(crashed.cka(), clean.cka(), atol=1e-12, rtol=0)
    torch.testing.assert_close(crashed.counts, clean.counts, atol=0, rtol=0)  # every token counted once
    torch.testing.assert_close(crashed.block_influence(), clean.block_influence(), atol=1e-12, rtol=0)


class DriverDied(Exception):
    pass


def test_rerun_after_driver_death_resumes_from_stats_parquet(staged, tiny, tmp_path):
    model, batches = tiny
    specs = specs_for(model, SPLITS[2], 6)
    reference = LocalBackend().calibrate(specs, STATS, batches)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = RayBackend(ray_cluster(num_stages=2, max_inflight=1, checkpoint_every=2))
    done: list[int] = []

    def die_after_five(batch_id: int) -> None:
        done.append(batch_id)
        if len(done) == 5:
            raise DriverDied()

    try:
        with pytest.raises(DriverDied):
            first.calibrate(specs, STATS, batches, run_dir=run_dir, on_batch=die_after_five)
    finally:
        first.close()  # the driver's actors die with it
    # Checkpoints after batches 2 and 4; the fifth was counted in memory only and is lost.
    assert StatsReducer.load(run_dir / "stats.parquet").num_batches == 4

    second = staged(2)  # another driver's stages
    resumed = second.calibrate(specs, STATS, batches, run_dir=run_dir)
    assert (second.counts.resumed, second.counts.sent) == (4, 4)
    torch.testing.assert_close(resumed.cka(), reference.cka(), atol=1e-12, rtol=0)
    torch.testing.assert_close(resumed.counts, reference.counts, atol=0, rtol=0)
    assert StatsReducer.load(run_dir / "stats.parquet").num_batches == len(batches)
    # A checkpoint written for other inputs is not resumed from.
    other = second.calibrate(specs, STATS, batches[:4], run_dir=run_dir)
    assert (second.counts.resumed, second.counts.sent) == (0, 4)
    assert other.num_batches == 4


# ------------------------------------------------------------- published-code criterion (output)
@pytest.fixture(scope="module")
def eight_layer(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("eight") / "model", num_layers=8, hidden=32, seed=0)
    ids = torch.randint(3, 60, (8, 16), generator=torch.Generator().manual_seed(0))
    return model, context.batches(ids, 4)


def brute_force_scorer(model_dir: Path, batches, rule: str):
    """Score a candidate the slow, obvious way: merge the full state dict (merge.merge_state_dict),
    build the whole pruned HF model, run every batch, compare final-norm hidden states."""
    from transformers import AutoConfig, AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    state = original.state_dict()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = get_arch(config["model_type"])
    n = config["num_hidden_layers"]

    def final_hidden(model, ids):
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm

    references = [final_hidden(original, ids) for _, ids in batches]

    def score(committed, trial) -> float:
        lo, hi = trial
        windows = list(committed) + ([trial] if hi > lo else [])
        merged = merge.merge_state_dict(state, windows, n, arch, rule)
        kept = [i for i in range(n) if not any(a < i <= b for a, b in windows)]
        pruned = AutoConfig.for_model(**prune_config(config, kept, arch))
        model = AutoModelForCausalLM.from_config(pruned, dtype=torch.float32, attn_implementation="sdpa").eval()
        model.load_state_dict(merged, strict=True)
        total, count = 0.0, 0
        for (_, ids), ref in zip(batches, references):
            cos = torch.nn.functional.cosine_similarity(final_hidden(model, ids).flatten(1), ref.flatten(1), dim=1)
            total += float(cos.double().sum())
            count += cos.numel()
        return total / count

    return score


CASES = [("sum", 0.8), ("reference", 0.85)]  # thresholds with commits and a clear margin on this model


@pytest.fixture(scope="module")
def brute_force_plans(eight_layer):
    model, batches = eight_layer
    plans = {}
    for rule, threshold in CASES:
        windows, trace = planner.plan_windows_output(8, brute_force_scorer(model, batches, rule), threshold)
        # Preconditions that make the comparison mean something: merges happen, and no score sits so
        # close to the threshold that float noise could flip a decision.
        assert windows, f"{rule}@{threshold}: brute force merged nothing; pick another threshold"
        assert min(abs(s.score - threshold) for s in trace) > 1e-4
        plans[(rule, threshold)] = (windows, trace)
    return plans


def test_local_output_criterion_matches_brute_force(eight_layer, brute_force_plans):
    model, batches = eight_layer
    specs = specs_for(model, [(0, 3), (3, 8)], 8)
    local = LocalBackend()
    local.calibrate(specs, STATS, batches, keep_for_output_criterion=True)
    for (rule, threshold), (windows, trace) in brute_force_plans.items():
        got, got_trace = local.plan_output(threshold, rule, 1, 1, 8)
        assert got == windows
        assert [(s.committed, s.trial, s.decision) for s in got_trace] == \
            [(s.committed, s.trial, s.decision) for s in trace]
        for a, b in zip(got_trace, trace):
            assert a.score == pytest.approx(b.score, abs=1e-6)


def test_ray_output_criterion_matches_brute_force_and_survives_a_stage_restart(cluster, eight_layer,
                                                                                brute_force_plans):
    model, batches = eight_layer
    specs = specs_for(model, [(0, 2), (2, 5), (5, 8)], 8)
    plans = brute_force_plans
    backend = RayBackend(ray_cluster(num_stages=3))
    try:
        backend.calibrate(specs, STATS, batches, keep_for_output_criterion=True)
        for k, ((rule, threshold), (windows, trace)) in enumerate(plans.items()):
            if k == 1:
                # A stage that restarts between plans loses its cached inputs; scoring re-caches them.
                os.kill(backend.stage_reports()[2]["pid"], signal.SIGKILL)
            got, got_trace = backend.plan_output(threshold, rule, 1, 1, 8)
            assert got == windows
            for a, b in zip(got_trace, trace):
                assert a.score == pytest.approx(b.score, abs=1e-6)
        # Whole-plan scoring and alpha fitting run the same stage methods as in process.
        local = LocalBackend()
        local.calibrate(specs, STATS, batches, keep_for_output_criterion=True)
        plan = [(1, 2), (4, 6)]
        for metric in ("nll", "cosine"):
            assert backend.score_plan(plan, "sum", None, metric) == pytest.approx(
                local.score_plan(plan, "sum", None, metric), abs=1e-6)
        # plan.score_batches: the same first batches on both backends, another value than all of them.
        assert backend.score_plan(plan, "sum", None, "nll", num_batches=1) == pytest.approx(
            local.score_plan(plan, "sum", None, "nll", num_batches=1), abs=1e-6)
        assert local.score_plan(plan, "sum", None, "nll", num_batches=1) != local.score_plan(plan, "sum", None, "nll")
        # plan.rerank: the batches after the first one (those a fit on one batch did not see), on both.
        assert backend.score_plan(plan, "sum", None, "nll", skip_batches=1) == pytest.approx(
            local.score_plan(plan, "sum", None, "nll", skip_batches=1), abs=1e-6)
        fits, local_fits = backend.fit_alphas(plan, 1), local.fit_alphas(plan, 1)
        assert [f.window for f in fits] == [f.window for f in local_fits] == plan
        assert [f.alpha for f in fits] == pytest.approx([f.alpha for f in local_fits], abs=1e-6)
        # Corrections of both kinds: fitted and kept on the stages; a stage that restarts gets them back.
        requests = [(w, "sum", None, kind) for kind in ("linear", "refit") for w in plan]
        fits, local_fits = backend.fit_corrections(requests, 2), local.fit_corrections(requests, 2)
        assert [f.loss for f in fits] == pytest.approx([f.loss for f in local_fits], abs=1e-6)
        assert any(f.matrix is not None for f in fits)
        os.kill(backend.stage_reports()[1]["pid"], signal.SIGKILL)  # holds window (4, 6)
        for kind in ("linear", "refit"):
            assert backend.score_plan(plan, "sum", None, "nll", correction=kind) == pytest.approx(
                local.score_plan(plan, "sum", None, "nll", correction=kind), abs=1e-6)
            assert local.score_plan(plan, "sum", None, "nll", correction=kind) != local.score_plan(plan, "sum", None, "nll")
    finally:
        backend.close()


# ------------------------------------------------------------------------------------- pipeline
def test_pipeline_on_ray_equals_local(cluster, tiny, tmp_path):
    """`slm-dist run` with cluster.backend=ray: make_backend, stats.parquet in the run folder, the
    stages rebuilt for the pruned model's perplexity. One stage: the splits are covered above."""
    model, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text(tiny_text())

    def run(backend: str) -> dict:
        cfg = load_config(None, [
            f"model.path={model}", "merge.max_shard_bytes=40000", f"run.dir={tmp_path / backend}",
            f"calibration.source={text}",
            f"eval.heldout={text}", "calibration.num_samples=16", "calibration.seq_len=24",
            "calibration.batch_size=4", "similarity.unit=token", "similarity.tokens_per_batch=48",
            "plan.target_layers_removed=2", "eval.seq_len=24", "eval.max_windows=4",
            f"cluster.backend={backend}", "cluster.num_stages=1", "cluster.cpus_per_stage=0.5",
        ])
        return pipeline.run(cfg, show_progress=False)

    on_ray, in_process = run("ray"), run("local")
    assert on_ray["windows"] == in_process["windows"]
    assert on_ray["layers_after"] == 4
    assert on_ray["perplexity_before"] == pytest.approx(in_process["perplexity_before"], rel=1e-6)
    assert on_ray["perplexity_after"] == pytest.approx(in_process["perplexity_after"], rel=1e-6)
    saved = StatsReducer.load(tmp_path / "ray" / "stats.parquet")
    assert saved.num_batches == 4
    ray_sim = json.loads((tmp_path / "ray" / "similarity.json").read_text())
    local_sim = json.loads((tmp_path / "local" / "similarity.json").read_text())
    torch.testing.assert_close(torch.tensor(ray_sim["cka"]), torch.tensor(local_sim["cka"]), atol=1e-10, rtol=0)


@pytest.mark.slow
def test_ray_backend_starts_a_private_local_instance_when_none_is_running(tiny, tmp_path):
    """No session and no address: the backend starts Ray itself and shuts it down on close."""
    model, _ = tiny
    script = f"""
import ray, torch
from slm_dist.config import ClusterSection
from slm_dist.backends.ray import RayBackend
from slm_dist.workers.stage_worker import StageSpec, StatsSpec
specs = [StageSpec({str(model)!r}, 0, 3, 6), StageSpec({str(model)!r}, 3, 6, 6)]
ids = torch.randint(3, 60, (8, 16), generator=torch.Generator().manual_seed(0))
backend = RayBackend(ClusterSection(backend="ray", num_stages=2, cpus_per_stage=0.5))
assert not ray.is_initialized()
red = backend.calibrate(specs, StatsSpec(tokens_per_batch=32), [(0, ids[:4]), (1, ids[4:])])
assert backend._started_ray and red.num_batches == 2
backend.close()
assert not ray.is_initialized()
print("OK")
"""
    # Ray's discovery reads <temp dir>/ray/ray_current_cluster, which this module's test cluster
    # wrote: a fresh, short temp dir (socket paths are length-limited) hides it, as on a clean node.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=temp_dir)
    try:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------- config -> specs
def test_gpus_per_stage_gives_cuda_bf16_stages_and_gpu_bundles(tiny):
    from slm_dist.backends.ray import _bundle

    model, _ = tiny
    index = open_index(model)
    gpu = load_config(None, [f"model.path={model}", "cluster.backend=ray", "cluster.num_stages=2",
                             "cluster.gpus_per_stage=1", "cluster.cpus_per_stage=4"])
    assert {(s.device, s.dtype) for s in context.stage_specs(gpu, index)} == {("cuda", "bfloat16")}
    assert _bundle(gpu.cluster) == {"CPU": 4.0, "GPU": 1.0}
    cpu = load_config(None, [f"model.path={model}", "cluster.backend=ray", "cluster.num_stages=2"])
    assert {(s.device, s.dtype) for s in context.stage_specs(cpu, index)} == {("cpu", "float32")}
    assert _bundle(cpu.cluster) == {"CPU": 1.0}


# ------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_ray_equals_local_equals_hf(cluster, tmp_path):
    from slm_dist import assets

    cache = assets.default_cache_dir()
    if not (cache / assets.MODEL_DIRNAME / assets.MARKER_NAME).exists() or \
            not (cache / assets.TEXT_DIRNAME / assets.MARKER_NAME).exists():
        pytest.skip(f"SmolLM2 demo assets are not cached under {cache}; run `slm-dist run configs/default.yaml` "
                    "(or assets.prepare_demo_assets) once to build them")
    demo = assets.prepare_demo_assets(cache)
    tokenizer = context.load_tokenizer(demo.model_dir)
    ids = calibration.load_calibration(demo.calibration_text, tokenizer, num_samples=8, seq_len=64, seed=0)
    calibration.save_calibration(tmp_path / "calibration.parquet", ids)
    batches = context.batches(calibration.load_calibration_parquet(tmp_path / "calibration.parquet"), 4)
    stats = StatsSpec(tokens_per_batch=128)
    reference = hf_cka(demo.model_dir, batches, stats)
    for num_stages in (1, 2, 3):
        cfg = load_config(None, [f"model.path={demo.model_dir}", "cluster.backend=ray",
                                 f"cluster.num_stages={num_stages}", "cluster.cpus_per_stage=0.5"])
        specs = context.stage_specs(cfg, open_index(demo.model_dir), demo.model_dir)
        backend = RayBackend(cfg.cluster)
        try:
            on_ray = backend.calibrate(specs, stats, batches)
        finally:
            backend.close()
        in_process = LocalBackend().calibrate(specs, stats, batches)
        torch.testing.assert_close(on_ray.cka(), in_process.cka(), atol=1e-10, rtol=0)
        torch.testing.assert_close(on_ray.cka(), reference, atol=1e-5, rtol=0)
