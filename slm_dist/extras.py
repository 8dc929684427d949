"""Optional dependencies, grouped as the pip extras pyproject.toml declares.

``pip install slm-dist`` brings what calibrate, plan, merge, verify and eval need. Healing
(DeepSpeed, peft), the demo's GGUF conversion (gguf) and lm-evaluation-harness tasks (lm-eval) are
extras; a command that needs one checks for it up front, before any expensive work, and says which
extra to install.
"""

from __future__ import annotations

from importlib.util import find_spec

# extra -> the import names it provides (find_spec only: nothing is imported by the check)
EXTRAS: dict[str, tuple[str, ...]] = {
    "heal": ("deepspeed", "peft"),
    "demo": ("gguf",),
    "eval": ("lm_eval",),
}


class MissingExtraError(RuntimeError):
    """A command needs an optional dependency that is not installed; the message says which extra."""


def missing(extra: str) -> list[str]:
    """The import names of ``extra`` that are not installed (empty: the extra is there)."""
    return [name for name in EXTRAS[extra] if find_spec(name) is None]


def require(extra: str, what: str) -> None:
    """Raise `MissingExtraError` when ``extra`` is not installed; ``what`` names the command or feature."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(f"{what} needs the [{extra}] extra ({', '.join(absent)} not installed): "
                                f"pip install 'slm-dist[{extra}]'")
