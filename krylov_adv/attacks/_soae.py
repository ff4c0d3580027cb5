"""SOAE: the Krylov-Newton second-order adversarial example (SOAE paper, Sec. III, Algorithm 1).

For ``n = 1..N`` (``N = steps``):

1. ``g = grad L(x_n)`` (step 2);
2. solve the Newton system ``H d = g`` (Eq. 5, ``H`` the input Hessian of the loss at ``x_n``)
   by GMRES from ``d_0 = g`` (steps 2-17): ``r_0 = g - H g`` (step 3-4), Arnoldi on
   ``K_j(H, r_0)`` until ``||r_j|| <= tau ||r_0||`` or ``j = m`` (step 12), ``d = d_0 + V_j y``;
   ``H v`` by the exact product or the forward/central difference of Eq. (22)
   (:func:`krylov_adv.hvp.make_hvp`);
3. ``x_{n+1} = Proj(x_n + (alpha / N) * step(d))`` (step 18), ``Proj`` the eps-ball then the box.

``step`` is either the paper's literal raw direction (``step="raw"``: ``alpha / N * d``; its
length is whatever ``H^{-1} g`` is, unrelated to eps) or, the default, the normalised step of
the threat model (``step="normalized"``: ``sign(d)`` for Linf, ``d / ||d||_2`` for L2), which
makes ``alpha`` a distance in the threat model's norm like PGD's step size.

Indefinite Hessians. Eq. (5) takes ``d = H^{-1} g`` as the ascent direction (the stationary
point of the quadratic model ``Q`` of Eq. 3 is in fact ``-H^{-1} g``; we follow the paper's
sign, as Algorithm 1 does). ``d`` is an ascent direction only where
``<g, d> = g^T H^{-1} g > 0`` (e.g. ``H`` positive definite); where ``H`` has negative curvature
along ``g`` it can point downhill, so with ``fallback=True`` (default) an example whose
``<g, d> <= 0`` (or whose ``d`` is not finite) takes the gradient ``g`` instead; how often this
happened is reported in :class:`SOAEDiagnostics`.

Cost per outer iteration: one gradient (returned by ``make_hvp``) plus one Hessian-vector
product for ``r_0 = g - H g`` (step 3) plus one per Krylov step (step 6) plus one for the true
residual ``||g - H d||`` that :func:`krylov_adv.krylov.gmres` recomputes at exit (its ``status``
and ``converged`` are decided on it, not on the Givens estimate), i.e.
``1 gradient + (m + 2) HVPs`` when GMRES runs to ``m``. The paper's complexity estimate Eq. (25),
``O(l2^2 + m l2^2 + ...)``, counts ``1 + m`` passes because it books step 3 as ``O(l1)``; its own
step 3 is a gradient evaluation (Eq. 22), so Algorithm 1 as written costs ``1 + (m + 1)``
gradient-sized passes with the forward difference, and ours one more for the residual check.
The loop stops a whole batch only when its last example stops, so a batch pays for its largest
Krylov dimension. On top of the products,
GMRES's own work (Arnoldi, Givens, back substitution) is negligible on a CPU but not on a GPU
for a model as small as the MNIST CNN: there ``orthogonalization="cgs2"`` is several times
cheaper than ``"mgs"`` (``benchmarks/bench_soae.py`` measures both), and the default ``"auto"``
picks it on accelerators.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from krylov_adv import hvp as hvp_lib
from krylov_adv import krylov, projections
from krylov_adv.attacks import checks, register, toolkit
from krylov_adv.attacks.toolkit import Array, LogitsFn, LossFn

STEPS = ("normalized", "raw")
ORTHOGONALIZATIONS = ("auto", "mgs", "cgs2")

# The one default of each SOAE hyperparameter, used by soae, soae_with_report and soae_direction
# (the paper's Sec. IV-D where it gives values; see soae's docstring).
DEFAULT_STEPS = 4
DEFAULT_M = 15
DEFAULT_TAU = 1e-3
DEFAULT_HVP = hvp_lib.DEFAULT_METHOD  # defined once, in krylov_adv.hvp
DEFAULT_ETA = hvp_lib.DEFAULT_ETA


class SOAEDirection(NamedTuple):
  """The Newton direction of one SOAE iteration (Algorithm 1 steps 2-17) at a batch ``x``.

  Attributes:
    direction: ``(B, ...)`` GMRES's approximation of ``d_i = H_i^{-1} g_i``.
    grad: ``(B, ...)`` ``g_i = grad L(x_i)``.
    gmres: the :class:`krylov_adv.krylov.GMRESResult` (``num_iters`` is the Krylov dimension
      reached per example, ``residual_norm / initial_residual_norm`` the relative residual).
  """
  direction: Array
  grad: Array
  gmres: krylov.GMRESResult


class SOAEDiagnostics(NamedTuple):
  """Per-example statistics of an SOAE run with ``N`` outer iterations and batch ``B``.

  Attributes:
    num_iters: ``(N, B)`` int32, Krylov dimension reached at each outer iteration (HVPs spent
      on the example after the one for ``r_0``).
    residual_norm: ``(N, B)`` final ``||g - H d||_2`` of each solve.
    initial_residual_norm: ``(N, B)`` ``||r_0|| = ||g - H g||_2`` (the paper's ``beta``).
    converged: ``(N, B)`` bool, ``residual_norm <= tau * initial_residual_norm``.
    status: ``(N, B)`` int32 :class:`krylov_adv.krylov.Status` code of each solve
      (``CONVERGED`` exactly where ``converged``; else ``MAX_DIM_REACHED``, ``BREAKDOWN`` or
      ``NONFINITE``).
    fallback: ``(N, B)`` bool, the gradient replaced the Newton direction (``<g, d> <= 0`` with
      ``fallback=True``, or ``d`` not finite).
    num_iters_total: ``(B,)`` int32, ``num_iters`` summed over the outer iterations.
    fallback_count: ``(B,)`` int32, ``fallback`` summed over the outer iterations.
  """
  num_iters: Array
  residual_norm: Array
  initial_residual_norm: Array
  converged: Array
  status: Array
  fallback: Array
  num_iters_total: Array
  fallback_count: Array

  @property
  def relative_residual(self) -> Array:
    """``(N, B)`` ``residual_norm / initial_residual_norm`` (0 where ``r_0 = 0``), compared
    with tau by the stopping rule."""
    r0 = self.initial_residual_norm
    return jnp.where(r0 > 0, self.residual_norm / jnp.where(r0 > 0, r0, 1.0), 0.0)


def soae_direction(loss_fn: LossFn, x: Array, *, tau: float = DEFAULT_TAU, m: int = DEFAULT_M,
                   hvp: str = DEFAULT_HVP, eta: float = DEFAULT_ETA,
                   orthogonalization: str = "auto") -> SOAEDirection:
  """Solves ``H_i d_i = g_i`` for every example by GMRES from ``d_0 = g`` (Algorithm 1, 2-17).

  ``g = grad L(x)`` and ``H v`` come from ``make_hvp(loss_fn, x, method=hvp, eta=eta)``; GMRES
  (:func:`krylov_adv.krylov.gmres`) starts at ``d_0 = g`` so its first matvec is step 3's
  ``H g``, builds the Krylov basis of ``K_j(H, r_0)``, ``r_0 = g - H g``, and stops per example
  when ``||r_j|| <= tau ||r_0||`` (step 12) or ``j = m``. Pure and traceable: call it under
  ``jit`` (``loss_fn`` is a closure).

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode (block-diagonal
      Hessian, :mod:`krylov_adv.hvp`).
    x: ``(B, ...)`` float32/float64, the point of the quadratic model.
    tau: relative residual threshold ``> 0``. m: maximal Krylov dimension ``>= 1``.
    hvp: ``"exact" | "exact_linearized" | "fd_forward" | "fd_central"``.
    eta: finite-difference step ``> 0`` (ignored by the exact methods).
    orthogonalization: GMRES's Gram-Schmidt, ``"auto"`` (MGS on CPU, CGS2 on accelerators),
      ``"mgs"`` or ``"cgs2"``.

  Returns:
    :class:`SOAEDirection`; its ``gmres`` holds the residual history of the solve
    (``experiments/krylov_dims.py`` reads the Krylov dimension per threshold from it).
  """
  op = hvp_lib.make_hvp(loss_fn, x, method=hvp, eta=eta)
  res = krylov.gmres(op.matvec, op.grad, x0=op.grad, tol=tau, max_dim=m,
                     orthogonalization=orthogonalization)
  return SOAEDirection(direction=res.x, grad=op.grad, gmres=res)


def _per_example_dot(a: Array, b: Array) -> Array:
  return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


@functools.partial(jax.jit, static_argnames=(
    "logits_fn", "norm", "steps", "m", "tau", "hvp", "eta", "step", "fallback", "random_start",
    "loss", "orthogonalization"))
def _soae_impl(logits_fn: LogitsFn, x: Array, y: Array, key: Array, eps, alpha, *, norm: str,
               steps: int, m: int, tau: float, hvp: str, eta: float, step: str, fallback: bool,
               random_start: bool, loss: str,
               orthogonalization: str) -> tuple[Array, SOAEDiagnostics]:
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(alpha, x.dtype) / steps
  loss_fn = toolkit.make_loss_fn(logits_fn, y, loss)
  x0 = toolkit.ball_start(key, x, eps, norm) if random_start else x

  def outer(xn, _):
    sol = soae_direction(loss_fn, xn, tau=tau, m=m, hvp=hvp, eta=eta,
                         orthogonalization=orthogonalization)
    d, g = sol.direction, sol.grad
    bad = ~toolkit.all_finite(d)
    if fallback:
      # `not > 0` rather than `<= 0`: a NaN inner product must fall back too.
      bad = bad | ~(_per_example_dot(g, d) > 0)
    d = toolkit.select(bad, g, d)
    # A non-finite gradient (overflowing model) moves nothing rather than poisoning x_adv.
    d = jnp.where(toolkit.bcast(toolkit.all_finite(d), d), d, 0.0)
    if step == "normalized":
      x_next = toolkit.ascent_step(xn, d, x, eps, step_size, norm)
    else:
      x_next = projections.project(xn + step_size * d, x, eps, norm)
    res = sol.gmres
    return x_next, (res.num_iters, res.residual_norm, res.initial_residual_norm, res.converged,
                    res.status, bad)

  x_adv, (num_iters, resid, resid0, conv, status, fell) = lax.scan(outer, x0, None,
                                                                   length=steps)
  diag = SOAEDiagnostics(num_iters=num_iters, residual_norm=resid, initial_residual_norm=resid0,
                         converged=conv, status=status.astype(jnp.int32), fallback=fell,
                         num_iters_total=jnp.sum(num_iters, axis=0).astype(jnp.int32),
                         fallback_count=jnp.sum(fell, axis=0).astype(jnp.int32))
  return x_adv, diag


def _soae(logits_fn, x, y, key, *, eps, norm, steps, alpha, m, tau, hvp, eta, step, fallback,
          random_start, loss, orthogonalization) -> toolkit.WithReport:
  x, y, _, _ = toolkit.validate_inputs(logits_fn, x, y, eps, norm, loss=loss)
  checks.check_at_least("steps", steps, 1)
  checks.check_at_least("m", m, 1)
  checks.check_positive("tau", tau)
  checks.check_positive("eta", eta)
  checks.check_choice("HVP method", hvp, hvp_lib.HVP_METHODS)
  checks.check_choice("SOAE step", step, STEPS)
  checks.check_choice("orthogonalization", orthogonalization, ORTHOGONALIZATIONS)
  if alpha is None:
    alpha = eps
  checks.check_nonnegative("alpha", alpha)
  x_adv, diag = _soae_impl(logits_fn, x, y, key, eps, alpha, norm=norm, steps=int(steps),
                           m=int(m), tau=float(tau), hvp=hvp, eta=float(eta), step=step,
                           fallback=bool(fallback), random_start=bool(random_start), loss=loss,
                           orthogonalization=orthogonalization)
  return toolkit.WithReport(x_adv, diag)


@register("soae")
@toolkit.attack_entry
def soae(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = DEFAULT_STEPS,
         alpha=None, m: int = DEFAULT_M, tau: float = DEFAULT_TAU, hvp: str = DEFAULT_HVP,
         eta: float = DEFAULT_ETA, step: str = "normalized", fallback: bool = True,
         random_start: bool = False, loss: str = "ce", orthogonalization: str = "auto") -> Array:
  """Second-order adversarial example by Krylov-Newton steps (SOAE paper, Algorithm 1).

  ``x_{n+1} = Proj(x_n + (alpha / N) * step(d_n))``, ``n = 1..N`` (``N = steps``), ``x_1 = x``,
  with ``d_n`` GMRES's solution of ``H d = grad L(x_n)`` from ``d_0 = grad L(x_n)``
  (:func:`soae_direction`; the gradient replaces it where it points downhill when
  ``fallback``). See the module docstring for the cost and the raw vs normalised step.

  Defaults follow the paper where it gives values (Sec. IV-D): ``N = 4`` ("less than 4
  iterations"), ``m = 15`` (enough for 28x28 and 32x32 images), ``tau = 1e-3`` (the cheap end
  of the recommended ``1e-4 <= tau <= 1e-3``) and ``eta = 1e-5`` for the finite differences
  (``eta <= 1e-5`` recommended); they are the module constants ``DEFAULT_*``. The Hessian
  product defaults to ``hvp="exact"``, the quantity that Algorithm 1 step 3's forward difference
  approximates, at about the same cost: in float32 the forward difference with ``eta = 1e-5``
  has ~1% rounding error per product, GMRES then inverts that noise on the (near) null space of
  ``H`` (a ReLU network's input Hessian of the cross-entropy has rank <= K - 1), and the attack
  collapses (on the digits test model, Linf 0.3: 84% robust accuracy with ``"fd_forward"``/
  ``1e-5`` against 6% with ``"exact"``). Pass ``hvp="fd_forward"`` for the paper's literal
  algorithm. ``alpha`` is the paper's symbol (Algorithm 1 step 18): the *total* distance of the
  ``N`` steps, each of length ``alpha / N`` (not a per-step ``step_size``); the paper gives no
  value, and the default ``alpha = eps`` makes ``x + alpha * step`` reach the boundary of the
  Linf ball after ``N`` agreeing sign steps, and the L2 sphere.

  Args:
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode; hashable.
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels. key: PRNG key
      (used only with ``random_start``, which the paper does not have).
    eps: budget ``>= 0``. norm: ``"linf" | "l2"``.
    steps: outer iterations ``N >= 1``. alpha: total distance ``>= 0`` (default ``eps``).
    m: maximal Krylov dimension ``>= 1``. tau: GMRES threshold ``> 0``.
    hvp: ``"exact" | "exact_linearized" | "fd_forward" | "fd_central"``. eta: FD step ``> 0``.
    step: ``"normalized"`` (sign / unit L2, default) or ``"raw"`` (the paper's literal step).
    fallback: use ``g`` where ``<g, d> <= 0``. loss: ``"ce" | "dlr"``.
    orthogonalization: GMRES's ``"auto"`` (default: MGS on CPU, CGS2 on accelerators),
      ``"mgs"`` or ``"cgs2"``.

  Returns:
    ``x_adv`` of ``x``'s shape and dtype (``||x_adv_i - x_i|| <= eps``, ``0 <= x_adv <= 1``).
  """
  return _soae(logits_fn, x, y, key, eps=eps, norm=norm, steps=steps, alpha=alpha, m=m, tau=tau,
               hvp=hvp, eta=eta, step=step, fallback=fallback, random_start=random_start,
               loss=loss, orthogonalization=orthogonalization).x_adv


@toolkit.report_entry
def soae_with_report(logits_fn: LogitsFn, x, y, key, **hyperparameters) -> toolkit.WithReport:
  """:func:`soae` and its diagnostics: ``WithReport(x_adv, SOAEDiagnostics)``, ``x_adv`` the
  same as :func:`soae`'s; takes :func:`soae`'s keyword arguments, with its defaults (the
  diagnostics cost nothing extra)."""
  return _soae(logits_fn, x, y, key, **toolkit.keyword_arguments(soae, hyperparameters))
