"""`slm-dist` command line. The only place that reads argv and environment variables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from slm_dist import __version__, logs
from slm_dist.config import COMPARE_METHODS

log = logging.getLogger("slm_dist")
# `slm-dist run` without a config file is the demo: the schema defaults are the demo's values,
# except the backend, which is local in the schema (library use, tests) and Ray for the demo.
DEMO_SETTINGS = ("cluster.backend=ray",)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
CACHE_ENV = "SLM_DIST_CACHE"


class UsageError(ValueError):
    """The command line itself is wrong (exit 2, like argparse's own usage errors)."""


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from slm_dist.arch import UnsupportedArchitectureError
    from slm_dist.calibration import CalibrationDataError
    from slm_dist.checkpoint.export import ExportError
    from slm_dist.checkpoint.index import CheckpointError
    from slm_dist.config import ConfigError
    from slm_dist.core.merge_jobs import MergeError
    from slm_dist.core.partition import PartitionError
    from slm_dist.core.planner import PlanError
    from slm_dist.evaluation import EvalDataError
    from slm_dist.extras import MissingExtraError
    from slm_dist.heal import HealError
    from slm_dist.preflight import PreflightError
    from slm_dist.report import ReportError

    return (ConfigError, CheckpointError, CalibrationDataError, UnsupportedArchitectureError, PlanError, ExportError,
            MergeError, PartitionError, FileNotFoundError, HealError, ReportError, EvalDataError, PreflightError,
            UsageError, MissingExtraError)


def _split_args(items: list[str]) -> tuple[Path | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the first item without '=' is the config file."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = Path(item)
        else:
            raise UsageError(f"unexpected argument {item!r} after the config file {config}: give one CONFIG and "
                             "key=value overrides")
    return config, overrides


def _cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else None


def cmd_run(args) -> int:
    from slm_dist import pipeline
    from slm_dist.config import load_config

    path, overrides = _split_args(args.items)
    if path is None:
        log.info("no config file: the SmolLM2-135M demo settings (configs/default.yaml) on a local Ray instance")
        overrides = [*DEMO_SETTINGS, *overrides]
    config = load_config(path, overrides)
    report = pipeline.run(config, cache_dir=_cache_dir(), show_progress=_show_progress(args), force=args.force)
    log.info("done: %d -> %d layers, perplexity %s -> %s; checkpoint in %s", report["layers_before"],
             report["layers_after"], _fmt(report["perplexity_before"]), _fmt(report["perplexity_after"]),
             report["output"])
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    return EXIT_OK


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _show_progress(args) -> bool:
    """Bars on a terminal-like stderr only: --quiet and --log-json (one JSON object per line) turn them off."""
    return not (args.quiet or args.log_json)


def cmd_plan(args) -> int:
    from slm_dist.config import load_config

    path, overrides = _split_args(args.items)
    config = load_config(path, overrides)
    if args.dry_run:
        from slm_dist import dryrun, preflight

        model_dir = config.model.path
        if model_dir is None:
            from slm_dist import assets

            model_dir = assets.prepare_demo_model(config.run.cache_dir or _cache_dir() or assets.default_cache_dir())
        else:
            from slm_dist.checkpoint.hub import resolve_model

            model_dir = resolve_model(model_dir, weights=False)  # a Hub repo id: config and index only
        # The same checks a run makes first, every problem listed (the demo's texts, fetched by a run, are not).
        problems = preflight.run_problems(config, Path(model_dir), config.calibration.source, config.eval.heldout,
                                          layers_removed=preflight.planned_removal(config), dry_run=True)
        if problems:
            preflight.log_problems(problems)
            log.error("plan --dry-run: %d problem(s) above; fix them and run it again", len(problems))
            return EXIT_BAD_INPUT
        result = dryrun.dry_run(config, Path(model_dir), dryrun.Assumptions.parse(args.assume or []))
        sys.stdout.write((json.dumps(result.to_json()) if args.json else dryrun.format_dry_run(result)) + "\n")
        if not result.fits:
            log.error("%s", result.refusal)
            return EXIT_BAD_INPUT
        return EXIT_OK
    from slm_dist import pipeline

    out = pipeline.run(config, cache_dir=_cache_dir(), show_progress=_show_progress(args), force=args.force,
                       stop_after="plan")
    plan = out["plan"]
    log.info("plan: %d -> %d layers, windows %s (threshold %s); %s", plan["num_layers_before"],
             plan["num_layers_after"], plan["windows"], plan["threshold"], config.run.dir / "plan.json")
    if args.json:
        sys.stdout.write(json.dumps(plan) + "\n")
    return EXIT_OK


def cmd_report(args) -> int:
    from slm_dist import report

    result = report.write_report(Path(args.run))
    log.info("wrote %s/report.md, report.json, %s, %s", args.run, result["figures"]["similarity"],
             result["figures"]["block_influence"])
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    return EXIT_OK


def cmd_merge(args) -> int:
    # No `context` here unless asked for: it imports torch, which a merge that only copies never needs.
    from slm_dist.checkpoint.hub import resolve_model
    from slm_dist.config import load_config
    from slm_dist.merging import merge_from_plan

    path, overrides = _split_args(args.items)
    config = load_config(path, overrides)
    model_dir = config.model.path
    if model_dir is None:  # the demo model: fetched (once) like `run` does
        from slm_dist import context

        model_dir = context.resolve_inputs(config, _cache_dir(), _show_progress(args)).model_dir
    model_dir = resolve_model(model_dir)  # a Hub repo id: its cached snapshot
    if config.cluster.backend == "local":
        from slm_dist.workers.merge_worker import run_jobs_in_threads

        summary = merge_from_plan(config, Path(model_dir), run_jobs_in_threads, show_progress=_show_progress(args))
    else:
        from slm_dist import context

        backend = context.make_backend(config)
        try:
            summary = merge_from_plan(config, Path(model_dir), backend.run_shard_jobs,
                                      show_progress=_show_progress(args))
        finally:
            backend.close()
    log.info("merge done: %d shards written, %d already finished; checkpoint in %s",
             len(summary["shards_written"]), len(summary["shards_skipped"]), summary["out_dir"])
    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    return EXIT_OK


def cmd_heal(args) -> int:
    from slm_dist import heal
    from slm_dist.config import load_config

    path, overrides = _split_args(args.items)
    if path is not None and path.is_dir():
        # A run folder: heal what that run pruned, with the settings it ran with (plus overrides).
        if not (path / "config.resolved.yaml").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.resolved.yaml: give a run folder written by "
                                    "`slm-dist run`, or a config file")
        path = path / "config.resolved.yaml"
    config = load_config(path, overrides)
    summary = heal.run_heal(config, cache_dir=_cache_dir(), ray_address=os.environ.get("RAY_ADDRESS"),
                            show_progress=_show_progress(args))
    log.info("heal done: loss %s -> %s over %d steps; perplexity %s -> %s; checkpoint in %s, adapter in %s",
             _fmt(summary["first_loss"]), _fmt(summary["last_loss"]), summary["total_steps"],
             _fmt(summary["perplexity_before_heal"]), _fmt(summary["perplexity_healed"]), summary["output_dir"],
             summary["adapter_dir"])
    if args.json:
        sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "history"}) + "\n")
    return EXIT_OK


