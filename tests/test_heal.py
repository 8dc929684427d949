"""Healing: the recipe's arithmetic, data prep, the LoRA merge by hand and against peft, exact resume
of the DeepSpeed training loop in-process, and (slow) two Ray Train workers killed and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slm_dist import heal
from slm_dist.checkpoint.index import open_index
from slm_dist.checkpoint.reader import LazyReader
from slm_dist.checkpoint.verify import verify_model
from slm_dist.config import LORA_TARGETS, ConfigError, load_config
from slm_dist.testing import TINY_WORDS, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


def heal_config(*extra: str, workers: int = 1):
    return load_config(None, ["model.path=unused", f"cluster.num_workers={workers}", *extra])


@pytest.fixture(scope="module")
def cycle_text(tmp_path_factory) -> Path:
    """Text a tiny model can learn fast: one 12-word cycle (each word fixes the next), repeated."""
    cycle = " ".join(TINY_WORDS[:12])
    path = tmp_path_factory.mktemp("heal-data") / "cycle.txt"
    path.write_text("\n\n".join(" ".join([cycle] * 10) for _ in range(40)) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


# ----------------------------------------------------------------------------------- recipe
def test_paper_recipe_is_the_default():
    h = heal_config().heal
    assert (h.lora_r, h.lora_alpha, h.lora_dropout, h.epochs, h.lr, h.batch_size, h.cutoff_len) == \
        (8, 16.0, 0.05, 2, 1e-4, 64, 256)
    assert set(h.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert heal.lora_scale(h.lora_r, h.lora_alpha) == 2.0
    assert heal_config().cluster.num_workers == 1 and not h.enabled


def test_deepspeed_config_from_our_config_alone():
    cfg = heal.deepspeed_config(heal_config().heal, num_workers=2, device="cpu")
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 8                    # 64 / (4 x 2)
    assert cfg["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in cfg["zero_optimization"]
    assert "bf16" not in cfg and "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"]

    big = heal.deepspeed_config(heal_config("heal.zero_stage=3", "heal.offload=true").heal, 8, "cuda")
    zero = big["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert big["bf16"] == {"enabled": True} and big["zero_force_ds_cpu_optimizer"] is False
    assert big["gradient_accumulation_steps"] == 2                    # 64 / (4 x 8)

    native = heal.deepspeed_config(heal_config("heal.optimizer=deepspeed").heal, 1, "cuda")
    assert native["optimizer"]["type"] == "AdamW" and native["optimizer"]["params"]["lr"] == 1e-4
    assert "zero_allow_untested_optimizer" not in native


def test_deepspeed_config_errors_name_the_values():
    with pytest.raises(heal.HealError, match=r"heal.batch_size=64 .* 4 x 3 = 12"):
        heal.deepspeed_config(heal_config().heal, num_workers=3, device="cpu")
    with pytest.raises(heal.HealError, match="zero_stage >= 1"):
        heal.deepspeed_config(heal_config("heal.zero_stage=0", "heal.offload=true").heal, 1, "cpu")
    with pytest.raises(ConfigError, match="heal.batch_size=10 is not a multiple of heal.micro_batch_size=4"):
        heal_config("heal.batch_size=10")


@pytest.mark.parametrize("total, warmup", [(10, 2), (7, 3), (5, 0), (12, 1)])
def test_learning_rate_is_the_trainers_linear_schedule_with_warmup(total, warmup):
    """Step for step what transformers' get_linear_schedule_with_warmup gives the Trainer's optimizer."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])   # the lr the step runs with
        optimizer.step()
        schedule.step()
    assert [heal.learning_rate(s, total, warmup, 1e-3) for s in range(total)] == pytest.approx(expected, abs=1e-15)


def test_learning_rate_by_hand_and_warmup_capped_at_the_run():
    lrs = [heal.learning_rate(s, total=10, warmup_steps=2, peak_lr=1.0) for s in range(10)]
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    capped = [heal.learning_rate(s, total=3, warmup_steps=100, peak_lr=1.0) for s in range(3)]
    assert capped == pytest.approx([0.0, 1 / 3, 2 / 3])


