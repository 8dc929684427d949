"""Perplexity and zero-shot multiple-choice accuracy, scored through the staged pipeline.

Everything here needs only a backend's ``logprobs(specs, batches)`` (log p of each next token),
so a model split over Ray stages is measured exactly like one held in this process.

Conventions (the ones the depth-pruning papers report, as lm-evaluation-harness computes them):

- Perplexity: the text is joined (WikiText-2 rows with blank lines, as GPTQ/SparseGPT/Wanda do;
  PTB sentences with single spaces), tokenized once WITHOUT special tokens, and cut into
  consecutive non-overlapping ``seq_len`` windows; the tail that does not fill a window is dropped
  (``max_windows`` keeps that many, evenly spaced over the text).
  No BOS by default: each window's first token is context only and the other ``seq_len - 1`` are
  scored. With ``add_bos`` every window is BOS + ``seq_len - 1`` text tokens, all of them scored.
  Perplexity = exp(mean token NLL over all scored tokens) = the HF model's exp(loss) averaged over
  windows (every window scores the same number of tokens).
- Tasks: each choice is a (context, continuation) pair scored by the summed log-likelihood of
  the continuation tokens. ``acc`` = argmax of that sum; ``acc_norm`` = argmax of the sum divided
  by the choice string's length in characters (lm-eval's definition). Tokenization follows
  lm-eval: trailing spaces of the context move to the continuation, the continuation's tokens are
  those of tokenize(context + continuation) after tokenize(context).
- LAMBADA (``EvalSpec.lambada``, the OpenAI test file of lm-eval's ``lambada_openai``): each text is
  split at its last space into context and " " + last word; acc = the share of texts whose every
  last-word token is the model's most likely next token (greedy), as lm-eval computes it. Reported
  beside the tasks, not in their average (the papers' 7-task average does not include it).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from slm_dist.backends.base import Backend
from slm_dist.calibration import perplexity_windows, read_text_file
from slm_dist.checkpoint.index import open_index
from slm_dist.checkpoint.writer import write_json
from slm_dist.config import SlmConfig
from slm_dist.context import bos_token_id, load_tokenizer, make_backend, stage_specs
from slm_dist.workers.stage_worker import StageSpec

log = logging.getLogger(__name__)

# The metric each paper in this field reports per task; the "average" is their plain mean.
TASK_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "arc_easy": "acc",
    "hellaswag": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}


class EvalDataError(ValueError):
    """A task or text file that cannot be read as asked; the message names the file, line and fix."""


# ---------------------------------------------------------------------------------- task items
@dataclass(frozen=True)
class Item:
    """One multiple-choice question: choice i is scored as log p(continuations[i] | contexts[i])."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_chars: tuple[int, ...]  # len() of each choice string, the acc_norm divisor

    def __post_init__(self) -> None:
        n = len(self.contexts)
        if n < 2 or len(self.continuations) != n or len(self.choice_chars) != n:
            raise EvalDataError(f"an item needs >= 2 choices with one context, continuation and length each; got "
                                f"{len(self.contexts)} contexts, {len(self.continuations)} continuations")
        if not 0 <= self.gold < n:
            raise EvalDataError(f"gold answer {self.gold} is not one of the {n} choices")


def _shared_context(context: str, choices: Sequence[str], gold: int) -> Item:
    """The common case: one context, choices appended after lm-eval's target delimiter (one space)."""
    return Item(contexts=(context,) * len(choices), continuations=tuple(" " + c for c in choices), gold=gold,
                choice_chars=tuple(len(c) for c in choices))


def _arc_choices(row: dict, where: str) -> tuple[str, list[str], int]:
    """ARC / OpenBookQA: original AI2 jsonl (question.stem, question.choices) or HF rows."""
    question, choices = row.get("question"), row.get("choices")
    if isinstance(question, dict):  # AI2 release: {"question": {"stem", "choices": [{"text", "label"}]}}
        stem = question["stem"]
        texts = [c["text"] for c in question["choices"]]
        labels = [str(c["label"]) for c in question["choices"]]
    elif isinstance(choices, dict):  # HF: {"question" | "question_stem", "choices": {"text": [], "label": []}}
        stem = row.get("question_stem", question)
        texts, labels = list(choices["text"]), [str(x) for x in choices["label"]]
    else:
        raise EvalDataError(f"{where}: not an ARC/OpenBookQA row (need question.stem + question.choices, or "
                            f"question + choices.text/label); keys: {sorted(row)}")
    key = str(row["answerKey"]).strip()
    if key not in labels:
        raise EvalDataError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return stem, texts, labels.index(key)


