"""The curve downsampler: bounded output, endpoints and extremes kept, exact under the bound,
and the shape of the curve preserved."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from orchestrator.downsample import downsample, lttb_indices


def noisy_loss(n: int, seed: int = 0) -> tuple[list[int], list[float]]:
    rng = random.Random(seed)
    steps = list(range(1, n + 1))
    return steps, [2.5 * math.exp(-s / (n / 4)) + 0.5 + rng.gauss(0, 0.05) for s in steps]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 1000])
def test_a_series_within_the_bound_comes_back_unchanged(n: int) -> None:
    steps, values = noisy_loss(n)
    assert downsample(steps, values, 1000) == (steps, values)


@pytest.mark.parametrize(("n", "bound"), [(1001, 1000), (5000, 1000), (100_000, 1000),
                                          (50, 4), (37, 10)])
def test_a_long_series_is_cut_to_the_bound_keeping_endpoints_and_extremes(n: int,
                                                                          bound: int) -> None:
    steps, values = noisy_loss(n, seed=n)
    # A spike and a dip in the middle, where LTTB's buckets could pass them by.
    values[n // 3], values[n // 2] = 9.0, -3.0
    kept_steps, kept_values = downsample(steps, values, bound)
    assert bound - 2 <= len(kept_steps) <= bound
    assert kept_steps == sorted(set(kept_steps))  # in step order, no point twice
    assert kept_steps[0] == steps[0] and kept_steps[-1] == steps[-1]
    assert max(kept_values) == 9.0 and min(kept_values) == -3.0
    # Every kept point is a real point of the series.
    original = dict(zip(steps, values, strict=True))
    assert all(original[s] == v for s, v in zip(kept_steps, kept_values, strict=True))


def test_lttb_keeps_the_shape_of_a_curve() -> None:
    # A sawtooth: LTTB must keep every corner when it has room for them.
    x = np.arange(1000, dtype=np.float64)
    y = np.where((x // 100) % 2 == 0, x % 100, 100 - x % 100).astype(np.float64)
    kept = lttb_indices(x, y, 200)
    assert len(kept) == 200 and kept[0] == 0 and kept[-1] == 999
    # Each peak and trough (a point at 0 or 100, or its neighbour at 1 or 99) is kept.
    for corner in range(100, 1000, 100):
        assert {corner - 1, corner, corner + 1} & set(kept.tolist()), corner
    # The largest gap between kept points stays near the even spacing (no bucket skipped).
    assert np.diff(kept).max() <= 2 * 1000 / 200


def test_floats_as_steps_and_the_smallest_bound() -> None:
    steps = [i * 0.5 for i in range(100)]
    values = [math.sin(s) for s in steps]
    kept_steps, _ = downsample(steps, values, 4)
    assert 2 <= len(kept_steps) <= 4 and kept_steps[0] == 0.0 and kept_steps[-1] == 49.5


@pytest.mark.parametrize(("steps", "values", "bound", "message"), [
    ([1, 2], [1.0, 2.0], 3, "at least 4"),
    ([1, 2, 3], [1.0, 2.0], 10, "differ in length"),
])
def test_bad_arguments_are_refused(steps: list[int], values: list[float], bound: int,
                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        downsample(steps, values, bound)
