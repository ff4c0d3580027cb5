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


def test_mcnemar_on_hand_made_flags_matches_scipy():
  # 7 points robust under a only, 2 under b only, 11 concordant: p = binomtest(7, 9).
  a = np.array([1] * 7 + [0] * 2 + [1] * 6 + [0] * 5, bool)
  b = np.array([0] * 7 + [1] * 2 + [1] * 6 + [0] * 5, bool)
  got = stats.mcnemar_exact(a, b)
  assert (got["n"], got["only_a"], got["only_b"]) == (20, 7, 2)
  want = scipy_stats.binomtest(7, 9, 0.5).pvalue
  assert got["p_value"] == pytest.approx(want, rel=1e-12)
  assert stats.mcnemar_exact(b, a)["p_value"] == pytest.approx(want, rel=1e-12)


def test_collapse_check_flags_a_constant_model_and_not_a_trained_one():
  import jax.numpy as jnp
  from krylov_adv import evaluation
  y = np.arange(40) % 10
  x = np.random.default_rng(0).random((40, 8, 8, 1)).astype(np.float32)
  # A constant classifier: the same logits whatever the image (class 3 every time).
  constant = lambda z: jnp.zeros((z.shape[0], 10)).at[:, 3].set(1.0) + 0.0 * z.sum()
  pred = evaluation.predictions(constant, x, batch_size=40)
  got = stats.collapse_check(pred, y, 10)
  assert got["collapsed"] and got["distinct_predictions"] == 1
  assert any("constant" in r for r in got["reasons"]) and got["clean_accuracy"] == 0.1
  # Constant on an unbalanced set (accuracy 90%, far above chance) is still collapsed.
  assert stats.collapse_check(np.zeros(10, int), np.array([0] * 9 + [1]), 10)["collapsed"]
  # Near chance without being constant: collapsed by the accuracy rule (1/10 + 5 points).
  near = np.where(np.arange(40) < 6, y, (y + 1) % 10)           # 15% correct
  assert stats.collapse_check(near, y, 10)["collapsed"]
  assert not stats.collapse_check(np.where(np.arange(40) < 7, y, (y + 1) % 10), y, 10)[
      "collapsed"]                                              # 17.5%: above the margin
  good = stats.collapse_check(y, y, 10)
  assert not good["collapsed"] and good["reasons"] == [] and good["clean_accuracy"] == 1.0