def _arc(row: dict, where: str) -> Item:
    stem, texts, gold = _arc_choices(row, where)
    return _shared_context(f"Question: {stem}\nAnswer:", texts, gold)


def _openbookqa(row: dict, where: str) -> Item:
    stem, texts, gold = _arc_choices(row, where)
    return _shared_context(stem, texts, gold)  # lm-eval's openbookqa prompt is the bare stem


def _piqa(row: dict, where: str) -> Item:
    return _shared_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _boolq(row: dict, where: str) -> Item:
    label = row.get("label", row.get("answer"))
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        gold = int(label.strip().lower() == "true")  # the SuperGLUE copy here stores "true"/"false" strings
    elif isinstance(label, bool) or label in (0, 1):
        gold = int(label)  # google's `answer` bool, or HF super_glue's 0 = False / 1 = True
    else:
        raise EvalDataError(f"{where}: BoolQ label must be true/false (bool, 0/1 or the strings), got {label!r}")
    return _shared_context(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], gold)


def _winogrande(row: dict, where: str) -> Item:
    """Partial scoring (lm-eval): context = sentence up to the blank with the option filled in;
    the continuation is the rest of the sentence, the same for both options."""
    sentence = row["sentence"]
    if "_" not in sentence:
        raise EvalDataError(f"{where}: WinoGrande sentence has no '_' blank: {sentence!r}")
    cut = sentence.index("_")
    options = [row["option1"], row["option2"]]
    rest = " " + sentence[cut + 1:].strip()
    return Item(contexts=tuple(sentence[:cut] + o for o in options), continuations=(rest, rest),
                gold=int(row["label"]) - 1, choice_chars=tuple(len(sentence[:cut] + o) for o in options))


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict, where: str) -> Item:
    """Original / HF jsonl rows, prompted as lm-eval does (ctx_b capitalised, [tags] removed)."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _shared_context(_hellaswag_preprocess(row["activity_label"] + ": " + ctx),
                           [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


TASK_ROWS: dict[str, Callable[[dict, str], Item]] = {
    "piqa": _piqa,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "openbookqa": _openbookqa,
    "winogrande": _winogrande,
    "hellaswag": _hellaswag,
    "boolq": _boolq,
}


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for n, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{n} is not a JSON object ({e}); task files are .jsonl, .parquet, "
                                    "or llama.cpp's 6-line HellaSwag .txt") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{n} is a JSON {type(row).__name__}, not an object; each line of a task "
                                    "file is one object with the task's fields")
            rows.append(row)
    return rows


def _read_utf8(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); give a UTF-8 file") from None


def _attach_labels(task: str, path: Path, rows: list[dict]) -> None:
    """PIQA and WinoGrande ship labels in a sibling `<stem>-labels.lst` (one per line); use it when rows lack one."""
    key = {"piqa": "label", "winogrande": "answer"}.get(task)
    if key is None:
        return
    for row in rows:
        if key in row and row[key] not in ("", None):
            row["label"] = row[key]
    if all("label" in r for r in rows):
        return
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        raise EvalDataError(f"{path}: {task} rows carry no {key!r} and no labels file {labels_path} was found; "
                            "use the validation/dev split with its -labels.lst beside it")
    labels = [x.strip() for x in labels_path.read_text().splitlines() if x.strip()]
    if len(labels) != len(rows):
        raise EvalDataError(f"{labels_path} has {len(labels)} labels for {len(rows)} rows in {path}")
    for row, label in zip(rows, labels):
        row["label"] = int(label)


def read_hellaswag_txt(path: Path) -> list[Item]:
    """llama.cpp's HellaSwag text form: per task 6 lines (context, gold 0-3, four endings), already preprocessed."""
    lines = _read_utf8(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise EvalDataError(f"{path} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per task)")
    items = []
    for k in range(0, len(lines), 6):
        try:
            gold = int(lines[k + 1])
        except ValueError:
            raise EvalDataError(f"{path}:{k + 2}: expected the gold label 0-3, got {lines[k + 1]!r}") from None
        try:
            items.append(_shared_context(lines[k], lines[k + 2:k + 6], gold))
        except EvalDataError as e:
            raise EvalDataError(f"{path}:{k + 2}: {e}") from None
    return items


def read_task(name: str, path: Path, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items of task ``name`` from ``path`` (format by task and file suffix)."""
    if name not in TASK_ROWS:
        raise EvalDataError(f"unknown task {name!r}; known tasks: {sorted(TASK_ROWS)}")
    path = Path(path)
    if name == "hellaswag" and path.suffix == ".txt":
        items = read_hellaswag_txt(path)
    else:
        rows = read_rows(path)
        _attach_labels(name, path, rows)
        items = []
        for n, row in enumerate(rows[:limit], start=1):
            try:
                items.append(TASK_ROWS[name](row, f"{path}:{n}"))
            except KeyError as e:
                raise EvalDataError(f"{path}:{n}: a {name} row needs field {e}; it has {sorted(row)}") from None
            except EvalDataError as e:  # e.g. a gold index out of range: say which row
                raise (e if str(e).startswith(str(path)) else EvalDataError(f"{path}:{n}: {e}")) from None
            except (TypeError, ValueError) as e:
                raise EvalDataError(f"{path}:{n}: a {name} row with a field of the wrong type ({e})") from None
    if not items:
        raise EvalDataError(f"{path} holds no {name} items")
    return items[:limit]


# --------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair as tokens: scored = sum of log p over the continuation tokens."""

    task: str
    item: int
    choice: int
    tokens: tuple[int, ...]      # context + continuation, left-truncated to max_length + 1
    num_continuation: int        # the last num_continuation tokens are scored


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's pair encoding: (context tokens, continuation tokens); no special tokens unless add_bos."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if add_bos:
        ctx = [tokenizer.bos_token_id, *ctx]
    return ctx, cont


def build_requests(task: str, items: Sequence[Item], tokenizer, add_bos: bool = False,
                   max_length: int = 2048) -> list[Request]:
    out = []
    for i, item in enumerate(items):
        for c, (context, continuation) in enumerate(zip(item.contexts, item.continuations)):
            ctx, cont = encode_pair(tokenizer, context, continuation, add_bos)
            if not cont:
                raise EvalDataError(f"{task} item {i} choice {c}: the continuation {continuation!r} has no tokens")
            if not ctx:  # nothing to condition on: lm-eval conditions on the end-of-text token
                ctx = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id]
            tokens = (ctx + cont)[-(max_length + 1):]
            if len(cont) >= len(tokens):
                raise EvalDataError(f"{task} item {i} choice {c}: continuation of {len(cont)} tokens does not fit "
                                    f"max_length={max_length}; raise eval.max_length")
            out.append(Request(task, i, c, tuple(tokens), len(cont)))
    return out


def pack_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Request indices grouped longest first so each padded batch holds <= batch_tokens tokens.

    Sorting by length keeps padding small; a request longer than the budget gets a batch alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= batch_tokens:
            groups[-1].append(i)  # the first member is the longest: it sets the padded width
        else:
            groups.append([i])
    return groups


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:  # int64 [len(rows), max len]
    """Right padding leaves every real position's log-probabilities unchanged under a causal mask."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for k, r in enumerate(rows):
        out[k, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


# (batches, starts) -> per batch [b, s-1] log p(next token); positions before starts[i] may be NaN
# (None: every position). Starts spare the vocabulary projection where nothing is scored.
Scorer = Callable[..., list[Tensor]]


def score_requests(requests: Sequence[Request], logprobs: Scorer, batch_tokens: int = 4096,
                   pad_id: int = 0) -> list[float]:
    """Summed continuation log-likelihood of every request, in request order."""
    groups = pack_batches([len(r.tokens) for r in requests], batch_tokens)
    batches = [(b, pad_right([requests[i].tokens for i in g], pad_id)) for b, g in enumerate(groups)]
    starts = [min(len(requests[i].tokens) - 1 - requests[i].num_continuation for i in g) for g in groups]
    out = [math.nan] * len(requests)
    for g, lp in zip(groups, logprobs(batches, starts)):  # lp: [b, width-1]; lp[:, t] = log p(token t+1 | tokens <= t)
        for row, i in enumerate(g):
            n, c = len(requests[i].tokens), requests[i].num_continuation
            out[i] = float(lp[row, n - 1 - c:n - 1].double().sum())
    return out


def accuracy(items: Sequence[Item], loglik: Sequence[Sequence[float]]) -> dict[str, float | int | None]:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character); first index wins ties.

    ``acc_stderr`` / ``acc_norm_stderr``: the standard error of the mean over items, as lm-eval
    reports it (sample standard deviation / sqrt(n) = sqrt(p (1 - p) / (n - 1)) for 0/1 scores);
    None for a single item.
    """
    def argmax(values: Sequence[float]) -> int:
        return max(range(len(values)), key=lambda k: (values[k], -k))

    hits = hits_norm = 0
    for item, ll in zip(items, loglik):
        hits += argmax(ll) == item.gold
        hits_norm += argmax([v / n for v, n in zip(ll, item.choice_chars)]) == item.gold
    n = len(items)
    acc, acc_norm = hits / n, hits_norm / n
    return {"acc": acc, "acc_stderr": binary_stderr(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": binary_stderr(acc_norm, n), "n": n}


def binary_stderr(p: float, n: int) -> float | None:
    """Standard error of a mean of n 0/1 scores with mean p (sample variance, n - 1)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def read_lambada(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(context, " " + last word) of the first ``limit`` texts of a LAMBADA jsonl file ({"text": ...})."""
    pairs = []
    for n, row in enumerate(read_rows(Path(path))[:limit], start=1):
        text = row.get("text")
        if not isinstance(text, str) or " " not in text.strip():
            raise EvalDataError(f"{path}:{n}: a LAMBADA row needs a \"text\" of at least two words; got {row!r:.80}")
        context, word = text.rstrip().rsplit(" ", 1)
        pairs.append((context, " " + word))
    if not pairs:
        raise EvalDataError(f"{path} holds no LAMBADA texts")
    return pairs


def lambada_accuracy(requests: Sequence[Request], logprobs: Scorer, batch_tokens: int = 4096,
                     pad_id: int = 0) -> dict[str, float | int]:
    """Share of requests whose every continuation token is the greedy choice (``logprobs`` with greedy:
    channel 1 is 1.0 where the token is the argmax)."""
    groups = pack_batches([len(r.tokens) for r in requests], batch_tokens)
    batches = [(b, pad_right([requests[i].tokens for i in g], pad_id)) for b, g in enumerate(groups)]
    starts = [min(len(requests[i].tokens) - 1 - requests[i].num_continuation for i in g) for g in groups]
    hits = 0
    for g, scored in zip(groups, logprobs(batches, starts, greedy=True)):
        for row, i in enumerate(g):
            n, c = len(requests[i].tokens), requests[i].num_continuation
            hits += bool((scored[row, n - 1 - c:n - 1, 1] == 1.0).all())
    acc = hits / len(requests)
    return {"acc": acc, "acc_stderr": binary_stderr(acc, len(requests)), "n": len(requests)}


def average(tasks: Mapping[str, Mapping[str, float]]) -> float | None:
    """Plain mean over tasks of the metric the papers report for each (TASK_METRIC)."""
    values = [scores[TASK_METRIC[name]] for name, scores in tasks.items()]
    return sum(values) / len(values) if values else None


def average_stderr(tasks: Mapping[str, Mapping[str, float]]) -> float | None:
    """Standard error of `average`, the tasks taken as independent: sqrt(sum of se_i^2) / number of tasks;
    None when a task has none (one item, or a result measured before standard errors were recorded)."""
    errors = [scores.get(f"{TASK_METRIC[name]}_stderr") for name, scores in tasks.items()]
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


# ------------------------------------------------------------------------------- perplexity
def read_ppl_text(path: Path, join: str = "auto") -> str:
    """The evaluation string of a perplexity file.

    ``rows`` (.jsonl, field "text"): rows joined by "\\n\\n" - the GPTQ/SparseGPT/Wanda WikiText-2
    convention over the HF row list. ``lines`` (.txt): every non-blank line stripped, joined by one
    space - their PTB convention (HF ptb_text_only sentences). ``raw``: the file as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perplexity text {path} does not exist")
    if join == "auto":
        join = "rows" if path.suffix == ".jsonl" else "lines"
    if join == "rows":
        rows = read_rows(path)
        if not rows or "text" not in rows[0]:
            raise EvalDataError(f"{path}: a .jsonl perplexity file needs a \"text\" field per row")
        return "\n\n".join(r["text"] for r in rows)
    text = read_text_file(path, "perplexity text")
    if join == "lines":
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    if join == "raw":
        return text
    raise EvalDataError(f"unknown perplexity join {join!r}; use auto, rows, lines or raw")


def perplexity(windows: Tensor, logprobs: Scorer, batch_size: int) -> tuple[float, int]:
    """(exp(mean NLL), tokens scored) over ``windows`` [n, seq_len]; every position after the first is scored."""
    batches = [(k // batch_size, windows[k:k + batch_size]) for k in range(0, len(windows), batch_size)]
    total, count = 0.0, 0
    for lp in logprobs(batches):
        total -= float(lp.double().sum())
        count += lp.numel()
    return math.exp(total / count), count


# ------------------------------------------------------------------------------ the whole eval
@dataclass(frozen=True)
class EvalSpec:
    """What to measure (config.eval plus command-line flags)."""

    ppl_files: tuple[Path, ...] = ()
    tasks: tuple[tuple[str, Path], ...] = ()
    limit: int | None = None
    seq_len: int = 256
    max_windows: int | None = None
    add_bos: bool = False
    batch_tokens: int = 4096
    max_length: int = 2048
    ppl_join: str = "auto"
    lambada: Path | None = None   # LAMBADA jsonl (``limit`` texts of it), scored apart from the tasks

    @classmethod
    def from_config(cls, eval_section, ppl_files: Sequence[Path] = (), tasks: Mapping[str, Path] | None = None,
                    limit: int | None = None, seq_len: int | None = None) -> "EvalSpec":
        """config.eval, with command-line values (when given) replacing the config's."""
        files = tuple(Path(p) for p in (ppl_files or eval_section.ppl_files))
        chosen = dict(tasks) if tasks else dict(eval_section.tasks)
        return cls(ppl_files=files, tasks=tuple((k, Path(v)) for k, v in chosen.items()),
                   limit=limit if limit is not None else eval_section.limit,
                   seq_len=seq_len or eval_section.seq_len, max_windows=eval_section.max_windows,
                   add_bos=eval_section.add_bos, batch_tokens=eval_section.batch_tokens,
                   max_length=eval_section.max_length)


@dataclass
class Inputs:
    """Tokenized inputs, built once and shared by every model that has the same tokenizer."""

    ppl: dict[str, Tensor] = field(default_factory=dict)            # file -> windows [n, seq_len]
    items: dict[str, list[Item]] = field(default_factory=dict)      # task -> items
    requests: list[Request] = field(default_factory=list)
    lambada: list[Request] = field(default_factory=list)


def prepare_inputs(spec: EvalSpec, tokenizer) -> Inputs:
    inputs = Inputs()
    bos = bos_token_id(tokenizer, spec.add_bos)
    for path in spec.ppl_files:
        ids = tokenizer(read_ppl_text(path, spec.ppl_join), add_special_tokens=False)["input_ids"]
        inputs.ppl[str(path)] = perplexity_windows(ids, spec.seq_len, spec.max_windows, bos)
    for name, path in spec.tasks:
        items = read_task(name, path, spec.limit)
        inputs.items[name] = items
        inputs.requests += build_requests(name, items, tokenizer, spec.add_bos, spec.max_length)
    if spec.lambada is not None:
        pairs = read_lambada(spec.lambada, spec.limit)
        items = [Item((c, c), (w, w), 0, (len(w), len(w))) for c, w in pairs]  # one choice, twice: Item's shape
        inputs.lambada = [r for r in build_requests("lambada", items, tokenizer, spec.add_bos, spec.max_length)
                          if r.choice == 0]
    return inputs


def evaluate(inputs: Inputs, logprobs: Scorer, batch_tokens: int = 4096, pad_id: int = 0) -> dict:
    """The eval object: {"ppl": {file: value}, "tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}},
    "average": mean, "average_stderr": its standard error}."""
    result: dict = {"ppl": {}, "tasks": {}, "average": None, "average_stderr": None}
    for name, windows in inputs.ppl.items():
        batch_size = max(1, batch_tokens // windows.shape[1])
        result["ppl"][name], _ = perplexity(windows, logprobs, batch_size)
    if inputs.requests:
        scores = score_requests(inputs.requests, logprobs, batch_tokens, pad_id)
        loglik: dict[str, list[list[float]]] = {name: [[math.nan] * len(it.contexts) for it in items]
                                                for name, items in inputs.items.items()}
        for r, s in zip(inputs.requests, scores):
            loglik[r.task][r.item][r.choice] = s
        for name, items in inputs.items.items():
            result["tasks"][name] = accuracy(items, loglik[name])
        result["average"] = average(result["tasks"])
        result["average_stderr"] = average_stderr(result["tasks"])
    if inputs.lambada:
        result["lambada"] = lambada_accuracy(inputs.lambada, logprobs, batch_tokens, pad_id)
    return result


def backend_scorer(backend: Backend, specs: Sequence[StageSpec], show_progress: bool = False) -> Scorer:
    """``logprobs`` bound to a backend (local or Ray) and the stage specs of one model."""
    return lambda batches, starts=None, greedy=False: backend.logprobs(specs, batches, show_progress=show_progress,
                                                                       starts=starts, greedy=greedy)


def evaluate_model(model_dir: Path, spec: EvalSpec, config: SlmConfig, backend: Backend, show_progress: bool = False,
                   inputs: Inputs | None = None, patch_file: Path | None = None) -> dict:
    """Load the model's stages on ``backend`` and measure everything ``spec`` asks for. ``patch_file``:
    LinearPatch's residual-stream patches, applied in memory (they fold into no weight)."""
    tokenizer = load_tokenizer(model_dir)
    inputs = inputs or prepare_inputs(spec, tokenizer)
    index = open_index(Path(model_dir), allow_pickle=config.model.allow_pickle)
    specs = stage_specs(config, index, Path(model_dir))
    if patch_file is not None:
        specs = [replace(s, patch_file=str(patch_file)) for s in specs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return evaluate(inputs, backend_scorer(backend, specs, show_progress), spec.batch_tokens, pad_id)


def describe(spec: EvalSpec, inputs: Inputs) -> dict:
    """How the numbers were made (for reports): windows, items and the metric behind the average."""
    return {"seq_len": spec.seq_len, "add_bos": spec.add_bos, "limit": spec.limit, "max_length": spec.max_length,
            "ppl_windows": {k: int(v.shape[0]) for k, v in inputs.ppl.items()},
            "ppl_tokens_scored": {k: int(v.shape[0] * (v.shape[1] - 1))
                                  for k, v in inputs.ppl.items()},
            "items": {name: len(items) for name, items in inputs.items.items()},
            "metric": {name: TASK_METRIC[name] for name in inputs.items},
            **({"lambada_items": len(inputs.lambada)} if inputs.lambada else {}),
            "bos": "prepended to every window and context" if spec.add_bos else
                   "none: no special tokens; a window's first token is context only"}


# ------------------------------------------------------------------------------- `slm-dist eval`
def find_model(target: Path) -> tuple[Path, Path | None]:
    """(model folder, run folder or None): a MODEL folder has config.json; a RUN folder has the
    pruned checkpoint its report names (or ``model/``)."""
    target = Path(target)
    if (target / "config.json").is_file():
        return target, None
    report = target / "report.json"
    if report.is_file():
        out = json.loads(report.read_text()).get("output")
        if out and (Path(out) / "config.json").is_file():
            return Path(out), target
    if (target / "model" / "config.json").is_file():
        return target / "model", target
    raise FileNotFoundError(f"{target} is neither a model folder (no config.json) nor a run folder with a pruned "
                            "checkpoint (report.json 'output' or model/); give one of those")


def run_eval(target: Path, config, spec: EvalSpec, show_progress: bool = False) -> dict:
    """Evaluate a model or a run's pruned model on ``config``'s backend; a run's report.json gets the object."""
    model_dir, run_dir = find_model(target)
    if not spec.ppl_files and not spec.tasks:
        raise EvalDataError("nothing to evaluate: give --ppl FILE and/or --task NAME=FILE (or eval.ppl_files / "
                            "eval.tasks in the config)")
    inputs = prepare_inputs(spec, load_tokenizer(model_dir))
    backend = make_backend(config)
    try:
        result = evaluate_model(model_dir, spec, config, backend, show_progress, inputs)
    finally:
        backend.close()
    if run_dir is not None and (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text())
        report["eval"] = result
        report["eval_settings"] = {"model": str(model_dir), **describe(spec, inputs)}
        write_json(run_dir / "report.json", report)
    return result
