"""Every progress bar slm-dist draws, behind one switch.

The command line decides once whether bars are wanted (a terminal-like stderr: not under
``--quiet`` or ``--log-json``, where a bar's carriage returns would break the one-JSON-object-per-line
log) and every stage passes that ``show`` flag down to here. Bars are drawn on the driver only,
never in actors or training workers.
"""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


class _NoBar:
    """What a switched-off bar is: the calls a stage makes on a bar, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(show: bool, total: int | None, desc: str, unit: str = "it", initial: int = 0):
    """A tqdm bar on stderr when ``show``, else a bar that draws nothing (same methods)."""
    if not show:
        return _NoBar()
    from tqdm import tqdm  # only when a bar is drawn

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)


def wrap(items: Iterable[T], show: bool, desc: str, unit: str = "it") -> Iterable[T]:
    """``items``, advancing a bar as they are consumed when ``show``."""
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit, dynamic_ncols=True)
