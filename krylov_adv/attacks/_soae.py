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

Proposition (the closed form of the Newton direction on a piecewise-linear network). Let the
logits ``z(x)`` be piecewise linear in ``x`` (ReLU, max/avg pooling) and ``x`` a point inside a
linear region where the logit Jacobian ``J = dz/dx`` (``K x n``, ``n >= K``) has full row rank.
Write ``p = softmax(z)`` (all ``p_k > 0``), ``S = diag(p) - p p^T`` and ``L = CE(z, y)``. Then
``g = J^T (p - e_y)``, ``H = J^T S J``, GMRES on ``H d = g`` (from ``d_0 = 0`` or from the
paper's ``d_0 = g``) converges in at most ``rank(H) = K - 1`` steps to ``d = H^+ g``, and

    ``J d = -e_y / p_y + c 1``  for some scalar ``c``,

equivalently ``J d = -(e_y - 1/K) / p_y`` up to one constant added to every logit (``c``
depends on ``J``: it is what puts ``d`` in ``range(H)``).

Proof. ``J^T`` is injective, so ``H d = g`` iff ``S (J d) = p - e_y``; ``S (-e_y / p_y) =
-(p_y e_y - p_y p) / p_y = p - e_y`` and ``null(S) = span(1)``, so the solutions are exactly the
``d`` with ``J d = -e_y / p_y + c 1``. Both starts lie in ``range(H) = J^T (1^perp)`` (``g`` does,
as ``1^T (p - e_y) = 0``), so every Krylov iterate does, and the one solution there is the
minimum-norm one, ``H^+ g``; ``range(H)`` has dimension ``K - 1``. QED.

A common shift ``c 1`` of the logits changes no softmax, so the first-order effect of the Newton
direction is: lower the true logit by ``1 / p_y``, leave the others (all raised equally). It
ignores *which* wrong class is closest and is realised by the minimum-norm input change through
``J``, which is badly conditioned: the direction spends its norm on the directions ``J`` can
barely move, not on the runner-up margin ``z_y - max_{j != y} z_j``
(``experiments/soae_direction.py`` measures its first-order margin gain against the gradient's
and the best direction's). ``tests/test_soae.py`` checks the identity in float64. With the
forward difference at ``eta = 1e-5`` in float32 the rank-(K-1) structure is drowned in rounding
noise: GMRES runs to the cap ``m`` and returns a different vector.

Trust-region direction (``direction="trust_region"``). Eq. (3)'s quadratic model
``Q(delta) = L + g^T delta + 1/2 delta^T H delta`` maximised over the step's ball
``||delta|| <= r`` (``r = alpha / N``, the length of one step) is a trust-region problem. GMRES is
then run from ``d_0 = 0`` (so ``r_0 = g``, its basis spans ``K_k(H, g)`` which contains ``g``,
and step 3's product is skipped) and keeps its Arnoldi basis ``V_k`` and Hessenberg matrix
(:func:`krylov_adv.krylov.gmres` with ``return_basis``); the problem is solved in that
subspace with no further Hessian products, ``T = sym(V_k^T H V_k)`` (``k x k``):

* L2: ``max beta y_1 + 1/2 y^T T y`` s.t. ``||y||_2 = r`` exactly: ``y = (mu I - T)^{-1} beta
  e_1`` with ``mu >= lambda_max(T)`` from the eigendecomposition of ``T`` and bisection on the
  secular equation ``||y(mu)|| = r`` (the "hard case", no gradient component on the top
  eigenvector, is completed along it); ``delta = V_k y``. On the sphere rather than in the ball:
  the cross-entropy Hessian of a ReLU network is positive semidefinite, where the two coincide.
* Linf: Frank-Wolfe ascent (``_FRANK_WOLFE_STEPS`` iterations from ``delta = 0``, exact line
  search on the quadratic) on the projected model ``g^T delta + 1/2 delta^T V_k T V_k^T delta``
  over the box ``||delta||_inf <= r`` (SCORPIO's inner solver, on the projected Hessian). The
  first iterate is FGSM's ``r sign(g)``; each later one is a vertex or a point on an edge.

For a ReLU network with the exact HVP and a converged solve ``K_k(H, g) = range(H)`` (when ``g``
has a component on every eigenvector), so ``V_k T V_k^T = H`` and both are the exact maximisers
of the full quadratic model (a local one for Frank-Wolfe). The step is then the usual normalised
step of the direction (with ``step="raw"``, ``x_{n+1} = Proj(x_n + delta)``). Cost per outer
iteration: 1 gradient + ``k`` HVPs + 1 for the true residual (one fewer than ``"newton"``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from krylov_adv import hvp as hvp_lib
from krylov_adv import krylov, projections
from krylov_adv.attacks import checks, register, summaries, toolkit
from krylov_adv.attacks.toolkit import Array, LogitsFn, LossFn

STEPS = ("normalized", "raw")
DIRECTIONS = ("newton", "trust_region")
ORTHOGONALIZATIONS = ("auto", "mgs", "cgs2")

# The one default of each SOAE hyperparameter, used by soae, soae_with_report and soae_direction
# (the paper's Sec. IV-D where it gives values; see soae's docstring).
DEFAULT_STEPS = 4
DEFAULT_M = 15
DEFAULT_TAU = 1e-3
DEFAULT_HVP = hvp_lib.DEFAULT_METHOD  # defined once, in krylov_adv.hvp
DEFAULT_ETA = hvp_lib.DEFAULT_ETA
DEFAULT_DIRECTION = "newton"

# Iterations of the projected trust-region solvers (no Hessian products; m x m or (m, n) work).
_BISECTION_STEPS = 100
_FRANK_WOLFE_STEPS = 20


class SOAEDirection(NamedTuple):
  """The Newton direction of one SOAE iteration (Algorithm 1 steps 2-17) at a batch ``x``.

  Attributes:
    direction: ``(B, ...)`` GMRES's approximation of ``d_i = H_i^{-1} g_i`` (``"newton"``) or the
      maximiser of the quadratic model projected on GMRES's Krylov space (``"trust_region"``).
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
    initial_residual_norm: ``(N, B)`` ``||r_0|| = ||g - H g||_2`` (the paper's ``beta``;
      ``||g||_2`` with ``direction="trust_region"``, whose GMRES starts at 0).
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

  def summary(self) -> str:
    """A few lines: Krylov dimension, convergence, fallback, exit statuses, residuals."""
    return summaries.soae_summary(self)

  def __repr__(self) -> str:  # one line, not the arrays (krylov_adv.attacks.summaries)
    return summaries.soae_repr(self)


def _projected_hessian(res: krylov.GMRESResult) -> tuple[Array, Array]:
  """``T = sym(V_k^T H V_k)`` from the Hessenberg matrix, ``(B, m, m)``, padded past ``k``
  (``k = num_iters``) with zeros off the diagonal and a diagonal below every eigenvalue of the
  used block (so that the padding is never the top eigenvector); and the mask ``(B, m)`` of the
  used coordinates."""
  m = res.hessenberg.shape[-1]
  t = res.hessenberg[:, :m, :m]
  t = 0.5 * (t + jnp.swapaxes(t, 1, 2))
  used = jnp.arange(m)[None, :] < res.num_iters[:, None]
  t = jnp.where(used[:, :, None] & used[:, None, :], t, 0.0)
  # Gershgorin: every eigenvalue of the used block is >= -max row sum of |T|.
  bound = jnp.max(jnp.sum(jnp.abs(t), axis=2), axis=1)
  pad = jnp.where(used, 0.0, 2.0 * bound[:, None] + 1.0)
  return t - pad[:, :, None] * jnp.eye(m, dtype=t.dtype), used


def _trust_region_l2(t: Array, beta: Array, radius: Array) -> Array:
  """``argmax_{||y|| = r} beta y_1 + 1/2 y^T T y`` per example: ``(B, m, m), (B,), (B,) ->
  (B, m)``. ``y = Q (mu - lambda)^{-1} Q^T beta e_1`` with ``mu >= lambda_max`` found by
  bisection on ``||y(mu)|| = r`` (decreasing in ``mu`` on ``(lambda_max, inf)``, ``<= r`` at
  ``lambda_max + beta / r``); what the bisection leaves of ``r`` (all of it in the hard case) is
  added along the top eigenvector."""
  lam, q = jnp.linalg.eigh(t)
  gh = beta[:, None] * q[:, 0, :]            # Q^T (beta e_1)
  lmax = lam[:, -1]

  def y_hat(mu):
    den = mu[:, None] - lam
    return jnp.where(den > 0, gh / jnp.where(den > 0, den, 1.0), 0.0)

  def bisect(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    outside = jnp.sum(y_hat(mid) ** 2, axis=1) > radius ** 2
    return jnp.where(outside, mid, lo), jnp.where(outside, hi, mid)

  _, mu = lax.fori_loop(0, _BISECTION_STEPS, bisect, (lmax, lmax + beta / radius))
  yh = y_hat(mu)
  deficit = jnp.maximum(radius ** 2 - jnp.sum(yh ** 2, axis=1), 0.0)
  top = yh[:, -1]
  top = jnp.where(top >= 0, 1.0, -1.0) * jnp.sqrt(top ** 2 + deficit)
  yh = yh.at[:, -1].set(top)
  return jnp.einsum("bij,bj->bi", q, yh)


def _trust_region_linf(v: Array, t: Array, g: Array, radius: Array) -> Array:
  """Frank-Wolfe ascent on ``g^T d + 1/2 d^T V^T T V d`` over ``||d||_inf <= r`` from ``d = 0``.

  ``v (B, m, n)`` orthonormal rows, ``t (B, m, m)``, ``g (B, n)``, ``radius (B,)``; returns
  ``d (B, n)``. Each iteration: ``s = r sign(grad)`` (the linear maximiser over the box), then
  the step ``gamma in [0, 1]`` maximising the quadratic on the segment (``1`` where it is convex
  along it, else ``min(1, a / -b)``)."""

  def hmul(d):
    return jnp.einsum("bmn,bm->bn", v, jnp.einsum("bij,bj->bi", t, jnp.einsum("bmn,bn->bm", v, d)))

  def body(_, d):
    grad = g + hmul(d)
    e = radius[:, None] * jnp.sign(grad) - d
    a = jnp.sum(grad * e, axis=1)
    b = jnp.sum(e * hmul(e), axis=1)
    gamma = jnp.where(b < 0, jnp.clip(a / jnp.where(b < 0, -b, 1.0), 0.0, 1.0), 1.0)
    return d + gamma[:, None] * e

  return lax.fori_loop(0, _FRANK_WOLFE_STEPS, body, jnp.zeros_like(g))


def trust_region_direction(res: krylov.GMRESResult, grad: Array, radius, norm: str) -> Array:
  """The maximiser of the quadratic model projected on GMRES's Krylov space (module docstring).

  Args:
    res: :func:`krylov_adv.krylov.gmres`'s result from ``x0 = 0`` on ``H d = g`` with
      ``return_basis=True`` (so ``basis[:, 0] = g / ||g||``).
    grad: ``(B, ...)`` ``g``.
    radius: ``r > 0``, scalar or ``(B,)``: the ball of the step.
    norm: ``"l2"`` (exact on the sphere) or ``"linf"`` (Frank-Wolfe in the box).

  Returns:
    ``(B, ...)`` the step ``delta`` (``||delta|| = r`` in L2, ``<= r`` in Linf); no Hessian
    products.
  """
  bsz = grad.shape[0]
  m = res.hessenberg.shape[-1]
  radius = jnp.broadcast_to(jnp.asarray(radius, grad.dtype), (bsz,))
  t, used = _projected_hessian(res)
  v = jnp.where(used[:, :, None], res.basis[:, :m], 0.0)
  if norm == "l2":
    y = _trust_region_l2(t, res.initial_residual_norm, radius)
    d = jnp.einsum("bmn,bm->bn", v, jnp.where(used, y, 0.0))
  else:
    t = jnp.where(used[:, :, None] & used[:, None, :], t, 0.0)
    d = _trust_region_linf(v, t, grad.reshape(bsz, -1), radius)
  return d.reshape(grad.shape)


def soae_direction(loss_fn: LossFn, x: Array, *, tau: float = DEFAULT_TAU, m: int = DEFAULT_M,
                   hvp: str = DEFAULT_HVP, eta: float = DEFAULT_ETA,
                   orthogonalization: str = "auto", direction: str = DEFAULT_DIRECTION,
                   radius=None, norm: str = "l2") -> SOAEDirection:
  """Solves ``H_i d_i = g_i`` for every example by GMRES from ``d_0 = g`` (Algorithm 1, 2-17).

  ``g = grad L(x)`` and ``H v`` come from ``make_hvp(loss_fn, x, method=hvp, eta=eta)``; GMRES
  (:func:`krylov_adv.krylov.gmres`) starts at ``d_0 = g`` so its first matvec is step 3's
  ``H g``, builds the Krylov basis of ``K_j(H, r_0)``, ``r_0 = g - H g``, and stops per example
  when ``||r_j|| <= tau ||r_0||`` (step 12) or ``j = m``. With ``direction="trust_region"``
  GMRES starts at ``0`` instead and the direction is :func:`trust_region_direction` on its
  basis (radius ``radius``, ball ``norm``). Pure and traceable: call it under ``jit``
  (``loss_fn`` is a closure).

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode (block-diagonal
      Hessian, :mod:`krylov_adv.hvp`).
    x: ``(B, ...)`` float32/float64, the point of the quadratic model.
    tau: relative residual threshold ``> 0``. m: maximal Krylov dimension ``>= 1``.
    hvp: ``"exact" | "exact_linearized" | "fd_forward" | "fd_central"``.
    eta: finite-difference step ``> 0`` (ignored by the exact methods).
    orthogonalization: GMRES's Gram-Schmidt, ``"auto"`` (MGS on CPU, CGS2 on accelerators),
      ``"mgs"`` or ``"cgs2"``.
    direction: ``"newton"`` (Algorithm 1) or ``"trust_region"``.
    radius: the trust region's radius ``> 0`` (scalar or ``(B,)``), required with
      ``"trust_region"``. norm: its ball, ``"l2"`` or ``"linf"``.

  Returns:
    :class:`SOAEDirection`; its ``gmres`` holds the residual history of the solve
    (``experiments/krylov_dims.py`` reads the Krylov dimension per threshold from it).
  """
  checks.check_choice("SOAE direction", direction, DIRECTIONS)
  op = hvp_lib.make_hvp(loss_fn, x, method=hvp, eta=eta)
  if direction == "newton":
    res = krylov.gmres(op.matvec, op.grad, x0=op.grad, tol=tau, max_dim=m,
                       orthogonalization=orthogonalization)
    return SOAEDirection(direction=res.x, grad=op.grad, gmres=res)
  if radius is None:
    raise ValueError("direction='trust_region' needs a radius")
  res = krylov.gmres(op.matvec, op.grad, tol=tau, max_dim=m,
                     orthogonalization=orthogonalization, return_basis=True)
  d = trust_region_direction(res, op.grad, radius, norm)
  return SOAEDirection(direction=d, grad=op.grad, gmres=res._replace(basis=None, hessenberg=None))


def _per_example_dot(a: Array, b: Array) -> Array:
  return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


@functools.partial(jax.jit, static_argnames=(
    "norm", "steps", "m", "tau", "hvp", "eta", "step", "fallback", "random_start",
    "loss", "orthogonalization", "direction"))
def _soae_impl(logits_fn: LogitsFn, x: Array, y: Array, key: Array, eps, alpha, bounds, *,
               norm: str,
               steps: int, m: int, tau: float, hvp: str, eta: float, step: str, fallback: bool,
               random_start: bool, loss: str, orthogonalization: str,
               direction: str) -> tuple[Array, SOAEDiagnostics]:
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(alpha, x.dtype) / steps
  loss_fn = toolkit.make_loss_fn(logits_fn, y, loss)
  x0 = toolkit.ball_start(key, x, eps, norm, bounds) if random_start else x

  def outer(xn, _):
    sol = soae_direction(loss_fn, xn, tau=tau, m=m, hvp=hvp, eta=eta,
                         orthogonalization=orthogonalization, direction=direction,
                         radius=step_size, norm=norm)
    d, g = sol.direction, sol.grad
    bad = ~toolkit.all_finite(d)
    if fallback:
      # `not > 0` rather than `<= 0`: a NaN inner product must fall back too.
      bad = bad | ~(_per_example_dot(g, d) > 0)
    d = toolkit.select(bad, g, d)
    # A non-finite gradient (overflowing model) moves nothing rather than poisoning x_adv.
    d = jnp.where(toolkit.bcast(toolkit.all_finite(d), d), d, 0.0)
    if step == "normalized":
      x_next = toolkit.ascent_step(xn, d, x, eps, step_size, norm, bounds)
    elif direction == "trust_region":
      # d already has length alpha / N
      x_next = projections.project(xn + d, x, eps, norm, bounds)
    else:
      x_next = projections.project(xn + step_size * d, x, eps, norm, bounds)
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
          random_start, loss, orthogonalization, direction, bounds) -> toolkit.WithReport:
  x, y, _, _, bounds = toolkit.validate_inputs(logits_fn, x, y, eps, norm, loss=loss,
                                               bounds=bounds)
  checks.check_at_least("steps", steps, 1)
  checks.check_at_least("m", m, 1)
  checks.check_positive("tau", tau)
  checks.check_positive("eta", eta)
  checks.check_choice("HVP method", hvp, hvp_lib.HVP_METHODS)
  checks.check_choice("SOAE step", step, STEPS)
  checks.check_choice("orthogonalization", orthogonalization, ORTHOGONALIZATIONS)
  checks.check_choice("SOAE direction", direction, DIRECTIONS)
  if direction == "trust_region" and norm == "l1":
    raise ValueError("SOAE's trust-region direction maximises the quadratic model over an L2 "
                     "sphere or an Linf box; it has no L1 form: use direction='newton' with "
                     "norm='l1' (the sparse sign step), or norm='linf' / 'l2'")
  if alpha is None:
    alpha = eps
  checks.check_nonnegative("alpha", alpha)
  x_adv, diag = _soae_impl(logits_fn, x, y, key, eps, alpha, bounds, norm=norm,
                           steps=int(steps),
                           m=int(m), tau=float(tau), hvp=hvp, eta=float(eta), step=step,
                           fallback=bool(fallback), random_start=bool(random_start), loss=loss,
                           orthogonalization=orthogonalization, direction=direction)
  return toolkit.WithReport(x_adv, diag)


@register("soae")
@toolkit.attack_entry
def soae(logits_fn: LogitsFn, x, y, key, *, eps, norm: str, steps: int = DEFAULT_STEPS,
         alpha=None, m: int = DEFAULT_M, tau: float = DEFAULT_TAU, hvp: str = DEFAULT_HVP,
         eta: float = DEFAULT_ETA, step: str = "normalized", fallback: bool = True,
         random_start: bool = False, loss: str = "ce", orthogonalization: str = "auto",
         direction: str = DEFAULT_DIRECTION, bounds=None) -> Array:
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
    logits_fn: ``(B, H, W, C)`` in ``[0, 1]`` -> logits ``(B, K)``, inference mode (arrays traced,
      :func:`toolkit.as_model`).
    x: ``(B, H, W, C)`` float images in ``[0, 1]``. y: ``(B,)`` int labels. key: PRNG key
      (used only with ``random_start``, which the paper does not have).
    eps: budget ``>= 0``. norm: ``"linf" | "l2" | "l1"`` (L1, not in the paper: the Newton
      direction through the sparse sign step of :func:`krylov_adv.projections.l1_sparse_sign`;
      the trust-region direction refuses L1).
    steps: outer iterations ``N >= 1``. alpha: total distance ``>= 0`` (default ``eps``).
    m: maximal Krylov dimension ``>= 1``. tau: GMRES threshold ``> 0``.
    hvp: ``"exact" | "exact_linearized" | "fd_forward" | "fd_central"``. eta: FD step ``> 0``.
    step: ``"normalized"`` (sign / unit L2, default) or ``"raw"`` (the paper's literal step).
    fallback: use ``g`` where ``<g, d> <= 0``. loss: ``"ce" | "dlr"``.
    orthogonalization: GMRES's ``"auto"`` (default: MGS on CPU, CGS2 on accelerators),
      ``"mgs"`` or ``"cgs2"``.
    direction: ``"newton"`` (default, Algorithm 1's ``H^{-1} g``) or ``"trust_region"`` (the
      maximiser of Eq. 3's quadratic model over the step's ball in GMRES's Krylov space; module
      docstring).
    bounds: the input box ``(lo, hi)`` (default ``(0, 1)``).

  Returns:
    ``x_adv`` of ``x``'s shape and dtype (``||x_adv_i - x_i|| <= eps``, ``lo <= x_adv <= hi``).
  """
  return _soae(logits_fn, x, y, key, eps=eps, norm=norm, steps=steps, alpha=alpha, m=m, tau=tau,
               hvp=hvp, eta=eta, step=step, fallback=fallback, random_start=random_start,
               loss=loss, orthogonalization=orthogonalization, direction=direction,
               bounds=bounds).x_adv


@toolkit.report_entry
def soae_with_report(logits_fn: LogitsFn, x, y, key, **hyperparameters) -> toolkit.WithReport:
  """:func:`soae` and its diagnostics: ``WithReport(x_adv, SOAEDiagnostics)``, ``x_adv`` the
  same as :func:`soae`'s; takes :func:`soae`'s keyword arguments, with its defaults (the
  diagnostics cost nothing extra)."""
  return _soae(logits_fn, x, y, key, **toolkit.keyword_arguments(soae, hyperparameters))
