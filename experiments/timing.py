"""One job: wall-clock timing of JAX calls (results blocked on, compilation excluded)."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np


class Timing(NamedTuple):
  """Wall times in seconds of ``repeats`` timed calls: their median and the spread (min, max)."""
  median: float
  min: float
  max: float
  repeats: int

  def as_dict(self) -> dict:
    return self._asdict()


def block(tree):
  """Waits for every array in ``tree`` (timings must not stop at dispatch)."""
  return jax.block_until_ready(tree)


def measure(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> tuple[Timing, Any]:
  """Times ``fn()`` (results blocked on) ``repeats`` times after ``warmup`` calls, which absorb
  compilation. Returns ``(Timing, the last call's result)``, so that a measured call can also be
  the one whose output is used."""
  out = None
  for _ in range(warmup):
    out = block(fn())
  times = []
  for _ in range(max(int(repeats), 1)):
    start = time.perf_counter()
    out = block(fn())
    times.append(time.perf_counter() - start)
  return Timing(float(np.median(times)), float(np.min(times)), float(np.max(times)),
                len(times)), out


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time in seconds of ``fn()`` (see :func:`measure`)."""
  return measure(fn, repeats=repeats, warmup=warmup)[0].median