def _task_args(items: list[str]) -> dict[str, Path]:
    tasks = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--task takes NAME=FILE (e.g. piqa=data/piqa/valid.jsonl), got {item!r}")
        tasks[name] = Path(path)
    return tasks


def _eval_spec(args, config):
    from dataclasses import replace

    from slm_dist.evaluation import EvalSpec

    spec = EvalSpec.from_config(config.eval, [Path(p) for p in args.ppl or []], _task_args(args.task), args.limit,
                                args.seq_len)
    return replace(spec, lambada=Path(args.lambada)) if args.lambada else spec


def cmd_eval(args) -> int:
    from slm_dist import evaluation
    from slm_dist.config import load_config

    path, overrides = _split_args(args.items)
    target = Path(args.target)
    if not target.exists():
        from slm_dist.checkpoint.hub import resolve_model

        target = resolve_model(args.target)  # a Hub repo id (or a clear error)
    if path is None and (target / "config.resolved.yaml").is_file():
        path = target / "config.resolved.yaml"  # a run folder: evaluate with the run's own settings
    config = load_config(path, overrides)
    if args.lm_eval:
        return _lm_eval(args, target, config)
    spec = _eval_spec(args, config)
    from slm_dist import preflight

    preflight.require(preflight.eval_problems(config, evaluation.find_model(target)[0], spec))
    result = evaluation.run_eval(target, config, spec, _show_progress(args))
    for name, value in result["ppl"].items():
        log.info("perplexity %s: %.3f", name, value)
    for name, scores in result["tasks"].items():
        log.info("%s: acc %.4f ± %s, acc_norm %.4f ± %s (n=%d)", name, scores["acc"], _fmt(scores["acc_stderr"], 4),
                 scores["acc_norm"], _fmt(scores["acc_norm_stderr"], 4), scores["n"])
    if result["average"] is not None:
        log.info("average (acc or acc_norm as reported per task): %.4f ± %s", result["average"],
                 _fmt(result["average_stderr"], 4))
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    return EXIT_OK