def test_steps_follow_epochs_unless_max_steps():
    assert heal.total_steps(130, batch_size=64, epochs=2, max_steps=None) == 4   # ragged tail dropped
    assert heal.total_steps(130, batch_size=64, epochs=2, max_steps=7) == 7
    with pytest.raises(heal.HealError, match="has 10 examples, fewer than heal.batch_size=64"):
        heal.total_steps(10, batch_size=64, epochs=2, max_steps=None)


def test_micro_batches_split_each_step_over_workers():
    n, batch, micro, workers, seed = 50, 8, 2, 2, 3
    per_epoch = n // batch
    seen_in_epoch: list[int] = []
    for step in range(per_epoch):
        parts = [heal.micro_batches(n, batch, micro, workers, rank, step, seed) for rank in range(workers)]
        assert all(len(p) == 2 and all(len(m) == micro for m in p) for p in parts)   # 8 / (2 x 2) micro-batches
        flat = [i for p in parts for m in p for i in m]
        assert len(set(flat)) == batch                                   # ranks never share an example
        seen_in_epoch += flat
    assert len(set(seen_in_epoch)) == per_epoch * batch                  # no repeats inside an epoch
    again = heal.micro_batches(n, batch, micro, workers, 1, 4, seed)
    assert again == heal.micro_batches(n, batch, micro, workers, 1, 4, seed)   # a function of the step only
    assert heal.micro_batches(n, batch, micro, workers, 0, 0, seed) != \
        heal.micro_batches(n, batch, micro, workers, 0, per_epoch, seed)      # next epoch reshuffles


# ------------------------------------------------------------------------------------- data
def test_instruction_example_labels_only_the_response():
    e = heal.instruction_example([5, 6, 7], [8, 9], eos_id=2, cutoff_len=10)
    assert e.input_ids == (5, 6, 7, 8, 9, 2)
    assert e.labels == (-100, -100, -100, 8, 9, 2)
    cut = heal.instruction_example([5, 6, 7], [8, 9], eos_id=2, cutoff_len=4)
    assert cut.input_ids == (5, 6, 7, 8) and cut.labels == (-100, -100, -100, 8)


def test_prepare_examples_from_alpaca_jsonl(tmp_path, tokenizer):
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "name a city", "input": "", "output": "the city"},
            {"instruction": "name a river", "input": "in the north", "output": "the river of the north"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kind, examples = heal.prepare_examples(path, tokenizer, cutoff_len=256)
    assert kind == "instruction" and len(examples) == 2
    for row, e in zip(rows, examples):
        learned = [t for t, lab in zip(e.input_ids, e.labels) if lab != heal.IGNORE_INDEX]
        assert learned == tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert [lab for lab in e.labels if lab != heal.IGNORE_INDEX] == learned
        prompt = heal.alpaca_prompt(row["instruction"], row["input"])
        assert e.labels.count(heal.IGNORE_INDEX) == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert "### Input" in heal.alpaca_prompt("x", "y") and "### Input" not in heal.alpaca_prompt("x")


def test_prepare_examples_from_text_windows(cycle_text, tokenizer):
    kind, examples = heal.prepare_examples(cycle_text, tokenizer, cutoff_len=32)
    assert kind == "text"
    assert all(len(e.input_ids) == 32 and e.labels == e.input_ids for e in examples)
    words = cycle_text.read_text().split()
    assert tokenizer.decode(examples[0].input_ids) == " ".join(words[:32])


def test_bad_jsonl_names_the_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"question": "c"}\n')
    with pytest.raises(heal.HealError, match=r"line 2 has keys \['question'\]"):
        heal.prepare_examples(bad, tokenizer, 32)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"instruction": "a", "output": "b"}\n{"text": "the city"}\n')
    with pytest.raises(heal.HealError, match="mixes 1 instruction lines with 1 text lines"):
        heal.prepare_examples(mixed, tokenizer, 32)


