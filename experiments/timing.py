"""One job: wall-clock timing of JAX calls (results blocked on, compilation excluded)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np


def block(tree):
  """Waits for every array in ``tree`` (timings must not stop at dispatch)."""
  return jax.block_until_ready(tree)


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time in seconds of ``fn()`` (results blocked on) after ``warmup`` calls, which
  absorb compilation."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(max(int(repeats), 1)):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))
