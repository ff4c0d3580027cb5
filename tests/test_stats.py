"""krylov_adv.stats against SciPy: Wilson intervals and the exact McNemar test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from krylov_adv import stats


@pytest.mark.parametrize("k,n", [(49, 100), (0, 100), (100, 100), (1, 7), (517, 1000),
                                 (3, 1000)])
def test_wilson_interval_matches_scipy(k, n):
  want = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
  got = stats.wilson_interval(k, n)
  np.testing.assert_allclose(got, (want.low, want.high), rtol=0, atol=1e-9)


def test_wilson_interval_of_the_issue_example():
  lo, hi = stats.wilson_interval(49, 100)
  assert (round(100 * lo, 1), round(100 * hi, 1)) == (39.4, 58.7)


def test_wilson_interval_rejects_impossible_counts():
  with pytest.raises(ValueError):
    stats.wilson_interval(5, 4)
  assert stats.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_scipy_binomtest_on_discordant_pairs(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(20, 300))
  a = rng.random(n) < 0.5
  b = np.where(rng.random(n) < 0.8, a, rng.random(n) < rng.uniform(0.1, 0.9))
  got = stats.mcnemar_exact(a, b)
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  assert (got["only_a"], got["only_b"], got["n"]) == (only_a, only_b, n)
  want = scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
  assert got["p_value"] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_mcnemar_hand_made_flags():
  # 10 discordant pairs, all one way: p = 2 / 2^10.
  a = np.array([True] * 10 + [True] * 5 + [False] * 5)
  b = np.array([False] * 10 + [True] * 5 + [False] * 5)
  got = stats.mcnemar_exact(a, b)
  assert (got["only_a"], got["only_b"]) == (10, 0)
  assert got["p_value"] == pytest.approx(2 / 1024, rel=1e-12)
  assert stats.mcnemar_exact(a, a)["p_value"] == 1.0
  with pytest.raises(ValueError):
    stats.mcnemar_exact(a, b[:-1])


def test_worst_case_is_the_and_of_flags():
  f1 = np.array([1, 1, 0, 1], bool)
  f2 = np.array([1, 0, 1, 1], bool)
  f3 = np.array([1, 1, 1, 0], bool)
  np.testing.assert_array_equal(stats.worst_case([f1, f2, f3]), [True, False, False, False])
  with pytest.raises(ValueError):
    stats.worst_case([])