def test_collate_right_pads_and_ignores_padding():
    batch = heal.collate([heal.Example((4, 5, 6), (-100, 5, 6)), heal.Example((7,), (7,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [7, -100, -100]]


# ------------------------------------------------------------------------------------ merge
def test_merge_lora_weight_by_hand():
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])   # [out=2, in=3]
    a = torch.tensor([[1.0, 2.0, 3.0]])                      # [r=1, in]
    b = torch.tensor([[1.0], [-2.0]])                        # [out, r]
    # B @ A = [[1, 2, 3], [-2, -4, -6]]; scale 0.5
    assert heal.merge_lora_weight(w, a, b, 0.5).tolist() == [[1.5, 1.0, 3.5], [-1.0, -1.0, -4.0]]
    assert heal.merge_lora_weight(w.bfloat16(), a, b, 0.5).dtype == torch.bfloat16
    with pytest.raises(heal.HealError, match=r"A\[1, 2\] B\[2, 1\] do not fit weight \[2, 3\]"):
        heal.merge_lora_weight(w, a[:, :2], b, 0.5)


def _random_adapter(model_dir: Path, adapter_dir: Path, r: int = 4, alpha: float = 8.0):
    """A peft LoRA adapter with non-zero A and B on every projection, saved in peft's format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(LORA_TARGETS),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(adapter_dir))
    return peft_model


def test_write_merged_is_base_plus_delta_and_matches_peft(tiny_model, tmp_path):
    peft_model = _random_adapter(tiny_model, tmp_path / "adapter")
    out = tmp_path / "merged"
    heal.write_merged(tiny_model, tmp_path / "adapter", out, max_shard_bytes=30_000, provenance={"steps": 3})
    assert verify_model(out) == []
    merged_index, base_index = open_index(out), open_index(tiny_model)
    assert len(merged_index.files) > 1 and list(merged_index.tensors) == list(base_index.tensors)
    assert merged_index.config == base_index.config
    assert (out / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["heal"] == {"steps": 3}

    adapter = load_file(str(tmp_path / "adapter" / heal.ADAPTER_WEIGHTS))
    merged, base = LazyReader(merged_index), LazyReader(base_index)
    reference = peft_model.merge_and_unload().state_dict()
    key = "model.layers.2.mlp.down_proj.weight"
    a = adapter[f"base_model.model.{key[:-len('.weight')]}.lora_A.weight"]
    b = adapter[f"base_model.model.{key[:-len('.weight')]}.lora_B.weight"]
    by_hand = base.get(key) + (8.0 / 4) * (b @ a)
    torch.testing.assert_close(merged.get(key), by_hand, rtol=0, atol=1e-6)
    changed = 0
    for k in base_index.tensors:
        torch.testing.assert_close(merged.get(k), reference[k], rtol=0, atol=1e-6)
        if k.endswith("proj.weight"):
            changed += 1
            assert not torch.equal(merged.get(k), base.get(k))
        else:
            assert torch.equal(merged.get(k), base.get(k))            # norms and embeddings untouched
    assert changed == 7 * base_index.num_layers


def test_write_merged_refuses_an_adapter_of_another_model(tiny_model, tmp_path):
    _random_adapter(tiny_model, tmp_path / "adapter")
    other = make_tiny_model(tmp_path / "other", num_layers=5)   # same shapes, one layer fewer
    with pytest.raises(heal.HealError, match=r"adapts \['model.layers.5.*does not hold"):
        heal.write_merged(other, tmp_path / "adapter", tmp_path / "out", max_shard_bytes=30_000)


# ----------------------------------------------------------------------- training, in-process
@pytest.fixture()
def one_rank_group(tmp_path, monkeypatch):
    """torch.distributed with one gloo rank, as Ray Train would have set it up for the worker."""
    import torch.distributed as dist

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _loop(tiny_model, cycle_text, tokenizer, steps: int, folder: Path):
    config = heal_config("heal.batch_size=8", "heal.micro_batch_size=4", "heal.cutoff_len=32", "heal.lr=2e-2",
                         "heal.warmup_steps=1", "heal.checkpoint_every=2", f"heal.max_steps={steps}")
    _, examples = heal.prepare_examples(cycle_text, tokenizer, 32)
    uri = str(folder / heal.EXAMPLES_NAME)
    heal.write_examples(uri, examples)
    return heal.build_loop(config, tiny_model, uri, len(examples), tokenizer.eos_token_id, "cpu", steps)


def test_examples_go_to_the_workers_as_a_file(cycle_text, tokenizer, tiny_model, tmp_path):
    """The trainer's config names the file; the file gives back every example exactly."""
    import pickle

    kind, examples = heal.prepare_examples(cycle_text, tokenizer, 32)
    uri = str(tmp_path / "storage" / heal.EXAMPLES_NAME)
    heal.write_examples(uri, examples)
    assert heal.read_examples(uri) == examples and kind == "text"
    assert not list((tmp_path / "storage").glob(".*partial"))
    loop = heal.build_loop(heal_config(), tiny_model, uri, len(examples), 0, "cpu", 4)
    assert "examples" not in loop and loop["examples_uri"] == uri and loop["num_examples"] == len(examples)
    assert len(pickle.dumps(loop)) < 4096   # settings only, whatever the data's size


def _last(root: Path) -> Path:
    return sorted(root.glob("step_*"))[-1]


def test_training_learns_and_a_resumed_run_equals_an_uninterrupted_one(one_rank_group, tiny_model, cycle_text,
                                                                       tokenizer, tmp_path):
    loop = _loop(tiny_model, cycle_text, tokenizer, steps=6, folder=tmp_path)
    whole = heal.FolderSession(tmp_path / "whole")
    heal.train_worker(loop, whole)
    assert [m["step"] for m in whole.metrics] == [1, 2, 3, 4, 5, 6]        # metrics every step
    assert [m["step"] for m in whole.metrics if m["checkpoint"]] == [2, 4, 6]   # a checkpoint every 2 steps
    assert sorted(p.name for p in (tmp_path / "whole").glob("step_*")) == [f"step_{s:08d}" for s in (2, 4, 6)]
    assert whole.metrics[0]["lr"] == 0.0 and whole.metrics[1]["lr"] == pytest.approx(2e-2)  # Trainer's warmup
    done = json.loads((_last(tmp_path / "whole") / heal.HISTORY_NAME).read_text())
    losses = [h["loss"] for h in done["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2                # it learns the cycle
    assert done["starts"] == [0]

    # "Kill" after step 2: a fresh engine that finds only the step-2 checkpoint.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "step_00000002", tmp_path / "resumed" / "step_00000002")
    heal.train_worker(loop, heal.FolderSession(tmp_path / "resumed"))
    again = json.loads((_last(tmp_path / "resumed") / heal.HISTORY_NAME).read_text())
    assert again["starts"] == [0, 2]
    assert [h["loss"] for h in again["history"]] == losses                  # optimizer, schedule, data, dropout
    a = load_file(str(_last(tmp_path / "whole") / "adapter" / heal.ADAPTER_WEIGHTS))
    b = load_file(str(_last(tmp_path / "resumed") / "adapter" / heal.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # exclude_frozen_parameters: the engine checkpoint holds the 84 LoRA weights, not the base model.
    states = torch.load(_last(tmp_path / "whole") / "engine" / heal.ENGINE_TAG / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert len(states["module"]) == 2 * 7 * 6 and all(".lora_" in k for k in states["module"])


# ------------------------------------------------------------------------------------ CLI
def test_cli_heal_refuses_a_folder_that_is_not_a_run(tmp_path, caplog):
    from slm_dist import cli

    assert cli.main(["heal", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert "without config.resolved.yaml" in caplog.text


def test_heal_without_its_extra_names_it_before_any_work(tiny_model, cycle_text, tmp_path, caplog, monkeypatch):
    """`pip install slm-dist` without [heal]: exit 2 and the pip command, before data or Ray are touched."""
    from slm_dist import cli, extras

    real = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.setattr(heal, "prepare_examples", lambda *a: pytest.fail("read the data"))
    args = [f"model.path={tiny_model}", f"heal.model={tiny_model}", f"heal.data={cycle_text}",
            f"eval.heldout={cycle_text}", f"run.dir={tmp_path / 'run'}"]
    assert cli.main(["heal", *args]) == cli.EXIT_BAD_INPUT
    assert "slm-dist heal needs the [heal] extra (peft not installed): pip install 'slm-dist[heal]'" in caplog.text
    caplog.clear()
    assert cli.main(["run", *args, "heal.enabled=true"]) == cli.EXIT_BAD_INPUT
    assert "heal.enabled=true needs the [heal] extra" in caplog.text and not (tmp_path / "run").exists()


def test_heal_joins_the_ray_session_it_runs_in():
    """Inside `ray job submit` (or any process already connected) the training cluster is that session:
    no second Ray is started, and the session is left open for its owner."""
    ray = pytest.importorskip("ray")
    from slm_dist.backends import train

    if ray.is_initialized():
        pytest.skip("this process already holds a Ray session")
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        session = ray.get_runtime_context().gcs_address
        with train.train_cluster(None, num_cpus=1) as gpus:
            assert gpus == 0.0
            assert ray.get_runtime_context().gcs_address == session
            assert ray.cluster_resources()["CPU"] == 3.0   # the session's, not a new 1-CPU instance
        assert ray.is_initialized() and ray.get_runtime_context().gcs_address == session
        # A job's driver (`ray job submit` sets RAY_ADDRESS) joins the job's cluster as it is, in
        # place of the private instance of num_cpus it would start alone.
        code = ("import ray\nfrom slm_dist.backends import train\n"
                "with train.train_cluster(None, num_cpus=1):\n"
                "    print(ray.get_runtime_context().gcs_address, ray.cluster_resources()['CPU'])\n")
        temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        env = {**os.environ, "RAY_ADDRESS": session, "RAY_TMPDIR": temp_dir}
        try:
            out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=120)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split() == [session, "3.0"]
    finally:
        ray.shutdown()


# --------------------------------------------------------------- Ray Train, two workers (slow)
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "slm_dist.cli", "-q", *args]


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


def _heal_config(folder: Path, tiny_model: Path, cycle_text: Path) -> Path:
    """Two Ray Train workers, ZeRO-2 on CPU, 40 steps with a checkpoint every 4."""
    config = folder / "heal.yaml"
    config.write_text(f"""
model: {{path: {tiny_model}}}
run: {{dir: {folder / "run"}}}
calibration: {{source: {cycle_text}}}
eval: {{heldout: {cycle_text}, seq_len: 32, max_windows: 4}}
merge: {{max_shard_bytes: 30000}}
cluster: {{num_workers: 2, device: cpu}}
heal: {{model: {tiny_model}, batch_size: 8, micro_batch_size: 4, cutoff_len: 32, lr: 0.02, warmup_steps: 1,
        max_steps: 40, checkpoint_every: 4, zero_stage: 2}}
""")
    return config


@pytest.fixture(scope="module")
def clean_heal(tiny_model, cycle_text, tmp_path_factory) -> dict:
    """One uninterrupted healing run: what an interrupted one must come back to."""
    folder = tmp_path_factory.mktemp("clean-heal")
    out = subprocess.run(_cli("heal", str(_heal_config(folder, tiny_model, cycle_text)), "--json"), cwd=folder,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "sigint"])
def test_two_workers_zero2_cpu_interrupted_and_resumed(tiny_model, cycle_text, tmp_path, sig, clean_heal):
    """Kill -9, or Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it), after
    the first checkpoint; the rerun resumes from it, finishes the 40 steps, and ends where an
    uninterrupted run ends."""
    run_dir = tmp_path / "run"
    config = _heal_config(tmp_path, tiny_model, cycle_text)
    snapshot = run_dir / "heal" / "train" / "checkpoint_manager_snapshot.json"
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log_file:
        first = subprocess.Popen(_cli("heal", str(config)), cwd=tmp_path, env=_env(), start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=log_file)
    deadline = time.monotonic() + 600   # generous: a loaded 2-core machine starts Ray Train slowly
    while not snapshot.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not snapshot.is_file() or first.poll() is not None:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        pytest.fail(f"the first run {'ended' if first.returncode != -signal.SIGKILL else 'made no checkpoint'} "
                    f"before its first checkpoint:\n{log_path.read_text()[-3000:]}")
    os.killpg(first.pid, sig)   # the driver and everything in its session
    try:
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), log_path.read_text()[-3000:]
    assert not (run_dir / "heal" / heal.SUMMARY_NAME).exists()

    second = subprocess.run(_cli("heal", str(config), "--json"), cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    starts = json.loads((run_dir / "heal" / heal.SUMMARY_NAME).read_text())["starts"]
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < 40 and starts[1] % 4 == 0   # resumed
    history = json.loads((run_dir / "heal" / heal.SUMMARY_NAME).read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 41))
    assert sum(h["loss"] for h in history[-5:]) / 5 < history[0]["loss"] - 0.3        # the loss went down
    assert summary["perplexity_healed"] < summary["perplexity_before_heal"]

    out = Path(summary["output_dir"])
    assert verify_model(out) == []
    pairs, scale, _ = heal.read_adapter(Path(summary["adapter_dir"]))
    assert scale == 2.0 and len(pairs) == 7 * 6
    merged, base = LazyReader(open_index(out)), LazyReader(open_index(tiny_model))
    for key in open_index(tiny_model).tensors:
        expected = base.get(key)
        if key in pairs:
            a, b = pairs[key]
            expected = expected + scale * (b @ a)
        torch.testing.assert_close(merged.get(key), expected, rtol=0, atol=1e-6)
    # The resumed run ends where the uninterrupted one does: the same adapter, the same merged weights.
    clean_pairs, _, _ = heal.read_adapter(Path(clean_heal["adapter_dir"]))
    for key, (a, b) in pairs.items():
        torch.testing.assert_close(a, clean_pairs[key][0], rtol=0, atol=0)
        torch.testing.assert_close(b, clean_pairs[key][1], rtol=0, atol=0)
    clean_merged = LazyReader(open_index(Path(clean_heal["output_dir"])))
    for key in open_index(out).tensors:
        assert torch.equal(merged.get(key), clean_merged.get(key)), key


@pytest.mark.slow
def test_run_with_heal_reports_three_perplexities(tiny_model, cycle_text, tmp_path, monkeypatch):
    from slm_dist import pipeline, progress

    updates: dict[str, list[int]] = {}

    class Recorder:   # every bar of the run, by name: the heal bar advances once per training step
        def __init__(self, desc):
            self.desc = desc

        def update(self, n=1):
            updates.setdefault(self.desc, []).append(n)

        def set_postfix(self, **kwargs):
            assert set(kwargs) == {"loss", "lr"}

        def close(self):
            pass

    monkeypatch.setattr(progress, "bar", lambda show, total, desc, unit="it", initial=0: Recorder(desc))
    # The private Ray heal starts discovers no other cluster on this machine (as on a clean node). Its
    # auth mode stays this process's: Ray keeps the mode of the first session a process started, and a
    # session started here with another one refuses its own driver.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    config = load_config(None, [
        f"model.path={tiny_model}", f"calibration.source={cycle_text}", f"eval.heldout={cycle_text}",
        f"run.dir={tmp_path / 'run'}", "calibration.num_samples=16", "calibration.seq_len=32",
        "calibration.batch_size=4", "similarity.tokens_per_batch=64", "eval.seq_len=32", "eval.max_windows=4",
        "merge.max_shard_bytes=40000", "plan.target_layers_removed=2", "heal.enabled=true", "heal.batch_size=8",
        "heal.micro_batch_size=4", "heal.cutoff_len=32", "heal.lr=0.02", "heal.warmup_steps=1", "heal.max_steps=12",
        "heal.checkpoint_every=6", "cluster.num_workers=2"])
    report = pipeline.run(config, show_progress=False)
    evaluation = report["eval"]
    assert evaluation["perplexity_healed"] < evaluation["perplexity_after"]   # healing recovers the pruned model
    assert evaluation["perplexity_before"] is not None
    healed = Path(evaluation["healed_output"])
    assert open_index(healed).num_layers == 4 and verify_model(healed) == []
    assert "perplexity_healed" in (tmp_path / "run" / "report.md").read_text()
    assert updates["heal"] == [1] * 12   # rank 0's per-step reports, drained on the driver
    shutil.rmtree(temp_dir, ignore_errors=True)
