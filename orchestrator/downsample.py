"""Server-side downsampling of metric curves for charts: Largest-Triangle-Three-Buckets.

A job can log 100,000 values of one metric; a chart a few hundred pixels wide shows no more
than a point or two per pixel, and sending every value would make the page slow to load and
to draw. LTTB (Steinarsson, "Downsampling Time Series for Visual Representation", 2013)
keeps the points that carry the curve's shape: the series is cut into equal buckets and
each bucket keeps the point that makes the largest triangle with the point kept before it
and the average of the next bucket. The first and last points are always kept; so are the
global minimum and maximum (LTTB usually keeps them, but not always, and a loss spike or
the best eval value must never vanish from a chart).

A series within the bound is returned as it is: no point of a short run is ever dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_POINTS = 4  # first, last, minimum, maximum


def lttb_indices(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    """Indices (ascending) of the `n_out` points LTTB keeps of the series (x ascending)."""
    n = len(x)
    if n_out >= n or n <= 2:
        return np.arange(n)
    if n_out < 2:
        raise ValueError(f"LTTB keeps at least the first and last point; asked for {n_out}")
    kept = np.empty(n_out, dtype=np.int64)
    kept[0], kept[-1] = 0, n - 1
    # Buckets cover the points between the first and the last one.
    every = (n - 2) / (n_out - 2) if n_out > 2 else 0.0
    # Prefix sums: any bucket's average in O(1), not a pass over the bucket.
    sum_x = np.concatenate(([0.0], np.cumsum(x)))
    sum_y = np.concatenate(([0.0], np.cumsum(y)))
    previous = 0
    for bucket in range(n_out - 2):
        start = int(bucket * every) + 1
        end = int((bucket + 1) * every) + 1
        next_start, next_end = end, min(int((bucket + 2) * every) + 1, n)
        if next_start >= next_end:  # the last bucket: the next "bucket" is the last point
            next_start, next_end = n - 1, n
        size = next_end - next_start
        avg_x = (sum_x[next_end] - sum_x[next_start]) / size
        avg_y = (sum_y[next_end] - sum_y[next_start]) / size
        px, py = x[previous], y[previous]
        # Twice the triangle's area; the constant factor does not change the argmax.
        area = np.abs((px - avg_x) * (y[start:end] - py) - (px - x[start:end]) * (avg_y - py))
        previous = start + int(np.argmax(area))
        kept[bucket + 1] = previous
    return kept


def downsample(steps: Sequence[float], values: Sequence[float],
               max_points: int) -> tuple[list[int | float], list[float]]:
    """At most `max_points` of the series (steps ascending): all of them when it fits,
    else the LTTB selection plus the extremes, in step order."""
    if max_points < MIN_POINTS:
        raise ValueError(f"max_points must be at least {MIN_POINTS}, got {max_points}")
    if len(steps) != len(values):
        raise ValueError(f"steps and values differ in length ({len(steps)} vs {len(values)})")
    if len(steps) <= max_points:
        return list(steps), list(values)
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    # Two places are kept for the extremes, which LTTB may or may not have picked itself.
    chosen = set(lttb_indices(x, y, max_points - 2).tolist())
    chosen.update((int(np.argmin(y)), int(np.argmax(y))))
    order = sorted(chosen)
    return [steps[i] for i in order], [values[i] for i in order]
