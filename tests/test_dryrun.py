"""`slm-dist plan --dry-run`: shapes from config.json, the partition, memory, bytes, refusals, configs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from slm_dist import dryrun
from slm_dist.arch import get_arch
from slm_dist.backends.local import LocalBackend
from slm_dist.checkpoint.index import CheckpointError, open_index
from slm_dist.cli import EXIT_BAD_INPUT, EXIT_OK, main
from slm_dist.config import SlmConfig, load_config
from slm_dist.core import partition, sizing
from slm_dist.testing import make_tiny_model
from slm_dist.workers.stage_worker import StageSpec, StatsSpec
from slm_dist.workers.window_fits import window_targets

REPO = Path(__file__).resolve().parents[1]
LLAMA3_70B = REPO / "configs" / "models" / "llama-3-70b"
CONFIG_70B = REPO / "configs" / "llama3-70b-8gpu.yaml"
GiB = 2**30

# Llama-3-70B by hand: hidden 8192, 64 heads of 128, 8 kv heads, MLP 28672, vocab 128256, 80 layers.
LAYER_PARAMS_70B = (2 * 8192 * 8192          # q_proj, o_proj
                    + 2 * 8192 * 1024        # k_proj, v_proj (8 kv heads x 128)
                    + 3 * 8192 * 28672       # gate, up, down
                    + 2 * 8192)              # two RMSNorms
PARAMS_70B = 80 * LAYER_PARAMS_70B + 2 * 128256 * 8192 + 8192  # + embed, lm_head (untied), final norm


def config_70b(*overrides: str) -> SlmConfig:
    return load_config(CONFIG_70B, [f"model.path={LLAMA3_70B}", *overrides])


# ------------------------------------------------------------------------------ sizing
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_shapes_from_config_equal_the_checkpoint_headers(tmp_path, model_type):
    model = make_tiny_model(tmp_path / model_type, model_type=model_type, num_layers=3)
    index = open_index(model)
    arch = get_arch(model_type)
    assert sizing.tensor_shapes(index.config, arch) == {k: t.shape for k, t in index.tensors.items()}
    from_headers = sizing.sizes_from_tensors(((k, t.shape, t.nbytes) for k, t in index.tensors.items()), arch, 3)
    assert sizing.sizes_from_config(index.config, arch, 4) == from_headers


def test_tied_embeddings_have_no_lm_head_and_biases_follow_the_config(tmp_path):
    model = make_tiny_model(tmp_path / "m", num_layers=2, tie_word_embeddings=True, attention_bias=True)
    index = open_index(model)
    shapes = sizing.tensor_shapes(index.config, get_arch("llama"))
    assert "lm_head.weight" not in shapes and shapes["model.layers.1.self_attn.o_proj.bias"] == (32,)
    assert shapes == {k: t.shape for k, t in index.tensors.items()}


def test_llama3_70b_sizes_by_hand():
    config = json.loads((LLAMA3_70B / "config.json").read_text())
    sizes = sizing.sizes_from_config(config, get_arch("llama"), sizing.dtype_bytes(sizing.storage_dtype(config)))
    assert sizes.layer_params == (LAYER_PARAMS_70B,) * 80
    assert sizes.total_params == PARAMS_70B == 70_553_706_496
    assert sizes.total_bytes == 2 * PARAMS_70B
    assert sizes.first_extra_bytes == sizes.last_extra_bytes - 2 * 8192 == 2 * 128256 * 8192
    # the merged part of a layer is everything but its two norms
    assert sizes.projection_bytes[0] == sizes.layer_bytes[0] - 2 * 2 * 8192


@pytest.mark.parametrize("tied", [False, True])
def test_sizing_agrees_with_partitions_own_config_sizes(tied):
    """The run partitions with partition's own byte counts: the dry run's stage weights must be the same
    (a tied lm_head is stored once but the last stage holds a copy)."""
    config = {**json.loads((LLAMA3_70B / "config.json").read_text()), "tie_word_embeddings": tied}
    ours = sizing.sizes_from_config(config, get_arch("llama"), 2)
    theirs = partition.model_bytes_from_config(config, 2)
    tied_copy = ours.first_extra_bytes if tied else 0
    assert (ours.layer_bytes, ours.first_extra_bytes, ours.last_extra_bytes + tied_copy) == \
        (theirs.layers, theirs.first_extra, theirs.last_extra)


def test_missing_config_field_names_it():
    config = json.loads((LLAMA3_70B / "config.json").read_text())
    del config["intermediate_size"]
    with pytest.raises(sizing.SizingError, match="intermediate_size"):
        sizing.tensor_shapes(config, get_arch("llama"))


# ------------------------------------------------------------------------------ dry run: 70B
def test_70b_partitions_onto_8_gpus_of_80_gb_without_weights():
    assert not any(LLAMA3_70B.glob("*.safetensors"))
    d = dryrun.dry_run(config_70b(), LLAMA3_70B)
    assert d.fits and d.refusal is None and d.weights_from == "config.json"
    assert d.num_stages == len(d.stages) == 8 and d.gpus_needed == 8
    assert d.stages[0].start == 0 and d.stages[-1].stop == 80
    assert all(a.stop == b.start for a, b in zip(d.stages, d.stages[1:]))
    assert all(s.total_bytes <= 80 * GiB for s in d.stages)
    # bf16 in, bf16 compute: stage weights add up to the checkpoint, which is read once by calibration
    assert sum(s.weight_bytes for s in d.stages) == d.source_bytes == 2 * PARAMS_70B
    assert d.read_bytes["calibrate"] == sum(s.read_bytes for s in d.stages) == 2 * PARAMS_70B
    # the same split the run computes from the same bytes
    slices = partition.partition_layers([2 * LAYER_PARAMS_70B] * 80, 8, 80 * GiB, 2 * 128256 * 8192,
                                        2 * (128256 * 8192 + 8192))
    assert [(s.start, s.stop) for s in d.stages] == slices
    # target_ratio 0.2 of all parameters -> nearest whole layers: round(0.2 * P / layer) = 16
    assert d.layers_removed == round(0.2 * PARAMS_70B / LAYER_PARAMS_70B) == 16
    assert d.output_bytes == 2 * (PARAMS_70B - 16 * LAYER_PARAMS_70B)
    assert d.disk_bytes > d.output_bytes and d.seconds["calibrate"] > 0


def test_70b_on_4_gpus_of_24_gb_is_refused_with_the_numbers():
    cfg = config_70b("cluster.num_stages=4", f"cluster.memory_per_stage_bytes={24 * GiB}")
    d = dryrun.dry_run(cfg, LLAMA3_70B)
    assert not d.fits and d.stages == ()
    assert "131.4 GiB" in d.refusal                     # the weights
    assert "4 stage(s) x 24.0 GiB give 96.0 GiB" in d.refusal
    assert f"{d.min_stages} stages of 24.0 GiB would fit" in d.refusal
    # the fewest stages is a real answer: that many 24 GiB stages pass, one fewer does not
    ok = dryrun.dry_run(config_70b(f"cluster.num_stages={d.min_stages}", f"cluster.memory_per_stage_bytes={24 * GiB}"),
                        LLAMA3_70B)
    fewer = dryrun.dry_run(config_70b(f"cluster.num_stages={d.min_stages - 1}",
                                      f"cluster.memory_per_stage_bytes={24 * GiB}"), LLAMA3_70B)
    assert ok.fits and not fewer.fits


def test_cli_dry_run_exit_codes(capsys):
    base = ["plan", "--dry-run", str(CONFIG_70B), f"model.path={LLAMA3_70B}"]
    assert main(base) == EXIT_OK
    assert "8 stage(s) of 80.00 GiB" in capsys.readouterr().out
    assert main([*base, "cluster.num_stages=4", f"cluster.memory_per_stage_bytes={24 * GiB}"]) == EXIT_BAD_INPUT
    out, err = capsys.readouterr()
    assert "DOES NOT FIT" in out and "96.0 GiB" in err
    assert main(["--quiet", "plan", "--dry-run", "--json", str(CONFIG_70B), f"model.path={LLAMA3_70B}"]) == EXIT_OK
    payload = json.loads(capsys.readouterr().out)
    assert payload["fits"] and len(payload["stages"]) == 8 and payload["params"] == PARAMS_70B


def test_activation_estimate_by_hand():
    hf = {"hidden_size": 8, "intermediate_size": 20, "num_attention_heads": 2, "vocab_size": 100}
    cfg = load_config(None, ["calibration.batch_size=2", "calibration.seq_len=16", "eval.seq_len=16",
                             "cluster.max_inflight=1", "model.attn_implementation=eager"])
    tokens = 2 * 16
    queued = 2 * tokens * 8 * 2                    # (max_inflight + 1) hidden states, bf16
    working = tokens * (2 * 8 + max(4 * 8, 3 * 20)) * 2
    stats_copy = tokens * 8 * 4
    scores = 2 * 2 * 16 * 16 * 2 * 2               # b x heads x s x s, scores + softmax
    assert dryrun.activation_bytes(hf, cfg, 2) == queued + working + stats_copy + scores
    assert dryrun.logits_bytes(hf, cfg) == 2 * tokens * 100 * 4


# ------------------------------------------------------------------------------ dry run: files
def test_index_json_is_cross_checked_against_config(tmp_path):
    folder = tmp_path / "cfg-only"
    folder.mkdir()
    config = json.loads((LLAMA3_70B / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    keys = sizing.tensor_shapes(config, get_arch("llama"))
    index = {"metadata": {"total_size": 2 * PARAMS_70B}, "weight_map": {k: "model-00001-of-00030.safetensors"
                                                                        for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    d = dryrun.dry_run(config_70b(f"model.path={folder}"), folder)
    assert d.fits and not any("total_size" in n for n in d.notes)
    del index["weight_map"]["model.layers.3.mlp.up_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="up_proj"):
        dryrun.dry_run(config_70b(f"model.path={folder}"), folder)


def test_headers_are_used_when_the_weights_are_here(tiny_model):
    cfg = load_config(None, [f"model.path={tiny_model}", "cluster.num_stages=2"])
    d = dryrun.dry_run(cfg, tiny_model)
    index = open_index(tiny_model)
    assert d.weights_from == "headers" and d.source_bytes == index.total_bytes
    from slm_dist.context import stage_specs

    assert [(s.start, s.stop) for s in d.stages] == [(s.start, s.stop) for s in stage_specs(cfg, index)]


def test_no_config_json_is_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        dryrun.dry_run(load_config(None, [f"model.path={tmp_path}"]), tmp_path)


# ------------------------------------------------------------------------------ configs
def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("tasks",):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def _description(path: str) -> str | None:
    model: type = SlmConfig
    *sections, leaf = path.split(".")
    for name in sections:
        model = model.model_fields[name].annotation
    return model.model_fields[leaf].description


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "llama2-7b-slm.yaml", "llama3-70b-8gpu.yaml"])
def test_shipped_configs_load_and_every_key_is_documented(name):
    path = REPO / "configs" / name
    load_config(path)
    undocumented = [k for k in _leaves(yaml.safe_load(path.read_text())) if not _description(k)]
    assert undocumented == []


def test_reproduction_config_uses_the_published_settings():
    cfg = load_config(REPO / "configs" / "llama2-7b-slm.yaml")
    assert (cfg.similarity.criterion, cfg.merge.rule, cfg.plan.threshold) == ("output", "reference", 0.72)
    assert (cfg.calibration.num_samples, cfg.calibration.seq_len, cfg.calibration.batch_size,
            cfg.calibration.seed) == (10, 128, 1, 1234)
    assert cfg.model.dtype == "float16" and (cfg.plan.protect_first, cfg.plan.protect_last) == (1, 1)


def test_dry_run_reads_only_config_json(tmp_path):
    """A folder with nothing but config.json (what one downloads before the weights) is enough."""
    folder = tmp_path / "only-config"
    folder.mkdir()
    shutil.copy(LLAMA3_70B / "config.json", folder / "config.json")
    d = dryrun.dry_run(config_70b(f"model.path={folder}"), folder)
    assert d.fits and math.isclose(d.source_bytes / GiB, 131.42, abs_tol=0.01)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


@pytest.mark.parametrize("rule, reads_folded", [("reference", False), ("drop", False), ("sum", True), ("mean", True)])
def test_merge_bytes_by_rule(rule, reads_folded):
    config = json.loads((LLAMA3_70B / "config.json").read_text())
    sizes = sizing.sizes_from_config(config, get_arch("llama"), 2)
    out, read = dryrun.output_bytes(config_70b(f"merge.rule={rule}"), sizes, 16)
    assert out == 2 * (PARAMS_70B - 16 * LAYER_PARAMS_70B)
    # the folded layers' projections: every weight of a layer but its two norms
    assert read - out == (16 * 2 * (LAYER_PARAMS_70B - 2 * 8192) if reads_folded else 0)


def test_correction_and_planning_caches_are_in_the_notes():
    plain = dryrun.dry_run(config_70b(), LLAMA3_70B)
    fitted = dryrun.dry_run(config_70b("plan.search=global", "merge.rule=scaled", "merge.correction=linear"),
                            LLAMA3_70B)
    cal = config_70b().calibration
    per_layer = cal.num_samples * cal.seq_len * 8192 * 2  # bf16 inputs, every batch, one layer
    last = len(fitted.stages) - 1
    assert [st.cached_bytes for st in fitted.stages] == [(st.stop - st.start + (k == last)) * per_layer
                                                         for k, st in enumerate(fitted.stages)]
    assert fitted.host_bytes_per_stage == max(st.cached_bytes for st in fitted.stages)
    # calibration.cache_stride=3 keeps the inputs of layers start, start + 3, ... of each stage.
    strided = dryrun.dry_run(config_70b("plan.search=global", "merge.rule=scaled", "merge.correction=linear",
                                        "calibration.cache_stride=3"), LLAMA3_70B)
    assert [st.cached_bytes for st in strided.stages] == [(-(-(st.stop - st.start) // 3) + (k == last)) * per_layer
                                                          for k, st in enumerate(fitted.stages)]
    assert any("one layer in 3 (calibration.cache_stride" in n for n in strided.notes)
    assert strided.seconds["plan"] > fitted.seconds["plan"]  # the inputs not kept are recomputed when read
    # On GPUs the cache is host memory: not in the stages' device totals; the fitted window's inputs and
    # targets are.
    hf = json.loads((LLAMA3_70B / "config.json").read_text())
    io = dryrun.window_fit_bytes(hf, config_70b("plan.search=global", "merge.rule=scaled", "merge.correction=linear"),
                                 2, 0, "cuda", 16)
    assert io > 0
    assert [st.activation_bytes for st in fitted.stages] == [st.activation_bytes + io for st in plain.stages]
    assert all(st.cached_bytes == 0 for st in plain.stages)
    assert any("0.25 GiB (float32)" in n for n in fitted.notes)  # 8192 x 8192 x 4 bytes per window
    assert not any("merge.correction" in n for n in plain.notes)
    refit = dryrun.dry_run(config_70b("plan.search=global", "merge.rule=scaled", "merge.correction=refit"), LLAMA3_70B)
    # 2 copies of 28673^2 (statistics and factor) + 3 of 28673 x 8192 + 2048 rows, float64: the fit's peak.
    stats = (2 * 28673 ** 2 + 3 * 28673 * 8192 + 2048 * (28673 + 8192)) * 8
    assert any(f"about {stats / 1024**3:.2f} GiB of float64 statistics" in n for n in refit.notes)
    assert refit.host_bytes_per_stage == fitted.host_bytes_per_stage
    # The fitting statistics count on top of each stage's activations: 8 x 80 GiB fits (70B in bf16)
    # with at least 25 GiB free per stage, 40 GiB stages do not, and the refusal names the statistics.
    assert refit.fits and all(st.activation_bytes >= stats for st in refit.stages)
    assert all(80 * 1024**3 - st.total_bytes >= 25 * 1024**3 for st in refit.stages)
    # With the fitted window's inputs and targets (window_fit_bytes, ~6 GiB here) neither 40 nor 48 GiB
    # cards hold 8 stages; without refit's statistics both do.
    for gib, stages in ((40, 21), (48, 10)):
        assert any(n.startswith(f"{8} x {gib} GiB: does not fit") and f"{stages} stages of {gib} GiB would" in n
                   and "without refit's statistics (merge.correction=linear or none) 8 stages fit" in n
                   for n in refit.notes), (gib, refit.notes)
    tight = dryrun.dry_run(config_70b("merge.correction=refit", "merge.rule=scaled", "plan.search=global",
                                      f"cluster.memory_per_stage_bytes={40 * 1024**3}"), LLAMA3_70B)
    assert not tight.fits and "fitting statistics" in tight.refusal
    assert dryrun.dry_run(config_70b(f"cluster.memory_per_stage_bytes={40 * 1024**3}"), LLAMA3_70B).fits


def test_the_global_search_has_a_plan_time():
    """Each plan it scores is forward passes on the calibration samples; corrections add their fits."""
    search = ("plan.search=global", "plan.cost=measured", "plan.candidates=12", "plan.local_search=32")
    assert dryrun.measured_plans(config_70b(*search), 80, 16) == 1 + 78 + 12 + 32  # protect_first/last 1
    assert dryrun.measured_plans(config_70b("plan.search=global"), 80, 16) == 0  # statistics only
    sliding = dryrun.dry_run(config_70b(), LLAMA3_70B).seconds["plan"]
    plain = dryrun.dry_run(config_70b(*search), LLAMA3_70B).seconds["plan"]
    fewer = dryrun.dry_run(config_70b(*search[:3], "plan.local_search=0"), LLAMA3_70B).seconds["plan"]
    linear = dryrun.dry_run(config_70b(*search, "merge.correction=linear"), LLAMA3_70B).seconds["plan"]
    refit = dryrun.dry_run(config_70b(*search, "merge.correction=refit"), LLAMA3_70B).seconds["plan"]
    assert sliding == 0.0 < fewer < plain < linear < refit
    assert plain / fewer == pytest.approx((1 + 78 + 12 + 32) / (1 + 78 + 12), rel=0.01)


def test_the_cached_calibration_inputs_are_what_the_stages_keep_and_count_on_a_cpu(tmp_path):
    """Planning on calibration samples keeps every batch's input to every layer (and the last stage's
    final hidden): the dry run's bytes per stage equal the tensors a calibrated stage holds, and on a
    CPU they are inside the stage's memory."""
    model = make_tiny_model(tmp_path / "m", num_layers=6)
    overrides = [f"model.path={model}", "cluster.backend=local", "cluster.device=cpu", "cluster.num_stages=2",
                 "calibration.num_samples=8", "calibration.seq_len=16", "calibration.batch_size=4",
                 "plan.target_layers_removed=2"]
    plain = dryrun.dry_run(load_config(None, overrides), model)
    sleb = dryrun.dry_run(load_config(None, [*overrides, "plan.search=sleb"]), model)
    backend = LocalBackend()
    specs = [StageSpec(str(model), st.start, st.stop, 6) for st in sleb.stages]
    ids = torch.randint(3, 60, (8, 16), generator=torch.Generator().manual_seed(0))
    backend.calibrate(specs, StatsSpec(unit="sample"), [(0, ids[:4]), (1, ids[4:])], keep_for_output_criterion=True)
    held = [sum(t.nbytes for ts in stage._cached_inputs.values() for t in ts)
            + sum(t.nbytes for t in stage._reference_final.values()) for stage in backend.stages]
    backend.close()
    assert [st.cached_bytes for st in sleb.stages] == held and all(held)
    assert [a.activation_bytes + st.cached_bytes for a, st in zip(plain.stages, sleb.stages)] == \
        [st.activation_bytes for st in sleb.stages]


