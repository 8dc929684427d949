"""Shared fixtures: tiny random checkpoints on disk (several shards, layers straddling shards)."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from slm_dist.testing import make_tiny_model, tiny_text


@pytest.fixture(scope="session", autouse=True)
def python_sigint():
    """SIGINT handled as in an interactive Python, however the suite was launched: a script's background
    job starts with SIGINT ignored, the CLI then stays immune (as it should), and the children of the
    interrupt tests would inherit that. Children of a handled SIGINT start with the default."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """6-layer random Llama (hidden 32), float32, 24 KB shards: every layer spans two files."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(tiny_text())
    return path


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below a folder: to prove an input was left untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}
