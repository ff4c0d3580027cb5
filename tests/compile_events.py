"""Counting XLA compilations in tests (``tests/test_eval_compiles.py``,
``tests/test_models_are_data.py``): a ``jax.monitoring`` listener on the backend-compile event
(one per XLA compilation, what ``JAX_LOG_COMPILES=1`` logs), as ``benchmarks/bench_eval_path.py``
counts them."""

from __future__ import annotations

import collections
import contextlib

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
# Lowering to MLIR precedes every compilation, a persistent-cache hit included (the cache is keyed
# by the lowered module); jax.eval_shape lowers nothing.
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def count_compilations(*, lowerings: bool = False):
  """Yields a Counter ``{function name: XLA compilations}`` (``jit(f)`` counted as ``f``) filled
  while the block runs; with ``lowerings``, lowerings to MLIR count too, so that a function
  compiled again counts even where JAX's persistent cache reads the executable back."""
  counts = collections.Counter()
  events = (BACKEND_COMPILE, LOWER) if lowerings else (BACKEND_COMPILE,)

  def listen(event, duration, **kwargs):
    del duration
    if event in events:
      name = str(kwargs.get("fun_name", "?"))
      counts[name[4:-1] if name.startswith("jit(") else name] += 1

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
