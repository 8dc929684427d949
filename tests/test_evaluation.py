"""Evaluation: task readers, lm-eval-style scoring, perplexity, and the `eval` command.

References are computed independently of the pipeline: the full Hugging Face model's logits (one
forward per sequence, no padding, no stages). Tolerances: summed log-likelihoods to 1e-4 absolute
and perplexity to 1e-5 relative (float32 through the same modules; measured differences ~1e-6).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slm_dist import calibration, evaluation
from slm_dist.backends.local import LocalBackend
from slm_dist.evaluation import EvalDataError, EvalSpec, Item
from slm_dist.testing import tiny_tokenizer
from slm_dist.workers.stage_worker import StageSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared evaluation data not found at {DATA}")


class CharTokenizer:
    """One token per character (ord), so token boundaries are visible in the test."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def two_stage_scorer(tiny_model):
    backend = LocalBackend()
    specs = [StageSpec(str(tiny_model), 0, 3, 6), StageSpec(str(tiny_model), 3, 6, 6)]
    yield evaluation.backend_scorer(backend, specs)
    backend.close()


def hf_loglik(model, tokens: list[int], num_continuation: int) -> float:
    """sum_t log p(tokens[t] | tokens[:t]) over the last num_continuation tokens, from full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    n = len(tokens)
    return sum(float(logp[t - 1, tokens[t]]) for t in range(n - num_continuation, n))


# -------------------------------------------------------------------------------- encoding
def test_encode_pair_moves_the_context_trailing_space_into_the_continuation():
    ctx, cont = evaluation.encode_pair(CharTokenizer(), "Q: a ", "b")
    assert ctx == [ord(c) for c in "Q: a"]
    assert cont == [ord(c) for c in " b"]
    ctx, cont = evaluation.encode_pair(CharTokenizer(), "Q", " b", add_bos=True)
    assert ctx == [1, ord("Q")] and cont == [ord(" "), ord("b")]


def test_requests_are_cut_from_the_left_and_keep_the_continuation():
    item = Item(contexts=("abcdefgh", "abcdefgh"), continuations=(" xy", " z"), gold=0, choice_chars=(2, 1))
    requests = evaluation.build_requests("t", [item], CharTokenizer(), max_length=5)
    assert requests[0].tokens == tuple(ord(c) for c in "fgh xy")  # the last max_length + 1 tokens
    assert requests[0].num_continuation == 3 and requests[1].num_continuation == 2
    with pytest.raises(EvalDataError, match="max_length=2"):
        evaluation.build_requests("t", [item], CharTokenizer(), max_length=2)


def test_pack_batches_respects_the_token_budget_and_covers_every_request():
    lengths = [5, 17, 3, 9, 9, 40, 1]
    groups = evaluation.pack_batches(lengths, batch_tokens=20)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = max(lengths[i] for i in g)
        assert width * len(g) <= 20 or len(g) == 1  # a request over the budget goes alone
        assert lengths[g[0]] == width               # the first member sets the padded width
    assert groups[0] == [5]  # 40 tokens: alone


# ------------------------------------------------------------------------------- metrics
def test_acc_and_acc_norm_by_hand():
    items = [Item(("c", "c"), (" a", " bbbbbbbbbb"), gold=1, choice_chars=(1, 10)),
             Item(("c", "c", "c"), (" a", " b", " c"), gold=0, choice_chars=(1, 1, 1))]
    loglik = [[-2.0, -5.0],          # acc picks 0 (wrong); per char -2 vs -0.5 -> acc_norm picks 1 (right)
              [-1.0, -1.0, -3.0]]    # tie between 0 and 1: the first wins (right) for both metrics
    # acc: scores 0, 1 -> sample sd sqrt(((0-.5)^2 + (1-.5)^2) / 1) = sqrt(.5); se = sqrt(.5) / sqrt(2) = 0.5
    # acc_norm: scores 1, 1 -> se 0
    assert evaluation.accuracy(items, loglik) == {"acc": 0.5, "acc_stderr": 0.5, "acc_norm": 1.0,
                                                  "acc_norm_stderr": 0.0, "n": 2}
    assert evaluation.accuracy(items[:1], loglik[:1])["acc_stderr"] is None   # one item: no sample variance


def test_stderr_by_hand_equals_lm_evals_mean_stderr():
    # 3 right of 5: mean .6, sample variance (3 * .4^2 + 2 * .6^2) / 4 = .3, se = sqrt(.3 / 5) = sqrt(.06)
    assert evaluation.binary_stderr(0.6, 5) == pytest.approx(0.06 ** 0.5, abs=1e-15)
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    assert evaluation.binary_stderr(0.6, 5) == pytest.approx(lm_metrics.mean_stderr([1, 1, 1, 0, 0]), abs=1e-12)


def test_average_uses_each_task_reported_metric():
    tasks = {"hellaswag": {"acc": 0.3, "acc_norm": 0.4, "n": 5}, "boolq": {"acc": 0.6, "acc_norm": 0.1, "n": 5}}
    assert evaluation.average(tasks) == pytest.approx(0.5)
    assert evaluation.average({}) is None
    assert evaluation.average_stderr(tasks) is None   # results without standard errors: none for the average
    tasks["hellaswag"]["acc_norm_stderr"], tasks["boolq"]["acc_stderr"] = 0.03, 0.04
    assert evaluation.average_stderr(tasks) == pytest.approx(0.05 / 2)   # sqrt(.03^2 + .04^2) / 2 tasks


# ------------------------------------------------------------------------- scoring vs HF
ARC_ITEMS = [  # three items in the tiny model's vocabulary; labels mix letters and digits as ARC's do
    {"id": "a", "question": {"stem": "the king of the city", "choices": [
        {"text": "river", "label": "A"}, {"text": "north school", "label": "B"}, {"text": "the war", "label": "C"}]},
     "answerKey": "B"},
    {"id": "b", "question": {"stem": "music and film", "choices": [
        {"text": "team", "label": "1"}, {"text": "season game", "label": "2"}]}, "answerKey": "1"},
    {"id": "c", "question": {"stem": "first new year", "choices": [
        {"text": "album station line", "label": "A"}, {"text": "east", "label": "B"},
        {"text": "west town", "label": "C"}, {"text": "family", "label": "D"}]}, "answerKey": "D"},
]


def test_three_item_task_scores_equal_hand_computed_log_likelihoods(tmp_path, tiny_model, hf_model, two_stage_scorer):
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ARC_ITEMS))
    items = evaluation.read_task("arc_challenge", path)
    assert [i.gold for i in items] == [1, 0, 3]
    tok = tiny_tokenizer()
    requests = evaluation.build_requests("arc_challenge", items, tok)
    assert len(requests) == 3 + 2 + 4
    scores = evaluation.score_requests(requests, two_stage_scorer, batch_tokens=64)

    expected = []
    for r in requests:
        item = items[r.item]
        # The reference tokenizes context and choice on its own: the continuation is the choice's words.
        ctx = tok("Question: " + ARC_ITEMS[r.item]["question"]["stem"] + "\nAnswer:")["input_ids"]
        cont = tok(item.continuations[r.choice])["input_ids"]
        assert list(r.tokens) == ctx + cont and r.num_continuation == len(cont)
        expected.append(hf_loglik(hf_model, ctx + cont, len(cont)))
    assert scores == pytest.approx(expected, abs=1e-4)

    loglik = [[expected[k] for k, r in enumerate(requests) if r.item == i] for i in range(3)]
    acc = sum(max(range(len(ll)), key=lambda c: ll[c]) == it.gold for ll, it in zip(loglik, items)) / 3
    chars = [[len(c["text"]) for c in row["question"]["choices"]] for row in ARC_ITEMS]
    acc_norm = sum(max(range(len(ll)), key=lambda c: ll[c] / n[c]) == it.gold
                   for ll, n, it in zip(loglik, chars, items)) / 3
    inputs = evaluation.Inputs(items={"arc_challenge": items}, requests=requests)
    result = evaluation.evaluate(inputs, two_stage_scorer, batch_tokens=64)
    se = lambda p: (p * (1 - p) / 2) ** 0.5  # noqa: E731  (3 items: n - 1 = 2)
    assert result["tasks"]["arc_challenge"] == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": 3,
                                                "acc_stderr": pytest.approx(se(acc)),
                                                "acc_norm_stderr": pytest.approx(se(acc_norm))}
    assert result["average"] == pytest.approx(acc_norm)  # arc_challenge reports acc_norm


def test_scores_do_not_depend_on_batching_or_padding(tiny_model, two_stage_scorer):
    tok = tiny_tokenizer()
    items = [Item(("the city of " * k,) * 2, (" the river", " north"), 0, (9, 5)) for k in range(1, 6)]
    requests = evaluation.build_requests("t", items, tok)
    one_by_one = evaluation.score_requests(requests, two_stage_scorer, batch_tokens=1)
    packed = evaluation.score_requests(requests, two_stage_scorer, batch_tokens=4096)
    assert len({len(r.tokens) for r in requests}) > 3  # different lengths share padded batches
    assert packed == pytest.approx(one_by_one, abs=1e-5)


def test_winogrande_partial_scoring_equals_hand_computed(tmp_path, hf_model, two_stage_scorer):
    rows = [{"qID": "q", "sentence": "the king and the church _ was first in the city.", "option1": "king",
             "option2": "church", "answer": "2"}]
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    (item,) = evaluation.read_task("winogrande", path)
    assert item.contexts == ("the king and the church king", "the king and the church church")
    assert item.continuations == (" was first in the city.",) * 2 and item.gold == 1
    tok = tiny_tokenizer()
    requests = evaluation.build_requests("winogrande", [item], tok)
    got = evaluation.score_requests(requests, two_stage_scorer)
    cont = tok(" was first in the city.")["input_ids"]
    want = [hf_loglik(hf_model, tok(c)["input_ids"] + cont, len(cont)) for c in item.contexts]
    assert got == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------------------- perplexity
def test_pipeline_perplexity_equals_the_hf_models_loss_on_the_same_windows(tiny_text_file, hf_model, two_stage_scorer):
    tok = tiny_tokenizer()
    ids = tok(evaluation.read_ppl_text(tiny_text_file, "raw"), add_special_tokens=False)["input_ids"]
    windows = calibration.perplexity_windows(ids, seq_len=48, max_windows=6)
    total = len(ids) // 48
    picked = [round(k * (total - 1) / 5) for k in range(6)]  # evenly spaced, first and last included
    assert windows.shape == (6, 48) and picked[0] == 0 and picked[-1] == total - 1
    assert windows.tolist() == [ids[48 * k:48 * (k + 1)] for k in picked]
    ppl, count = evaluation.perplexity(windows, two_stage_scorer, batch_size=4)  # batches of 4 and 2
    with torch.no_grad():
        losses = [float(hf_model(w[None], labels=w[None]).loss) for w in windows]
    assert count == 6 * 47
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)

    with_bos = calibration.perplexity_windows(ids, seq_len=48, max_windows=6, bos_id=tok.bos_token_id)
    assert with_bos.shape == (6, 48) and (with_bos[:, 0] == tok.bos_token_id).all()
    assert with_bos[0, 1:].tolist() == ids[:47]
    assert len(calibration.perplexity_windows(ids, seq_len=48)) == total  # no cap: every full window


def test_ppl_text_join_rules(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": ""}\n{"text": " = A = \\n"}\n{"text": " b c \\n"}\n')
    assert evaluation.read_ppl_text(rows) == "\n\n = A = \n\n\n b c \n"
    lines = tmp_path / "ptb.txt"
    lines.write_text(" a b \n\n c d \n")
    assert evaluation.read_ppl_text(lines) == "a b c d"
    assert evaluation.read_ppl_text(lines, "raw") == " a b \n\n c d \n"


# -------------------------------------------------------------------------------- readers
def test_readers_accept_hf_rows_and_boolean_labels(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    arc = write("arc.jsonl", [{"question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                               "answerKey": "B"}])
    (item,) = evaluation.read_task("arc_easy", arc)
    assert item.contexts[0] == "Question: Why?\nAnswer:" and item.continuations == (" x", " y") and item.gold == 1
    obqa = write("obqa.jsonl", [{"question_stem": "Fog is near", "choices": {"text": ["a marsh", "a desert"],
                                                                           "label": ["A", "B"]}, "answerKey": "A"}])
    (item,) = evaluation.read_task("openbookqa", obqa)
    assert item.contexts[0] == "Fog is near" and item.choice_chars == (7, 8)
    boolq = write("boolq.jsonl", [{"question": "is it", "passage": "P -- t", "label": "false"},
                                  {"question": "is it", "passage": "P", "answer": True},
                                  {"question": "q", "passage": "P", "label": 1}])
    items = evaluation.read_task("boolq", boolq)
    assert [i.gold for i in items] == [0, 1, 1]
    assert items[0].contexts[0] == "P -- t\nQuestion: is it?\nAnswer:" and items[0].continuations == (" no", " yes")
    hella = write("hs.jsonl", [{"activity_label": "Roof", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                                "endings": ["Go up [step] now.", "b", "c", "d"], "label": "2"}])
    (item,) = evaluation.read_task("hellaswag", hella)
    assert item.contexts[0] == "Roof: A man is on a roof. He" and item.continuations[0] == " Go up now." and item.gold == 2


def test_piqa_without_labels_names_the_missing_file(tmp_path):
    path = tmp_path / "valid.jsonl"
    path.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    with pytest.raises(EvalDataError, match="valid-labels.lst"):
        evaluation.read_task("piqa", path)
    (tmp_path / "valid-labels.lst").write_text("1\n")
    assert evaluation.read_task("piqa", path)[0].gold == 1
    with pytest.raises(EvalDataError, match="unknown task 'piqa2'"):
        evaluation.read_task("piqa2", path)


@needs_data
def test_shared_data_files_read_as_documented():
    tasks = {"piqa": ("piqa/valid.jsonl", 1838, 0), "arc_easy": ("arc/ARC-Easy-Test.jsonl", 2376, None),
             "arc_challenge": ("arc/ARC-Challenge-Test.jsonl", 1172, 2), "openbookqa": ("openbookqa/test.jsonl", 500, 1),
             "winogrande": ("winogrande/dev.jsonl", 1267, 1), "boolq": ("boolq/val.jsonl", 3270, 0)}
    for name, (rel, count, first_gold) in tasks.items():
        items = evaluation.read_task(name, DATA / rel)
        assert len(items) == count, name
        if first_gold is not None:
            assert items[0].gold == first_gold, name
    boolq = evaluation.read_task("boolq", DATA / "boolq/val.jsonl")
    assert sum(i.gold for i in boolq) == 2033  # "true" labels, per SOURCES.md
    arc = [json.loads(line) for line in (DATA / "arc/ARC-Easy-Test.jsonl").read_text().splitlines()]
    easy = evaluation.read_task("arc_easy", DATA / "arc/ARC-Easy-Test.jsonl")
    numeric = [k for k, row in enumerate(arc) if row["answerKey"].isdigit()]
    assert numeric  # digit answer keys map to the position of that label
    for k in numeric:
        labels = [c["label"] for c in arc[k]["question"]["choices"]]
        assert easy[k].gold == labels.index(arc[k]["answerKey"])
    hella = evaluation.read_task("hellaswag", DATA / "hellaswag/hellaswag_val_full.txt", limit=3)
    assert len(hella) == 3 and hella[0].gold == 3 and len(hella[0].continuations) == 4
    assert hella[0].contexts[0] == "Roof shingle removal: A man is sitting on a roof. he"
    wiki = evaluation.read_ppl_text(DATA / "wikitext-2-raw/wiki.test.hf_rows.jsonl")
    assert len(wiki) == 1_294_336  # the standard GPTQ WikiText-2 test string (SOURCES.md)
    ptb = evaluation.read_ppl_text(DATA / "ptb/ptb.test.txt")
    assert len(ptb.split()) + 3761 == 82_430  # words + one <eos> per sentence, as SOURCES.md counts


# -------------------------------------------------------------------------------- the command
def test_eval_command_prints_the_object_and_writes_it_into_a_runs_report(tmp_path, tiny_model, tiny_text_file,
                                                                           capsys):
    from slm_dist.cli import main

    task = tmp_path / "arc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in ARC_ITEMS))
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"output": str(tiny_model), "layers_after": 6}))
    args = ["-q", "eval", str(run), f"model.path={tiny_model}", "cluster.num_stages=2", "eval.max_windows=4",
            "--ppl", str(tiny_text_file), "--task", f"arc_challenge={task}", "--limit", "2", "--seq-len", "32",
            "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"ppl", "tasks", "average", "average_stderr"}
    assert printed["tasks"]["arc_challenge"]["n"] == 2
    assert printed["average"] == printed["tasks"]["arc_challenge"]["acc_norm"]
    report = json.loads((run / "report.json").read_text())
    assert report["eval"] == printed and report["layers_after"] == 6
    assert report["eval_settings"]["ppl_windows"] == {str(tiny_text_file): 4}

    # The same numbers in-process through one stage (no CLI, no run folder).
    spec = EvalSpec(ppl_files=(tiny_text_file,), tasks=(("arc_challenge", task),), limit=2, seq_len=32,
                    max_windows=4)
    backend = LocalBackend()
    direct = evaluation.evaluate(evaluation.prepare_inputs(spec, tiny_tokenizer()),
                                 evaluation.backend_scorer(backend, [StageSpec(str(tiny_model), 0, 6, 6)]))
    assert direct["ppl"][str(tiny_text_file)] == pytest.approx(printed["ppl"][str(tiny_text_file)], rel=1e-6)
    assert direct["tasks"] == printed["tasks"]

    assert main(["-q", "eval", str(tmp_path / "nowhere"), "--ppl", str(tiny_text_file)]) == 2
    assert main(["-q", "eval", str(tiny_model)]) == 2  # nothing to measure


@pytest.mark.slow  # starting a private Ray session takes 15 s on an idle 2-core machine, minutes on a busy one
def test_ray_stages_give_the_same_numbers_as_in_process(tmp_path, tiny_model, tiny_text_file):
    """`cluster.backend: ray` (two stage actors) against the in-process stages, same inputs."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process already holds a Ray session")
    from slm_dist.config import load_config
    from slm_dist.context import make_backend

    task = tmp_path / "arc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in ARC_ITEMS))
    spec = EvalSpec(ppl_files=(tiny_text_file,), tasks=(("arc_challenge", task),), seq_len=32, max_windows=4)
    results = {}
    for backend_name in ("local", "ray"):
        config = load_config(None, [f"model.path={tiny_model}", "cluster.num_stages=2",
                                    f"cluster.backend={backend_name}", "cluster.cpus_per_stage=0.5"])
        backend = make_backend(config)
        try:
            results[backend_name] = evaluation.evaluate_model(tiny_model, spec, config, backend)
        finally:
            backend.close()
    assert results["ray"] == results["local"]  # the same float32 kernels on the same batches


SMOLLM2 = Path.home() / ".cache" / "slm-dist" / "smollm2-135m"


@pytest.mark.slow
@needs_data
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason=f"SmolLM2 demo model not prepared at {SMOLLM2}")
def test_smollm2_wikitext2_perplexity_through_stages_equals_hf_loss():
    """The unpruned demo model: pipeline perplexity on WikiText-2 windows vs HF's own loss, rel 1e-4
    (float32; the stages and HF run the same modules, batched vs one window at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    ids = tok(evaluation.read_ppl_text(DATA / "wikitext-2-raw/wiki.test.hf_rows.jsonl"),
              add_special_tokens=False)["input_ids"]
    windows = calibration.perplexity_windows(ids, seq_len=256, max_windows=3)
    backend = LocalBackend()
    specs = [StageSpec(str(SMOLLM2), 0, 15, 30), StageSpec(str(SMOLLM2), 15, 30, 30)]
    ppl, count = evaluation.perplexity(windows, evaluation.backend_scorer(backend, specs), batch_size=3)
    backend.close()
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    assert count == 3 * 255
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