def _lm_eval(args, target: Path, config) -> int:
    """`eval --lm-eval TASKS`: lm-eval's tasks on the staged model (config's backend and stages)."""
    from slm_dist import lm_eval_adapter

    if args.ppl or args.task:
        raise SystemExit("slm-dist eval: --lm-eval runs lm-eval tasks alone; run --ppl / --task separately")
    result = lm_eval_adapter.run_lm_eval(target, config, lm_eval_adapter.parse_tasks(args.lm_eval), args.limit,
                                         Path(args.lm_eval_include) if args.lm_eval_include else None,
                                         _show_progress(args))
    for task, metrics in result["results"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        for key, value in shown.items():
            se = metrics.get(key.replace(",", "_stderr,", 1))
            log.info("lm-eval %s %s: %.4f%s", task, key, value, f" ± {se:.4f}" if isinstance(se, float) else "")
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    return EXIT_OK


def cmd_compare(args) -> int:
    from slm_dist import compare, context
    from slm_dist.checkpoint.index import layers_for_ratio, open_index
    from slm_dist.config import load_config

    path, overrides = _split_args(args.items)
    config = load_config(path, overrides)
    removed = args.removed
    if not removed:
        p = config.plan
        if p.target_layers_removed is not None:
            removed = [p.target_layers_removed]
        elif p.target_ratio is not None:
            ctx = context.resolve_inputs(config, _cache_dir(), _show_progress(args))
            index = open_index(ctx.model_dir, allow_pickle=config.model.allow_pickle)
            removed = [layers_for_ratio(index, p.target_ratio, p.protect_first, p.protect_last, p.max_window)]
        else:
            raise UsageError("compare: the config plans by threshold; give the layer counts with --removed N")
    methods = args.methods.split(",") if args.methods else compare.METHODS
    result = compare.compare(config, removed, _eval_spec(args, config), methods, _cache_dir(), args.keep_models,
                             _show_progress(args))
    sys.stdout.write((json.dumps(result) if args.json else compare.format_table(result)) + "\n")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from slm_dist import preflight
    from slm_dist.arch import get_arch
    from slm_dist.checkpoint.hub import resolve_model
    from slm_dist.checkpoint.index import layer_params

    index, problems = preflight.model_problems(resolve_model(args.model), allow_pickle=args.allow_pickle)
    preflight.require(problems)
    arch = get_arch(index.model_type)
    total, per_layer = layer_params(index)
    info = {
        "model_type": index.model_type,
        "num_layers": index.num_layers,
        "hidden_size": index.config.get("hidden_size"),
        "params": total,
        "params_per_layer": per_layer,
        "bytes": index.total_bytes,
        "shards": list(index.files),
        "format": index.format,
        "layer_prefix": arch.layer_prefix,
    }
    sys.stdout.write(json.dumps(info, indent=2) + "\n")
    return EXIT_OK


def cmd_verify(args) -> int:
    from slm_dist.checkpoint.index import CheckpointError
    from slm_dist.checkpoint.verify import verify_model

    if not Path(args.model).is_dir():
        raise CheckpointError(f"{args.model} is not a folder: give the checkpoint folder to verify")
    problems = verify_model(Path(args.model))
    if args.json:
        sys.stdout.write(json.dumps({"model": args.model, "ok": not problems, "problems": problems}) + "\n")
    if problems:
        for p in problems:
            log.error("%s", p)
        return EXIT_FAILURE
    log.info("%s: manifest hashes, index and config are consistent", args.model)
    return EXIT_OK


def cmd_push(args) -> int:
    from slm_dist.checkpoint.hub import push_folder
    from slm_dist.evaluation import find_model

    model_dir, _ = find_model(Path(args.target))
    url = push_folder(model_dir, args.repo_id, private=args.private or None)
    log.info("pushed %s to %s", model_dir, url)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm-dist", description="Depth-prune LLMs with Sliding Layer Merging")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line (for schedulers)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (bug reports)")
    parser.add_argument("--version", action="version", version=f"slm-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="calibrate -> plan -> merge -> verify -> eval (no arguments: the demo)")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.add_argument("--force", action="store_true", help="ignore the run folder's state.json and redo every stage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="calibrate (or reuse the cached statistics) and write plan.json; with "
                                    "--dry-run: partition, memory, GPUs, bytes, disk and time from config.json alone")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--dry-run", action="store_true", help="estimate only: read config.json and the index, no weights")
    p.add_argument("--assume", action="append", metavar="NAME=NUMBER",
                   help="--dry-run: a measured throughput for the time estimate, e.g. stage_tokens_per_s=900 or "
                        "read_bytes_per_s=5e8 (repeatable; the output lists every figure it assumed)")
    p.add_argument("--json", action="store_true", help="print the plan (or the dry-run estimate) as one JSON line")
    p.add_argument("--force", action="store_true", help="ignore the run folder's state.json and recalibrate")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="rebuild report.md, report.json and the figures from a run folder")
    p.add_argument("run", help="the run folder (run.dir)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("merge", help="the merge stage alone: write the pruned checkpoint from <run.dir>/plan.json "
                                     "(resumes after a kill)")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--json", action="store_true", help="print the merge summary as one JSON line")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("heal", help="LoRA recovery training of a pruned checkpoint (DeepSpeed on Ray Train), "
                                    "then merge and save; resumes after a kill")
    p.add_argument("items", nargs="*", metavar="CONFIG|RUN|key=value")
    p.add_argument("--json", action="store_true", help="print the heal summary as one JSON line")
    p.set_defaults(func=cmd_heal)

    def eval_flags(p) -> None:
        p.add_argument("--ppl", action="append", metavar="FILE", help="perplexity text (repeatable)")
        p.add_argument("--task", action="append", metavar="NAME=FILE", help="zero-shot task file (repeatable)")
        p.add_argument("--limit", type=int, help="first N items of each task")
        p.add_argument("--lambada", metavar="FILE", help="LAMBADA jsonl: last-word accuracy (first --limit texts)")
        p.add_argument("--seq-len", type=int, help="perplexity window length (tokens)")
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model folder or a run's pruned model")
    p.add_argument("target", metavar="MODEL|RUN")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    eval_flags(p)
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness log-likelihood tasks, "
                                                       "scored through the stages (needs the [eval] extra)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="prune with every baseline and SLM variant at the same layer count; one table")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--removed", action="append", type=int, metavar="N", help="layers to remove (repeatable)")
    p.add_argument("--methods", help="comma-separated subset of: " + ", ".join(COMPARE_METHODS))
    p.add_argument("--keep-models", action="store_true", help="keep every pruned checkpoint under <run.dir>/compare")
    eval_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("inspect", help="layers, parameters, shards and architecture of a model folder")
    p.add_argument("model")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check manifest hashes, index completeness and config consistency")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help='print {"model", "ok", "problems"} as one JSON line')
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("push", help="upload a verified model folder (or a run's pruned model) to a Hub model repo, "
                                    "without slm-dist's lock and marker files")
    p.add_argument("target", metavar="MODEL|RUN")
    p.add_argument("repo_id", metavar="REPO_ID", help="e.g. your-name/SmolLM2-135M-slm")
    p.add_argument("--private", action="store_true", help="create the repo private (when it does not exist yet)")
    p.set_defaults(func=cmd_push)
    return parser


