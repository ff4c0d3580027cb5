"""Statistics a reviewer asks of a robust-accuracy table: intervals and paired tests.

Every attack result is ``n`` Bernoulli outcomes (point ``i`` stayed robust or not), so

* :func:`wilson_interval`: the Wilson score interval of a proportion (Wilson 1927), the
  interval with close to nominal coverage at the sizes of these tables (100-1,000 points, rates
  near 0 or 1 included), unlike the normal ("Wald") interval;
* :func:`mcnemar_exact`: the exact two-sided McNemar test of two attacks (or two models) on the
  same points: only the discordant pairs carry information, and under the null hypothesis of
  equal robust accuracy each is equally likely to go either way, so the p-value is a two-sided
  binomial test of ``only_a`` successes in ``only_a + only_b`` trials at ``1/2``;
* :func:`worst_case`: robust under every attack of a threat model (AutoAttack's rule: a point
  counts as robust only if no attack fooled it);
* :func:`collapse_check`: whether a classifier has collapsed (clean accuracy within
  :data:`COLLAPSE_MARGIN` of chance ``1/K``, or one predicted class for every point), so that a
  table does not report a constant classifier's numbers as robustness.

Pure NumPy (no SciPy at run time); ``tests/test_stats.py`` checks both against SciPy.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

# The standard normal's 97.5% quantile: the two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a proportion ``successes / n``.

  ``(p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)`` with
  ``p = successes / n``; ``z`` defaults to the 95% two-sided quantile. ``(0.0, 1.0)`` for
  ``n = 0`` (nothing measured). Raises ``ValueError`` unless ``0 <= successes <= n``.

  Returns:
    ``(lo, hi)``, floats in ``[0, 1]``.
  """
  if not 0 <= successes <= n:
    raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  denom = 1.0 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def ci95(successes: int, n: int) -> list[float]:
  """:func:`wilson_interval` at 95% as the JSON field ``ci95``: ``[lo, hi]`` in ``[0, 1]``."""
  return list(wilson_interval(int(successes), int(n)))


def _binom_pmf(k: int, n: int) -> float:
  return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                  - n * math.log(2.0))


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> dict:
  """Exact two-sided McNemar test of two paired boolean outcomes on the same points.

  Args:
    a, b: ``(n,)`` bool, e.g. "point ``i`` stayed robust under attack A / B".

  Returns:
    ``{"n", "only_a", "only_b", "p_value"}``: ``only_a`` points where ``a`` holds and ``b`` does
    not, ``only_b`` the reverse, and the two-sided exact binomial p-value of ``only_a`` among
    the ``d = only_a + only_b`` discordant pairs at probability 1/2 (the sum of the
    probabilities of every outcome no more likely than the observed one; 1.0 when ``d = 0``).
  """
  a = np.asarray(a, bool)
  b = np.asarray(b, bool)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired outcomes need two (n,) arrays, got {a.shape} and {b.shape}")
  only_a = int(np.sum(a & ~b))
  only_b = int(np.sum(~a & b))
  d = only_a + only_b
  if d == 0:
    p = 1.0
  else:
    observed = _binom_pmf(only_a, d)
    # Relative tolerance as SciPy's binomtest uses, so ties of equal probability count.
    p = sum(pk for k in range(d + 1)
            if (pk := _binom_pmf(k, d)) <= observed * (1 + 1e-7))
    p = min(1.0, p)
  return dict(n=int(a.size), only_a=only_a, only_b=only_b, p_value=p)


def worst_case(flags: Iterable[np.ndarray]) -> np.ndarray:
  """Per point, robust under every attack: the AND of the ``(n,)`` boolean ``flags``."""
  flags = [np.asarray(f, bool) for f in flags]
  if not flags:
    raise ValueError("worst_case needs at least one attack's flags")
  return np.logical_and.reduce(flags)


# A classifier whose clean accuracy is at most 1/K + COLLAPSE_MARGIN is "collapsed": 5 points
# above chance (10 classes: 15%) is far below any trained model of this project's tables and
# above a constant classifier on a balanced test set (~1/K, e.g. 8.6% on 32 digits).
COLLAPSE_MARGIN = 0.05


def collapse_check(predictions: np.ndarray, labels: np.ndarray, num_classes: int,
                   margin: float = COLLAPSE_MARGIN) -> dict:
  """Whether a classifier has collapsed on a test set.

  Collapsed when ``accuracy <= 1/K + margin`` (within ``margin`` of chance, or below it) or
  when every prediction is the same class (a constant classifier, whatever its accuracy on an
  unbalanced set).

  Args:
    predictions: ``(n,)`` int, the predicted classes on the clean points (``-1`` for a
      non-finite prediction, ``krylov_adv.evaluation.predictions``).
    labels: ``(n,)`` int, the true classes.
    num_classes: ``K``.
    margin: accuracy above chance still counted as collapsed.

  Returns:
    ``{"collapsed": bool, "reasons": [str], "clean_accuracy", "chance": 1/K, "margin",
    "distinct_predictions": int}``.
  """
  predictions = np.asarray(predictions).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
  n = predictions.size
  acc = float(np.mean(predictions == labels)) if n else 0.0
  chance = 1.0 / int(num_classes)
  distinct = int(np.unique(predictions).size)
  reasons = []
  if acc <= chance + margin:
    reasons.append(f"clean accuracy {100 * acc:.1f}% <= chance 1/{int(num_classes)} + "
                   f"{100 * margin:g} points")
  if n > 1 and distinct == 1:
    reasons.append(f"constant predictions (class {int(predictions[0])} for all {n} points)")
  return dict(collapsed=bool(reasons), reasons=reasons, clean_accuracy=acc, chance=chance,
              margin=float(margin), distinct_predictions=distinct)
