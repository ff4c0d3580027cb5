"""Per-example losses on logits: cross-entropy, DLR (Croce and Hein, 2020) and the TRADES KL.

Every loss maps logits ``(B, K)`` (and labels ``(B,)`` int) to per-example values ``(B,)``, so
that attacks can sum them and differentiate w.r.t. the input batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def cross_entropy(logits: Array, y: Array) -> Array:
  """``-log softmax(z)_y`` per example. logits ``(B, K)`` float, y ``(B,)`` int -> ``(B,)``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def dlr_loss(logits: Array, y: Array) -> Array:
  """Untargeted Difference of Logits Ratio, to be maximised by the attacker.

  ``DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` where ``z_pi1 >= z_pi2 >=
  ...`` are the sorted logits (Croce and Hein 2020, Eq. 6). Needs ``K >= 3``.
  logits ``(B, K)``, y ``(B,)`` -> ``(B,)``.
  """
  z_sorted = jnp.sort(logits, axis=1)[:, ::-1]
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  others = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  z_other = jnp.max(others, axis=1)
  return -(z_y - z_other) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


def dlr_targeted_loss(logits: Array, y: Array, target: Array) -> Array:
  """Targeted DLR, to be maximised by the attacker (Croce and Hein 2020, Eq. 7).

  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``. Needs ``K >= 4``.
  logits ``(B, K)``, y and target ``(B,)`` int -> ``(B,)``.
  """
  z_sorted = jnp.sort(logits, axis=1)[:, ::-1]
  z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  z_t = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + 1e-12)


def kl_divergence(logits_p: Array, logits_q: Array) -> Array:
  """``KL(softmax(p) || softmax(q))`` per example, the TRADES robustness term (B,)."""
  log_p = jax.nn.log_softmax(logits_p, axis=1)
  log_q = jax.nn.log_softmax(logits_q, axis=1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1)
