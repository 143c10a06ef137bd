"""Participation ratio, spectral gap and water-filling: known spectra and properties."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veloxcore import (
    VeloxError,
    compute_participation_ratio,
    compute_spectral_gap,
    predicted_distortion,
    water_fill_bits,
)

spectra = st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=2,
                   max_size=64).filter(lambda v: sum(v) > 1e-6)


def test_participation_ratio_known_values():
    assert compute_participation_ratio([1, 1, 1, 1]) == pytest.approx(4.0)
    assert compute_participation_ratio([5, 0, 0, 0]) == pytest.approx(1.0)
    assert compute_participation_ratio([2, 2, 0, 0, 0]) == pytest.approx(2.0)
    # (3+1)^2 / (9+1) = 1.6
    assert compute_participation_ratio([3, 1]) == pytest.approx(1.6)
    assert compute_participation_ratio([0, 0, 0]) == 0.0


@given(spectra, st.floats(min_value=1e-3, max_value=1e3))
def test_participation_ratio_bounds_and_scale_invariance(lam, scale):
    pr = compute_participation_ratio(lam)
    assert 1.0 - 1e-9 <= pr <= len(lam) + 1e-9
    assert compute_participation_ratio(np.array(lam) * scale) == pytest.approx(pr, rel=1e-9)


def test_spectral_gap_known_spectra():
    assert compute_spectral_gap([10, 9, 8, 0.01, 0.01, 0.009]) == 3
    assert compute_spectral_gap([100, 1, 0.9, 0.8]) == 1
    assert compute_spectral_gap([1, 1, 1, 1]) == 1  # flat: ties go to the smallest k
    assert compute_spectral_gap([5, 4, 0, 0, 0, 0]) == 2  # exact zeros are floored, not NaN
    # A steep drop deep in a negligible tail is not the signal boundary.
    assert compute_spectral_gap([100, 50, 1, 0.5, 0.4, 1e-9]) == 2
    assert compute_spectral_gap([0.0, 0.0]) == 1


@given(spectra)
def test_spectral_gap_is_in_range_and_order_free(lam):
    k = compute_spectral_gap(lam)
    assert 1 <= k <= len(lam) - 1
    assert compute_spectral_gap(np.random.default_rng(0).permutation(lam)) == k


def brute_force(lam, budget, lo, hi):
    best = None
    for bits in itertools.product(range(lo, hi + 1), repeat=len(lam)):
        if sum(bits) == budget:
            cost = sum(v * 4.0 ** -b for v, b in zip(lam, bits, strict=True))
            best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=4),
       st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=3),
       st.floats(min_value=0, max_value=1))
def test_water_filling_is_optimal_exact_and_monotone(lam, lo, span, where):
    hi = lo + span
    d = len(lam)
    target = lo + where * (hi - lo)
    bits = water_fill_bits(lam, target, lo, hi)
    assert bits.sum() == round(target * d)
    assert bits.min() >= lo and bits.max() <= hi
    for i, j in itertools.permutations(range(d), 2):
        if lam[i] > lam[j]:
            assert bits[i] >= bits[j]
    cost = sum(v * 4.0 ** -b for v, b in zip(lam, bits, strict=True))
    assert cost == pytest.approx(brute_force(lam, int(bits.sum()), lo, hi), rel=1e-9, abs=1e-12)


@given(spectra, st.floats(min_value=1, max_value=8))
def test_water_filling_spends_exactly_the_budget(lam, target):
    bits = water_fill_bits(lam, target, 1, 8)
    assert bits.sum() == round(target * len(lam))
    order = np.argsort(-np.asarray(lam), kind="stable")
    assert np.all(np.diff(bits[order]) <= 0)  # sorted by eigenvalue, bits never increase


def test_water_filling_infeasible_targets_are_refused():
    with pytest.raises(VeloxError, match="infeasible"):
        water_fill_bits([1.0, 0.5], 9, 1, 8)
    with pytest.raises(VeloxError, match="infeasible"):
        water_fill_bits([1.0, 0.5], 0.5, 1, 8)
    with pytest.raises(VeloxError, match="NaN"):
        water_fill_bits([1.0, float("nan")], 3)


def test_predicted_distortion_falls_with_bits():
    lam = np.array([8.0, 4.0, 1.0, 0.1])
    costs = [predicted_distortion(lam, water_fill_bits(lam, b, 0, 8)) for b in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(costs, costs[1:], strict=False))
    assert predicted_distortion(lam, [0, 0, 0, 0]) == pytest.approx(1.0)