def setup_logging(verbose: bool, quiet: bool, as_json: bool) -> None:
    # Replace only our own handler (a re-run in one process, tests): keep handlers others installed.
    logs.install(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, as_json)
    logging.getLogger().setLevel(logging.WARNING)


class _SigintSeen:
    """Whether Ctrl-C arrived during the command. Ctrl-C reaches the whole foreground process group:
    Ray's workers may die of it first, and the error the driver then sees is theirs, not a
    KeyboardInterrupt; the exit is still an interruption (130), not a failure."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def install(self):
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # Started immune to Ctrl-C (nohup, a script's background job, a scheduler): stay immune, as
            # Python itself does; otherwise a Ctrl-C meant for the launching shell would stop a scheduled run.
            return None
        try:
            return signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread (a library caller): keep Python's own handling
            return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet, args.log_json)
    sigint = _SigintSeen()
    previous = sigint.install()
    try:
        return args.func(args)
    except _bad_input_errors() as e:
        # Bad input: one line naming the file/key and the fix; the traceback only with --debug.
        log.error("%s", e, exc_info=args.debug)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Every stage writes under temporary names and renames, so the run folder stays resumable.
        log.error("interrupted: rerun the same command to resume")
        return EXIT_INTERRUPTED
    except Exception as e:
        if sigint.seen:
            log.error("interrupted (%s: %s): rerun the same command to resume", type(e).__name__, e,
                      exc_info=args.debug)
            return EXIT_INTERRUPTED
        if args.debug:
            log.exception("slm-dist failed")
        else:
            log.error("slm-dist failed: %s: %s (run again with --debug for the traceback)", type(e).__name__, e)
        return EXIT_FAILURE
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
