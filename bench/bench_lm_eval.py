"""lm-eval through the staged pipeline: one lm-eval task on SmolLM2-135M over 2 Ray stages (StagedLM)
against lm-eval's own HF model (HFLM, float32, one process) on the same items.

The task is lm-eval's arc_easy (its prompt, choices and metrics) read from the local AI2 ARC-Easy test
file (../shared/data; the Hub is unreachable here), first --limit items. Prints and records both
models' acc / acc_norm with lm-eval's standard errors, the largest per-request log-likelihood
difference, is_greedy disagreements, and the wall time of each (ratio against HFLM, same run).

    python bench/bench_lm_eval.py [--limit 200] [--no-write]
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from slm_dist import lm_eval_adapter
from slm_dist.assets import default_cache_dir, prepare_demo_assets
from slm_dist.config import load_config
from slm_dist.context import make_backend

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
ARC_EASY = REPO.parent / "shared" / "data" / "arc" / "ARC-Easy-Test.jsonl"
TITLE = "## lm-eval on the stages (issue 18)"
TASK_YAML = """task: arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "arc_easy_local.yaml").write_text(TASK_YAML.format(path=ARC_EASY))
    return folder


def per_request(samples_a: list[dict], samples_b: list[dict]) -> tuple[float, int, int]:
    """(max |loglik difference|, is_greedy disagreements, requests) over matching samples."""
    worst, flips, n = 0.0, 0, 0
    for a, b in zip(samples_a, samples_b, strict=True):
        assert a["doc_id"] == b["doc_id"]
        for ((la, ga),), ((lb, gb),) in zip(a["resps"], b["resps"], strict=True):
            worst, flips, n = max(worst, abs(la - lb)), flips + (ga != gb), n + 1
    return worst, flips, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="first N ARC-Easy test items")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = prepare_demo_assets(default_cache_dir()).model_dir
    tasks = write_task(Path(tempfile.mkdtemp(prefix="slm-lm-eval-")))
    config = load_config(None, [f"model.path={model}", "cluster.backend=ray", "cluster.num_stages=2",
                                "model.dtype=float32"])

    backend = make_backend(config)
    try:
        start = time.perf_counter()
        staged = lm_eval_adapter.staged_lm(model, config, backend)
        ours = lm_eval_adapter.evaluate_tasks(staged, ["arc_easy_local"], args.limit, tasks, log_samples=True)
        staged_s = time.perf_counter() - start
    finally:
        backend.close()

    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    hf = HFLM(pretrained=str(model), device="cpu", dtype="float32", batch_size=16)
    theirs = lm_eval_adapter.evaluate_tasks(hf, ["arc_easy_local"], args.limit, tasks, log_samples=True)
    hf_s = time.perf_counter() - start

    worst, flips, n = per_request(ours["samples"]["arc_easy_local"], theirs["samples"]["arc_easy_local"])
    rows = []
    for name, res, secs in (("StagedLM, 2 Ray stages", ours, staged_s), ("lm-eval HFLM, 1 process", theirs, hf_s)):
        r = res["results"]["arc_easy_local"]
        rows.append(f"| {name} | {100 * r['acc,none']:.1f} ± {100 * r['acc_stderr,none']:.1f} | "
                    f"{100 * r['acc_norm,none']:.1f} ± {100 * r['acc_norm_stderr,none']:.1f} | {secs:.0f} s |")
    command = "python bench/bench_lm_eval.py " + shlex.join(sys.argv[1:])
    section = "\n".join([
        TITLE, "",
        f"`{command.strip()}` on {os.cpu_count()} CPU cores (shared with other jobs: times are indicative). "
        f"SmolLM2-135M (the demo model), lm-eval {__import__('lm_eval').__version__}'s `arc_easy` task "
        f"(prompt `Question: ...\\nAnswer:`, acc and acc_norm) read from ../shared/data's ARC-Easy test file, "
        f"first {args.limit} items ({n} log-likelihood requests), 0-shot, float32 on CPU.", "",
        "| model | acc (%) | acc_norm (%) | wall (load + score) |", "|---|---|---|---|", *rows, "",
        f"Per request: largest |log-likelihood difference| {worst:.2e}; is_greedy disagreements: {flips} of {n}. "
        f"StagedLM took {staged_s / hf_s:.2f}x HFLM's time (Ray start-up and two stage actors included; one "
        "timing each on a loaded machine, and StagedLM projects onto the vocabulary only at continuation "
        "positions while HFLM does at every position, so this is no speed claim). "
        "The same through the CLI: `slm-dist eval MODEL cluster.backend=ray cluster.num_stages=2 "
        "model.dtype=float32 --lm-eval arc_easy_local --lm-eval-include DIR --limit N` (DIR holding the task "
        "YAML this script writes).", ""])
    print(section)
    if not args.no_write:
        text = RESULTS.read_text()
        if TITLE in text:
            head, _, rest = text.partition(TITLE)
            tail = rest[rest.find("\n## "):] if "\n## " in rest else "\n"
            text = head + section + tail
        else:
            text = text.rstrip("\n") + "\n\n" + section
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
