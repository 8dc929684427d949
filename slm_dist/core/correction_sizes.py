"""The correction fit's names and fixed sizes, torch-free: the dry run counts its memory and the
export checks a corrections file without loading torch (correction_fit.py uses them; dryrun.py
models them)."""

# Ridge strengths, relative to the mean eigenvalue of m^T m (trace / hidden): scale-free.
RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
FOLDS = 4  # cross-validation folds over calibration batches (fewer when there are fewer batches)
# Rows go to float64 in chunks of this many: a 70B batch (16k tokens x 28672) would be 3.7 GB at once.
ROW_CHUNK = 2048
GRAM_COPIES = 2   # the training set's statistics and its Cholesky factor (d_in^2 float64 each)
CROSS_COPIES = 3  # the training set's m^T r, the right-hand side (solved in place into X), the prior
# merge.correction=pool's selection (core/neuron_pool.obs_select): the pool's normal equations, the copy
# of the features still alive and its Cholesky factor, or the factor and its inverse ((pool)^2 float64 each).
POOL_GRAM_COPIES = 3
CHUNKS = 16  # pool's OBS removes the surplus neurons in this many steps (each re-solves the ridge problem)

WEIGHTS = ("relative", "none")  # merge.correction_weight values
KINDS = ("linear", "refit", "pool")  # merge.correction values that fit something (and the corrections file's kinds)
# Maps fitted by `compare`'s ReplaceMe baseline (core/replaceme.py): hidden x hidden, folded as ``linear``.
BASELINE_KINDS = ("replaceme_lstsq", "replaceme_cosine")


class CorrectionError(ValueError):
    """The correction fit got unusable inputs (too few batches, mismatched shapes, a non-finite fit)."""


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise CorrectionError(f"unknown correction kind {kind!r}; known: {list(KINDS)}")


def check_fit_kind(kind: str) -> None:
    """A kind a stage can fit: the config's, or a baseline's (``BASELINE_KINDS``)."""
    if kind not in KINDS + BASELINE_KINDS:
        raise CorrectionError(f"unknown correction kind {kind!r}; known: {list(KINDS + BASELINE_KINDS)}")


def check_weight(weight: str) -> None:
    if weight not in WEIGHTS:
        raise CorrectionError(f"unknown correction weighting {weight!r}; known: {list(WEIGHTS)}")


def screen_share(pool: int, width: int, cap: int | None) -> int | None:
    """Neurons each non-host layer keeps in ``pool_cap``'s screen, for a pool of ``pool`` candidates in
    blocks of ``width`` (the merged layer's own first); None when the whole pool is within the cap."""
    if pool % width or pool < width:
        raise CorrectionError(f"a pool of {pool} neurons is not whole layers of width {width}")
    others = pool // width - 1
    if cap is None or others == 0 or cap >= others + 1:
        return None
    if cap < 2:
        raise CorrectionError(f"merge.pool_cap must be at least 2 (the merged layer's own neurons and others'), "
                              f"got {cap}; use merge.correction=refit to keep its own neurons only")
    return max(1, (cap - 1) * width // others)
