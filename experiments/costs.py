"""One job: what an attack costs, in gradient-equivalents per example.

One input gradient of the loss counts 1. An exact HVP (``jax.jvp`` over ``jax.grad``) counts
``hvp_cost`` gradients: ONE number per model, the wall-time ratio :func:`measure_hvp_cost`
measures on it (``experiments.table`` stores it in the workdir's ``hvp_cost.json`` with the
machine, batch and load average it was measured under, and every cost of that table uses it).
No document states a fixed ratio: it depends on the model, the batch and the platform (it has
ranged from about 1.2 to 1.9 on this project's CPU models). A finite-difference product counts
one gradient (forward) or two (central). What is counted by construction
(:func:`attack_cost_counts`: gradients and products) does not depend on the machine; only the
conversion of products into gradients does.

SOAE's cost comes from its diagnostics (``attacks.soae_with_report``): GMRES runs on a whole
batch until every example has converged or hit the cap, so each outer iteration of a batch pays
its *slowest* example's Krylov dimension ``k`` plus one product for the true residual, plus
step 3's ``H g`` for the Newton direction (the trust-region direction starts GMRES at 0), plus
the gradient. Every example of the batch pays the batch's cost.

Used by ``experiments.table`` (the equal-cost column) and ``experiments.soae_direction``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from experiments import timing
from krylov_adv import hvp as hvp_lib
from krylov_adv import losses, parallel

# The ratio used only where nothing was measured (a caller that passes no hvp_cost): the
# configs' placeholder configs.common.HVP_COST. Tables measure theirs (hvp_cost.json).
DOCUMENTED_HVP_COST = 1.4


def product_cost(hvp: str, hvp_cost: float) -> float:
  """Gradient-equivalents of one Hessian-vector product of method ``hvp``
  (``krylov_adv.hvp.HVP_METHODS``): ``hvp_cost`` for the exact products, 1 for the forward
  difference (it reuses the gradient at ``x``), 2 for the central one."""
  if hvp.startswith("exact"):
    return float(hvp_cost)
  return 2.0 if hvp == "fd_central" else 1.0


def soae_batch_cost(diagnostics, hvp_cost: float, *, newton: bool = True,
                    valid: int | None = None, hvp: str = "exact") -> float:
  """Gradient-equivalents per example of one SOAE batch (module docstring).

  Args:
    diagnostics: ``attacks.SOAEDiagnostics`` of the batch; ``num_iters`` is ``(N, B)``.
    hvp_cost: gradient-equivalents of one exact HVP.
    newton: the Newton direction (``direction="newton"``; pays step 3's ``H g``).
    valid: the number of real examples at the front of a padded batch (``None``: all), as in
      ``evaluation.AttackRun.extras``; padding copies are left out of the batch's maximum.
    hvp: the attack's HVP method (:func:`product_cost`).

  Returns:
    ``sum_t (1 + c (max_i k_{t,i} + 1 + newton))`` over the ``N`` outer iterations, ``c`` the
    cost of one product.
  """
  gradients, products = soae_batch_counts(diagnostics, newton=newton, valid=valid)
  return float(gradients + product_cost(hvp, hvp_cost) * products)


def soae_batch_counts(diagnostics, *, newton: bool = True, valid: int | None = None
                      ) -> tuple[int, int]:
  """``(gradients, products)`` per example of one SOAE batch, counted by construction from its
  diagnostics (no timing): ``N`` gradients and ``sum_t (max_i k_{t,i} + 1 + newton)``
  Hessian-vector products over the ``N`` outer iterations (arguments as
  :func:`soae_batch_cost`)."""
  k = np.asarray(parallel.to_host(diagnostics.num_iters))
  if valid is not None:
    k = k[:, :int(valid)]
  k_max = k.max(axis=1)                                   # (N,) the batch's slowest example
  products = k_max + 1 + (1 if newton else 0)
  return int(k.shape[0]), int(np.sum(products))


def attack_cost_counts(entry: Mapping[str, Any], extras=()) -> dict[str, Any] | None:
  """What one evaluation-suite entry costs per example, counted by construction (independent of
  the machine and its load): ``{"gradients", "products", "hvp"}``, input gradients and
  Hessian-vector products (of method ``hvp``, :func:`product_cost` converts them), SOAE's
  products the mean over batches of :func:`soae_batch_counts` (so a float), with
  ``krylov_dim_mean`` / ``krylov_dim_max`` over its solves. ``None`` where the count is not
  fixed (AutoAttack) or SOAE has no reports."""
  name = entry["name"]
  if name == "soae":
    if not extras:
      return None
    newton = entry.get("direction", "newton") == "newton"
    counts = [soae_batch_counts(report, newton=newton, valid=valid) for report, valid in extras]
    dims = np.concatenate([np.asarray(parallel.to_host(report.num_iters))[:, :int(valid)]
                           .reshape(-1) for report, valid in extras])
    return dict(gradients=float(np.mean([g for g, _ in counts])),
                products=float(np.mean([p for _, p in counts])), hvp=entry.get("hvp", "exact"),
                krylov_dim_mean=float(dims.mean()), krylov_dim_max=int(dims.max()))
  grads = attack_cost(entry, extras)
  return None if grads is None else dict(gradients=grads, products=0, hvp=None)


def attack_cost(entry: Mapping[str, Any], extras=(), hvp_cost: float = DOCUMENTED_HVP_COST
                ) -> float | None:
  """Gradient-equivalents per example of one evaluation-suite entry (``{name, hyperparameters}``
  as in ``config.eval.table``), ``None`` where it is not a fixed count (AutoAttack: its
  components stop on points already fooled; its wall time is the measure).

  clean 0; FGSM 1; PGD ``steps``; S-O ``steps * samples`` (expectation form; the power form
  takes one gradient per step); SOAE the mean over batches of :func:`soae_batch_cost` from the
  ``(report, valid)`` pairs in ``extras`` (``None`` without them).
  """
  name = entry["name"]
  if name == "clean":
    return 0.0
  if name == "fgsm":
    return 1.0
  if name == "pgd":
    return float(entry.get("steps", 20))
  if name == "second_order":
    samples = 1 if entry.get("form", "expectation") == "power" else entry.get("samples", 8)
    return float(entry.get("steps", 20) * samples)
  if name == "soae":
    if not extras:
      return None
    newton = entry.get("direction", "newton") == "newton"
    hvp = entry.get("hvp", "exact")
    return float(np.mean([soae_batch_cost(report, hvp_cost, newton=newton, valid=valid,
                                          hvp=hvp) for report, valid in extras]))
  return None


def measure_hvp_cost(logits_fn, x, y, *, repeats: int = 5) -> dict[str, float]:
  """The wall-time ratio of one exact HVP to one input gradient of the cross-entropy at ``x``
  (``(B, H, W, C)`` float32, labels ``y (B,)``), both jitted and timed with
  ``experiments.timing.measure`` (compilation excluded, median of ``repeats``).

  Returns ``{"hvp_cost", "gradient_seconds", "hvp_seconds", "batch"}``.
  """
  x = jax.numpy.asarray(x)
  y = jax.numpy.asarray(y)

  def loss_fn(z):
    return losses.cross_entropy(logits_fn(z), y)

  grad = jax.jit(lambda z: hvp_lib.input_grad(loss_fn, z))
  prod = jax.jit(lambda z, v: hvp_lib.exact_hvp(loss_fn, z, v))
  v = jax.random.normal(jax.random.PRNGKey(0), x.shape, x.dtype)
  t_grad, _ = timing.measure(lambda: grad(x), repeats=repeats)
  t_hvp, _ = timing.measure(lambda: prod(x, v), repeats=repeats)
  return dict(hvp_cost=t_hvp.median / t_grad.median, gradient_seconds=t_grad.median,
              hvp_seconds=t_hvp.median, batch=int(x.shape[0]))


def soat_gradient_equivalents(soat: Mapping[str, Any], num_classes: int,
                              hvp_cost: float = DOCUMENTED_HVP_COST) -> float:
  """Gradient-equivalents per example of SOAT's inner attack (one training step), by
  construction.

  Each of the ``steps`` outer iterations pays one gradient and, per batch, the slowest
  example's Krylov dimension ``k`` plus one product for the true residual, plus step 3's
  ``H g`` for the Newton direction (the trust-region direction starts GMRES at 0). ``k`` is the
  cap ``m`` for a finite-difference HVP (the solve runs to the cap on rounding noise) and
  ``min(m, K - 1)`` for the exact one: ``H = J^T (diag(p) - p p^T) J`` has rank ``<= K - 1``
  (the proposition in krylov_adv/attacks/_soae.py). An exact HVP costs ``hvp_cost``
  gradients (the measured ratio, :func:`measure_hvp_cost`; ``experiments.table`` passes the
  one in its ``hvp_cost.json``), a forward difference one, a central difference two:
  ``steps * (1 + c (k + 1 + newton))``.
  """
  exact = soat["hvp"] == "exact"
  k = min(int(soat["m"]), int(num_classes) - 1) if exact else int(soat["m"])
  newton = soat.get("direction", "newton") == "newton"
  return float(soat["steps"]) * (1.0 + product_cost(soat["hvp"], hvp_cost)
                                 * (k + 1 + int(newton)))
