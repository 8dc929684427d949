"""Any lm-evaluation-harness log-likelihood task on a model spread over stages.

`StagedLM` is an lm-eval ``LM`` whose log-likelihoods come from a backend's ``logprobs`` over
`StageSpec`s (stage workers in this process, or Ray actors), so a model too big for one device is
scored by lm-eval's own task definitions (prompts, few-shot, metrics, standard errors). It follows
lm-eval's HF model (``HFLM``) request by request: the same tokenization (``TemplateLM._encode_pair``,
``tok_encode`` with the tokenizer's own special tokens unless ``add_bos_token`` says otherwise), the
same left truncation to ``max_length + 1`` tokens, the same rolling windows; it scores in the
stages' dtype (float32 on CPU), so pass ``dtype=float32`` to HFLM when comparing. Generation
(``generate_until``) is not offered: the stages return log-probabilities, not tokens.

Needs the ``[eval]`` extra (``pip install lm-eval``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from slm_dist.backends.base import Backend
from slm_dist.checkpoint.index import open_index
from slm_dist.config import SlmConfig
from slm_dist.context import load_tokenizer, make_backend, stage_specs
from slm_dist.evaluation import EvalDataError, find_model, pack_batches, pad_right

log = logging.getLogger(__name__)

# (batches, starts) -> per batch [b, s-1, 2]: log p(token t+1 | prefix) and 1.0 where it is the argmax
GreedyScorer = Callable[[Sequence[tuple[int, Tensor]], Sequence[int]], list[Tensor]]
DEFAULT_MAX_LENGTH = 2048  # HFLM's, when neither config nor tokenizer names a context length


class LmEvalError(EvalDataError):
    """lm-eval is missing, or a task asks for what the staged model cannot do; the message says which."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise LmEvalError("--lm-eval needs lm-evaluation-harness: pip install 'slm-dist[eval]' (or lm-eval)") from None
    return lm_eval


def max_length_of(model_dir: Path, tokenizer) -> int:
    """The context length HFLM would use: config's n_positions / max_position_embeddings / n_ctx, else the
    tokenizer's model_max_length when set, else 2048."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config") or config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if config.get(key) is not None:
            return int(config[key])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < 10**30 else DEFAULT_MAX_LENGTH


def staged_lm_class():
    """`StagedLM`, built on first use so that importing this module does not import lm-eval."""
    global StagedLM
    if StagedLM is not None:
        return StagedLM
    lm_eval = _lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import has_bos_prefix
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class _StagedLM(TemplateLM):
        """An lm-eval model over the staged pipeline: log-likelihoods only."""

        def __init__(self, tokenizer, scorer: GreedyScorer, max_length: int, batch_tokens: int = 4096,
                     add_bos_token: bool | None = None, prefix_token_id: int | None = None):
            super().__init__()
            self.tokenizer = tokenizer
            self._scorer = scorer
            self._max_length = int(max_length)
            self.batch_tokens = int(batch_tokens)
            self.add_bos_token = add_bos_token
            self.custom_prefix_token_id = prefix_token_id
            self.backend = "causal"   # TemplateLM._encode_pair: encode the whole pair, then split
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        # ---------------------------------------------------------------- what TemplateLM asks for
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            if self.custom_prefix_token_id is not None:
                return self.custom_prefix_token_id
            if self.tokenizer.bos_token_id is not None:
                return self.tokenizer.bos_token_id
            return self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            # HFLM's rule: the caller's choice, else add_bos_token, else the tokenizer's own default;
            # a string that already starts with the prefix token gets no second one.
            kw = {"add_special_tokens": add_special_tokens} if add_special_tokens is not None else (
                {"add_special_tokens": self.add_bos_token} if self.add_bos_token is not None else {})
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                kw["add_special_tokens"] = False
            ids = self.tokenizer.encode(string, **kw)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.tokenizer.decode(tokens, **kwargs)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """(sum of log p over the continuation, every continuation token the argmax) per request.

            Each request is context + continuation cut on the left to ``max_length + 1`` tokens, as HFLM
            does; requests are packed longest first into right-padded batches of ``batch_tokens``.
            """
            rows, conts = [], []
            for _, context_enc, continuation_enc in requests:
                if not context_enc or not continuation_enc:
                    raise LmEvalError("an lm-eval request has an empty context or continuation after tokenization")
                if len(continuation_enc) > self.max_length:
                    raise LmEvalError(f"a continuation of {len(continuation_enc)} tokens is longer than the model's "
                                      f"max_length={self.max_length}")
                rows.append((context_enc + continuation_enc)[-(self.max_length + 1):])
                conts.append(len(continuation_enc))
            groups = pack_batches([len(r) for r in rows], self.batch_tokens)
            batches = [(b, pad_right([rows[i] for i in g], self.pad_id)) for b, g in enumerate(groups)]
            starts = [min(len(rows[i]) - 1 - conts[i] for i in g) for g in groups]
            out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
            for g, lp in zip(groups, self._scorer(batches, starts)):  # lp [b, width-1, 2]
                for row, i in enumerate(g):
                    n, c = len(rows[i]), conts[i]
                    scored = lp[row, n - 1 - c:n - 1]
                    out[i] = (float(scored[:, 0].double().sum()), bool((scored[:, 1] == 1).all()))
            for (key, _, _), answer in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Whole-text log-likelihood in disjoint windows of ``max_length`` tokens, HFLM's windows."""
            windows, owner = [], []
            for k, req in enumerate(requests):
                (string,) = req.args
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((None, ctx, cont))
                    owner.append(k)
            totals = [0.0] * len(requests)
            for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
                totals[k] += ll
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            raise LmEvalError("this task generates text (output_type generate_until); slm-dist's staged model "
                              "serves log-likelihood tasks only (multiple_choice, loglikelihood, "
                              "loglikelihood_rolling). Run generative tasks on the pruned folder with lm-eval's "
                              "own hf or vllm model.")

    del lm_eval
    StagedLM = _StagedLM
    return StagedLM