def test_a_fitted_windows_inputs_targets_and_sources_are_counted(tmp_path):
    """window_fit_bytes covers what fitting a window holds on a CPU stage (window_fits.window_targets:
    the targets, the outputs being computed, each batch's context; the window's source tensors)."""
    model = make_tiny_model(tmp_path / "m", num_layers=6)
    config = load_config(None, [f"model.path={model}", "cluster.backend=local", "cluster.device=cpu",
                                "calibration.num_samples=8", "calibration.seq_len=16", "calibration.batch_size=4",
                                "plan.target_layers_removed=2", "merge.correction=refit", "merge.correction_batches=2"])
    hf = json.loads((model / "config.json").read_text())
    index = open_index(model)
    layer_bytes = max(sum(t.nbytes for k, t in index.tensors.items() if k.startswith(f"model.layers.{i}."))
                      for i in range(6))
    predicted = dryrun.window_fit_bytes(hf, config, 4, layer_bytes, "cpu", 2)
    backend = LocalBackend()
    ids = torch.randint(3, 60, (8, 16), generator=torch.Generator().manual_seed(0))
    backend.calibrate([StageSpec(str(model), 0, 6, 6)], StatsSpec(unit="sample"), [(0, ids[:4]), (1, ids[4:])],
                      keep_for_output_criterion=True)
    stage = backend.stages[0]
    source, member = stage.window_members((1, 3))  # 3 layers: the target's 2 + 1
    inputs, targets = window_targets(stage, (1, 3), [0, 1], member)

    def tensors(x) -> list[torch.Tensor]:  # every tensor in a context (tuples, dicts, None)
        if isinstance(x, torch.Tensor):
            return [x]
        items = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
        return [t for y in items for t in tensors(y)]

    held = (2 * sum(t.nbytes for t in targets) + sum(t.nbytes for _, ctx in inputs for t in tensors(ctx))
            + sum(t.nbytes for layer in source for t in layer.values()))
    backend.close()
    assert held <= predicted <= 1.5 * held


