"""Names shared by the pure core and everything above it."""

from __future__ import annotations

# A window of consecutive decoder layers, INCLUSIVE (lo, hi) in the original numbering, as the paper
# writes it; the merged (or kept) layer takes position lo. Half-open ranges are used everywhere else.
Window = tuple[int, int]