StagedLM: Any = None


def staged_lm(model_dir: Path, config: SlmConfig, backend: Backend, show_progress: bool = False,
              batch_tokens: int | None = None):
    """A `StagedLM` for ``model_dir`` on ``backend``'s stages (the config's split, device and dtype)."""
    tokenizer = load_tokenizer(model_dir)
    specs = stage_specs(config, open_index(Path(model_dir), allow_pickle=config.model.allow_pickle), Path(model_dir))

    def scorer(batches, starts):
        return backend.logprobs(specs, batches, show_progress=show_progress, desc="lm-eval", starts=starts,
                                greedy=True)

    return staged_lm_class()(tokenizer, scorer, max_length_of(model_dir, tokenizer),
                             batch_tokens or config.eval.batch_tokens)


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise LmEvalError(f"--lm-eval takes comma-separated lm-eval task names, got {text!r}")
    return tasks


def evaluate_tasks(lm, tasks: Sequence[str], limit: int | float | None = None, include_path: Path | None = None,
                   num_fewshot: int | None = None, bootstrap_iters: int = 1000, log_samples: bool = False
                   ) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``lm``: its results, n-shot, versions and sample counts (and the
    per-request samples with ``log_samples``). Accuracy-like metrics get lm-eval's closed-form standard
    error; ``bootstrap_iters`` draws serve the others (perplexities)."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LmEvalError(f"unknown lm-eval task(s) {unknown}; `lm-eval ls tasks` lists them, and --lm-eval-include "
                          "DIR adds your own task YAML files")
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints notes; stdout carries only our --json
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    keys = ("results", "n-shot", "versions", "n-samples", *(("samples",) if log_samples else ()))
    return {key: out[key] for key in keys if key in out}


def run_lm_eval(target: Path, config: SlmConfig, tasks: Sequence[str], limit: int | None = None,
                include_path: Path | None = None, show_progress: bool = False) -> dict[str, Any]:
    """`slm-dist eval MODEL|RUN --lm-eval TASKS`: the tasks on the config's backend (local or Ray stages)."""
    lm_class = staged_lm_class()   # a missing lm-eval is reported before the stages load
    del lm_class
    model_dir, _ = find_model(target)
    backend = make_backend(config)
    try:
        return evaluate_tasks(staged_lm(model_dir, config, backend, show_progress), tasks, limit, include_path)
    finally:
        backend.close()
