"""Threat-model geometry shared by every attack: norm balls, the [0, 1] box, step normalisation.

All functions act per example on batches of shape ``(B, ...)``; norms reduce over every axis
but the first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NORMS = ("linf", "l2")
_TINY = 1e-12


def check_norm(norm: str) -> None:
  """Raises ``ValueError`` unless ``norm`` is ``"linf"`` or ``"l2"``."""
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; use one of {NORMS}")


def bcast(per_example: Array, like: Array) -> Array:
  """Reshapes a per-example ``(B,)`` array to ``(B, 1, ..., 1)`` so it broadcasts against
  ``like`` ``(B, ...)``."""
  return per_example.reshape((-1,) + (1,) * (like.ndim - 1))


def per_example_norm(x: Array, norm: str) -> Array:
  """``||x_i||`` for each example: ``max |x_i|`` (linf) or ``sqrt(sum x_i^2)`` (l2). ``(B,)``."""
  check_norm(norm)
  flat = x.reshape(x.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def project_ball(delta: Array, eps, norm: str) -> Array:
  """Euclidean projection of each ``delta_i`` onto ``{d : ||d|| <= eps}``.

  linf: coordinate-wise clip to ``[-eps, eps]``; l2: ``delta_i * min(1, eps / ||delta_i||_2)``.
  ``eps`` is a scalar or a ``(B,)`` array.
  """
  eps = jnp.asarray(eps, delta.dtype)
  if norm == "linf":
    e = bcast(jnp.broadcast_to(eps, delta.shape[:1]), delta)
    return jnp.clip(delta, -e, e)
  nrm = per_example_norm(delta, norm)
  scale = jnp.minimum(1.0, eps / jnp.maximum(nrm, _TINY))
  return delta * bcast(scale, delta)


def project(x_adv: Array, x: Array, eps, norm: str) -> Array:
  """``Proj``: into the eps-ball around ``x`` and then into the box ``[0, 1]``.

  Clipping to the box after the ball projection never leaves the ball: ``x`` lies in the box, so
  clipping only moves each coordinate of ``x_adv`` towards ``x``'s and shrinks every
  ``|x_adv - x|`` coordinate.
  """
  x_adv = x + project_ball(x_adv - x, eps, norm)
  return jnp.clip(x_adv, 0.0, 1.0)


def normalize_step(g: Array, norm: str) -> Array:
  """Steepest-ascent direction of unit size in the given norm.

  linf: ``sign(g)``; l2: ``g_i / ||g_i||_2`` (zero where ``g_i = 0``).
  """
  check_norm(norm)
  if norm == "linf":
    return jnp.sign(g)
  nrm = per_example_norm(g, "l2")
  return g / bcast(jnp.maximum(nrm, _TINY), g)


def random_start(key: Array, x: Array, eps, norm: str) -> Array:
  """A random point of the eps-ball around ``x``, clipped to ``[0, 1]``.

  linf: uniform in the cube. l2: uniform in the ball (Gaussian direction, radius
  ``eps * u^(1/n)`` with ``n`` the input dimension).
  """
  check_norm(norm)
  eps = jnp.asarray(eps, x.dtype)
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  else:
    k_dir, k_rad = jax.random.split(key)
    direction = normalize_step(jax.random.normal(k_dir, x.shape, x.dtype), "l2")
    n = x[0].size
    radius = eps * jax.random.uniform(k_rad, x.shape[:1], x.dtype) ** (1.0 / n)
    delta = direction * bcast(radius, x)
  return jnp.clip(x + delta, 0.0, 1.0)
