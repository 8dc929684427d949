"""`slm-dist` command line. The only place that reads argv and environment variables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("slm_dist")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
CACHE_ENV = "SLM_DIST_CACHE"


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from slm_dist.arch import UnsupportedArchitectureError
    from slm_dist.calibration import CalibrationDataError
    from slm_dist.checkpoint.index import CheckpointError
    from slm_dist.config import ConfigError
    from slm_dist.export import ExportError
    from slm_dist.merge import MergeError
    from slm_dist.partition import PartitionError
    from slm_dist.planner import PlanError

    return (ConfigError, CheckpointError, CalibrationDataError, UnsupportedArchitectureError, PlanError, ExportError,
            MergeError, PartitionError, FileNotFoundError)


def _split_args(items: list[str]) -> tuple[Path | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the first item without '=' is the config file."""
    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = Path(item)
        else:
            raise SystemExit(f"slm-dist: unexpected argument {item!r}: give one CONFIG and key=value overrides")
    return config, overrides


def _cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else None


def cmd_run(args) -> int:
    from slm_dist import pipeline
    from slm_dist.config import load_config

    path, overrides = _split_args(args.items)
    if path is None and not overrides:
        log.info("no config given: pruning the SmolLM2-135M demo (configs/default.yaml defaults)")
    config = load_config(path, overrides)
    report = pipeline.run(config, cache_dir=_cache_dir(), show_progress=not args.quiet)
    log.info("done: %d -> %d layers, perplexity %s -> %s; checkpoint in %s", report["layers_before"],
             report["layers_after"], _fmt(report["perplexity_before"]), _fmt(report["perplexity_after"]),
             report["output"])
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    return EXIT_OK


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def cmd_inspect(args) -> int:
    from slm_dist.arch import get_arch
    from slm_dist.checkpoint.index import open_index
    from slm_dist.pipeline import layer_params

    index = open_index(Path(args.model), allow_pickle=args.allow_pickle)
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
    from slm_dist.verify import verify_model

    problems = verify_model(Path(args.model))
    if problems:
        for p in problems:
            log.error("%s", p)
        return EXIT_FAILURE
    log.info("%s: manifest hashes, index and config are consistent", args.model)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm-dist", description="Depth-prune LLMs with Sliding Layer Merging")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line (for schedulers)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="calibrate -> plan -> merge -> verify -> eval (no arguments: the demo)")
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="layers, parameters, shards and architecture of a model folder")
    p.add_argument("model")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check manifest hashes, index completeness and config consistency")
    p.add_argument("model")
    p.set_defaults(func=cmd_verify)
    return parser


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                           "message": record.getMessage()})


def setup_logging(verbose: bool, quiet: bool, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._slm_dist = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Replace only our own handler (a re-run in one process, tests): keep handlers others installed.
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_slm_dist", False)] + [handler]
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root.setLevel(logging.WARNING)
    logging.getLogger("slm_dist").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet, args.log_json)
    if getattr(args, "command", None) == "run" and not hasattr(args, "json"):
        args.json = False
    try:
        return args.func(args)
    except _bad_input_errors() as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILURE
    except Exception:
        log.exception("slm-dist failed")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
