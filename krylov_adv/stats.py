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
  counts as robust only if no attack fooled it).

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
