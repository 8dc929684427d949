"""Log formatting shared by the driver (set up by the command line) and the Ray stage actors.

The command line chooses text or one JSON object per line (``--log-json``) and the level once; a
stage actor runs in another process, where our logger has no handler, so the backend hands it
the same two choices (`current`) and the actor installs the same handler on its stderr, which
Ray forwards to the driver and the job log, prefixed with the actor's repr.
"""

from __future__ import annotations

import json
import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ROOT = "slm_dist"   # the logger every module's logging.getLogger(__name__) hangs under


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        # log.exception(...) and exc_info=True: the traceback goes in the same object, not lost.
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line)


def make_handler(as_json: bool) -> logging.Handler:
    """A stderr handler in our format, marked as ours (so a second setup replaces it, not adds one)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(TEXT_FORMAT))
    handler._slm_dist = True  # type: ignore[attr-defined]
    return handler


def install(level: int, as_json: bool) -> None:
    """Our handler on the root logger (replacing an earlier one of ours, keeping others') and our level."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_slm_dist", False)] + [make_handler(as_json)]
    logging.getLogger(ROOT).setLevel(level)


def current() -> tuple[int, bool]:
    """(level, as_json) of this process's slm_dist logging, for a worker process to copy."""
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_slm_dist", False)]
    return logging.getLogger(ROOT).getEffectiveLevel(), bool(ours) and isinstance(ours[-1].formatter, JsonFormatter)


def setup_worker(level: int, as_json: bool) -> None:
    """In an actor or task process: our records at ``level`` reach its stderr (and so the job log).

    Other libraries' loggers are left as Ray configured them.
    """
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_slm_dist", False)] + [make_handler(as_json)]
    logger.propagate = False  # a root handler Ray's LoggingConfig may add would print each line twice