def test_slebs_trials_and_score_batches_set_the_plan_time():
    """SLEB tries every layer left at each step; plan.score_batches scores each plan on that share."""
    sleb = ("plan.search=sleb", "plan.target_layers_removed=16")
    assert dryrun.measured_plans(config_70b(*sleb), 80, 16) == sum(78 - i for i in range(16))
    full = dryrun.dry_run(config_70b(*sleb), LLAMA3_70B).seconds["plan"]
    batches = config_70b().calibration.num_samples // config_70b().calibration.batch_size
    assert batches >= 2
    half = dryrun.dry_run(config_70b(*sleb, f"plan.score_batches={batches // 2}"), LLAMA3_70B).seconds["plan"]
    assert half == pytest.approx(full * (batches // 2) / batches, rel=0.01)
    refit = dryrun.dry_run(config_70b(*sleb, "merge.correction=refit"), LLAMA3_70B).seconds["plan"]
    assert refit > full  # the chosen windows' fits
    # plan.rerank: each finalist scored once more and its other windows fitted.
    rerank = (*sleb, "merge.correction=refit", "merge.correction_batches=2", "plan.rerank=3")
    assert dryrun.measured_plans(config_70b(*rerank), 80, 16) == sum(78 - i for i in range(16)) + 3
    fewer_fits = dryrun.dry_run(config_70b(*sleb, "merge.correction=refit", "merge.correction_batches=2"),
                                LLAMA3_70B).seconds["plan"]
    assert dryrun.dry_run(config_70b(*rerank), LLAMA3_70B).seconds["plan"] > fewer_fits


def test_measured_throughputs_replace_the_assumed_ones_and_the_output_says_which():
    base = dryrun.dry_run(config_70b(), LLAMA3_70B)
    assert "stage_tokens_per_s" not in dryrun.format_dry_run(base)
    assert "read_bytes_per_s=2e+09 (default)" in dryrun.format_dry_run(base)
    slow = dryrun.Assumptions.parse(["stage_tokens_per_s=1000", "read_bytes_per_s=1e9"])
    fast = dryrun.Assumptions.parse(["stage_tokens_per_s=4000", "read_bytes_per_s=1e9"])
    assert slow.given == ("stage_tokens_per_s", "read_bytes_per_s")
    d_slow, d_fast = dryrun.dry_run(config_70b(), LLAMA3_70B, slow), dryrun.dry_run(config_70b(), LLAMA3_70B, fast)
    text = dryrun.format_dry_run(d_slow)
    assert "stage_tokens_per_s=1e+03 (given)" in text and "read_bytes_per_s=1e+09 (given)" in text
    assert "write_bytes_per_s=1e+09 (default)" in text
    # Calibration is load + the batches through the widest stage at the measured rate (+ hops):
    # four times the rate, a quarter of the compute time.
    load = 10.0 + max(s.read_bytes for s in d_slow.stages) / 1e9  # stage_start_s (default) + reading
    assert (d_slow.seconds["calibrate"] - load) / (d_fast.seconds["calibrate"] - load) == pytest.approx(4, rel=0.05)
    assert d_slow.seconds["eval"] > d_fast.seconds["eval"]
    for bad in (["nope=1"], ["read_bytes_per_s=fast"], ["read_bytes_per_s=-1"], ["read_bytes_per_s"]):
        with pytest.raises(dryrun.DryRunError, match="--assume"):
            dryrun.Assumptions.parse(bad)
    assert main(["--quiet", "plan", "--dry-run", str(CONFIG_70B), f"model.path={LLAMA3_70B}",
                 "--assume", "nope=1"]) == EXIT_BAD_INPUT


def test_merge_time_is_bounded_by_its_largest_shard():
    """Tasks divide the shards, not a shard: with the shard size at the output's size there is one task
    whatever merge.max_parallel says; with small shards 4 tasks take a quarter of one task's time."""
    a = dryrun.Assumptions.parse(["read_bytes_per_s=1e9", "write_bytes_per_s=1e9", "hash_bytes_per_s=1e12"])
    d = dryrun.dry_run(config_70b(), LLAMA3_70B, a)
    one = (d.read_bytes["merge"] + d.output_bytes) / 1e9     # one task: every byte read, then written
    whole = dryrun.dry_run(config_70b(f"merge.max_shard_bytes={d.output_bytes}", "merge.max_parallel=4"),
                           LLAMA3_70B, a)
    small = dryrun.dry_run(config_70b(f"merge.max_shard_bytes={10**8}", "merge.max_parallel=4"), LLAMA3_70B, a)
    assert whole.seconds["merge"] == pytest.approx(one, abs=0.1)
    assert small.seconds["merge"] == pytest.approx(one / 4, abs=0.1)


def test_calibration_time_follows_the_batches_in_flight():
    """One batch in flight: every batch crosses every stage alone. Many: the widest stage sets the pace
    once the pipeline is full. (stage_tokens_per_s given, hops free, loading excluded.)"""
    a = dryrun.Assumptions.parse(["stage_tokens_per_s=1000", "hop_bytes_per_s=1e30"])

    def compute(inflight: int) -> tuple[float, dryrun.DryRun]:
        d = dryrun.dry_run(config_70b(f"cluster.max_inflight={inflight}"), LLAMA3_70B, a)
        load = 10.0 + max(s.read_bytes for s in d.stages) / 2e9
        return d.seconds["calibrate"] - load, d

    serial, d = compute(1)
    piped, _ = compute(64)
    cal = config_70b().calibration
    batches, tokens = math.ceil(cal.num_samples / cal.batch_size), cal.batch_size * cal.seq_len
    widest = max(s.stop - s.start for s in d.stages)
    per_layer = tokens / 1000 / widest    # the widest stage moves a batch in tokens / 1000 s
    assert serial == pytest.approx(batches * 80 * per_layer, rel=0.01, abs=0.1)
    assert piped == pytest.approx((batches - 1) * widest * per_layer + 80 * per_layer, rel=0.01, abs=0.1)
