"""The correction fit's fixed sizes, torch-free so that the dry run can count its memory without
loading torch (correction_fit.py uses them; dryrun.py models them)."""

# Ridge strengths, relative to the mean eigenvalue of m^T m (trace / hidden): scale-free.
RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
FOLDS = 4  # cross-validation folds over calibration batches (fewer when there are fewer batches)
# Rows go to float64 in chunks of this many: a 70B batch (16k tokens x 28672) would be 3.7 GB at once.
ROW_CHUNK = 2048
GRAM_COPIES = 2   # the training set's statistics and its Cholesky factor (d_in^2 float64 each)
CROSS_COPIES = 3  # the training set's m^T r, the right-hand side (solved in place into X), the prior
