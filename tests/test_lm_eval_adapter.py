"""lm-eval on the staged pipeline: `StagedLM` over two stages gives what lm-eval's own HF model (HFLM)
gives on the tiny model, request by request and metric by metric, for local task files of every
log-likelihood kind (multiple choice, loglikelihood with is_greedy, rolling over several windows)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402

from slm_dist import cli, lm_eval_adapter  # noqa: E402
from slm_dist.config import load_config  # noqa: E402
from slm_dist.testing import TINY_WORDS  # noqa: E402

MAX_LENGTH = 48   # small, so long contexts are cut on the left and rolling texts span several windows
TASKS = ("tiny_mc", "tiny_next", "tiny_rolling")


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(TINY_WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three lm-eval task YAMLs over local jsonl files (no Hub): one per log-likelihood request kind."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    mc = [{"question": _words(rng, rng.choice([3, 8, 60])), "choices": [_words(rng, rng.randint(1, 4)) for _ in range(4)],
           "answer": rng.randrange(4)} for _ in range(12)]
    nxt = [{"context": _words(rng, rng.randint(2, 70)), "target": rng.choice(TINY_WORDS)} for _ in range(10)]
    rolling = [{"text": _words(rng, rng.randint(5, 130))} for _ in range(5)]
    for name, rows in (("mc", mc), ("next", nxt), ("rolling", rolling)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(path=root / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "tiny_next.yaml").write_text(
        "task: tiny_next\n" + common.format(path=root / "next.jsonl") +
        "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \" {{target}}\"\n"
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    (root / "tiny_rolling.yaml").write_text(
        "task: tiny_rolling\n" + common.format(path=root / "rolling.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return root


@pytest.fixture(scope="module")
def both(tiny_model, task_dir):
    """lm-eval's results (with every request's log-likelihood) for HFLM and for StagedLM on 2 local stages."""
    from slm_dist.context import make_backend

    config = load_config(None, [f"model.path={tiny_model}", "cluster.num_stages=2", "eval.batch_tokens=256"])
    backend = make_backend(config)
    try:
        staged = lm_eval_adapter.staged_lm(tiny_model, config, backend)
        staged._max_length = MAX_LENGTH
        ours = lm_eval_adapter.evaluate_tasks(staged, TASKS, include_path=task_dir, log_samples=True)
    finally:
        backend.close()
    hf = HFLM(pretrained=str(tiny_model), device="cpu", dtype="float32", batch_size=3, max_length=MAX_LENGTH)
    theirs = lm_eval_adapter.evaluate_tasks(hf, TASKS, include_path=task_dir, log_samples=True)
    return ours, theirs


def test_every_metric_equals_lm_evals_hf_model(both):
    ours, theirs = both
    assert set(ours["results"]) == set(TASKS)
    for task in TASKS:
        mine, ref = ours["results"][task], theirs["results"][task]
        numeric = {k for k, v in ref.items() if isinstance(v, float)}
        assert numeric and numeric == {k for k, v in mine.items() if isinstance(v, float)}, task
        for key in numeric:
            assert mine[key] == pytest.approx(ref[key], abs=1e-4, rel=1e-4), (task, key)
    assert "acc_stderr,none" in ours["results"]["tiny_mc"]   # lm-eval's own standard errors come along


def test_every_request_equals_lm_evals_hf_model(both):
    ours, theirs = both
    count = 0
    for task in TASKS:
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                (va,), (vb,) = ra, rb
                if isinstance(vb, tuple):   # (log-likelihood, is_greedy)
                    assert va[0] == pytest.approx(vb[0], abs=1e-4) and va[1] == vb[1], (task, a["doc_id"])
                else:                       # rolling: one summed log-likelihood
                    assert va == pytest.approx(vb, abs=1e-4), (task, a["doc_id"])
                count += 1
    assert count == 12 * 4 + 10 + 5


def test_generation_is_refused_clearly(tiny_model):
    from slm_dist.context import make_backend

    config = load_config(None, [f"model.path={tiny_model}"])
    lm = lm_eval_adapter.staged_lm(tiny_model, config, make_backend(config))
    with pytest.raises(lm_eval_adapter.LmEvalError, match="log-likelihood tasks only"):
        lm.generate_until([])


def test_eval_command_runs_lm_eval_tasks_and_refuses_unknown_ones(tiny_model, task_dir, capsys):
    args = ["-q", "eval", str(tiny_model), "cluster.num_stages=2", "--lm-eval", "tiny_mc,tiny_next",
            "--lm-eval-include", str(task_dir), "--limit", "4", "--json"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["results"]) == {"tiny_mc", "tiny_next"} and printed["n-samples"]["tiny_mc"]["effective"] == 4
    assert cli.main(["-q", "eval", str(tiny_model), "--lm-eval", "no_such_task_here",
                     "--lm-eval-include", str(task_dir)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
