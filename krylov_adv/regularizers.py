"""Second-order adversarial regularisers: SOAR and SCORPIO, the baselines of the SOAE paper's
Tables I-III, as pure functions of a per-example loss (or of a ``logits_fn``).

Both replace the inner maximisation of robust optimisation, ``max_{||delta|| <= eps}
L(x + delta)``, by the second-order Taylor model of the loss at ``x``,

    L(x + delta) ~ L(x) + Q(delta),    Q(delta) = g^T delta + 1/2 delta^T H delta,      (*)

with ``g = grad_x L(x)`` and ``H = grad_x^2 L(x)`` the input gradient and Hessian of the
cross-entropy of one example, and penalise the worst case of ``Q`` over the threat model.

SOAR (Ma, Faghri, Papernot and Farahmand, "SOAR: Second-Order Adversarial Regularization",
arXiv:2004.01832) *upper-bounds* ``max Q``. Writing ``delta' = [delta; 1]`` and the augmented
Hessian

    H~ = [[H,   g],
          [g^T, 1]]      ((d + 1) x (d + 1)),

``Q(delta) = 1/2 delta'^T H~ delta' - 1/2`` exactly, and ``||delta'||_2^2 <= q eps^2 + 1`` with
``q = d`` for the Linf ball (``||delta||_2^2 <= d ||delta||_inf^2``) and ``q = 1`` for the L2 ball,
so

    max_{||delta|| <= eps} Q(delta) <= 1/2 (q eps^2 + 1) ||H~||_2 - 1/2
                                    <= 1/2 (q eps^2 + 1) ||H~||_F - 1/2.

``||H~||_F^2 = E_z ||H~ z||_2^2`` for ``z ~ N(0, I_{d+1})`` (Hutchinson), and SOAR estimates
``H~ z`` with one finite difference of gradients with step ``h``. Since ``||H~||_F^2 = ||H||_F^2
+ 2 ||g||_2^2 + 1``, the bound penalises the input-gradient norm and the Hessian's Frobenius norm
together. The regulariser is

    R_SOAR(x) = 1/2 (q eps^2 + 1) ||H~ z||_2,                                            (SOAR)

added to the cross-entropy with weight ``lambda``; following the authors' training code, both
terms are evaluated at ``x'`` = one step of PGD from a random start (their ``init="pgd1"``; the
paper's reasoning for it was not reachable), and ``x'`` is ``stop_gradient``-ed.

  What was and was not checked against sources (the stored copies reachable from this project
  hold the paper's abstract only, not its body):
    * the abstract (arXiv:2004.01832; ICLR 2021 OpenReview id Ms9zjhVB5R): the regulariser is an
      upper bound built on the second-order Taylor approximation of the inner max, for Linf and
      L2 balls;
    * the authors' public PyTorch training loop (found by code search, ``train_soar``): the
      regulariser is scaled by ``lambda * 0.5 * (eps^2 * d + 1)`` (Linf), evaluated at a
      ``"pgd1"`` initialisation (random start in the Linf ball, one signed step of ``2/255`` for
      ``eps = 8/255``), its own parameter gradient is norm-clipped (``grad_clip``) before the
      cross-entropy's gradient is added, and the regulariser takes a difference step
      (``step_size``) and a ``norm_clip`` argument;
    * NOT found: the paper's equation numbers, the exact finite-difference formula for the
      augmented product, the meaning of ``norm_clip``, and the published values of ``lambda``,
      ``h``, ``norm_clip`` and ``grad_clip``. The finite difference below is our derivation
      (:func:`augmented_hessian_product`), tested against ``jax.hessian``; the defaults
      (``h = 0.01``, ``lambda = 1``) are ours, chosen as documented there.

  The gradient clip is implemented by :func:`clip_gradient_norm` and used by the ``soar``
  training method (:func:`krylov_adv.training.soar`, config ``train.soar.grad_clip``): the
  parameter gradient of ``lambda * mean R`` is clipped to global L2 norm ``<= grad_clip``, the
  cross-entropy's is not. Without it, on TinyCNN / Fashion-MNIST at Linf 0.1 (``q eps^2 = 7.84``,
  scale 4.42) the regulariser's gradient at initialisation is ~140 times the cross-entropy's
  (norms 71.6 and 0.50 on one batch of 128) and training escapes to a constant classifier,
  whose ``R = 1/2 (q eps^2 + 1) |z_t|`` is the bound's floor. :func:`soar_loss` (a function of
  ``logits_fn``, not of the parameters) does not clip.

SCORPIO (Tsiligkaridis and Roberts, "Second Order Optimization for Adversarial Robustness and
Interpretability", arXiv:2009.04923; the SOAE paper's reference [15]) takes the worst case of the
quadratic model itself: "a regularizer which incorporates first and second order information via
a quadratic approximation to the adversarial loss. The worst case quadratic loss is approximated
via an iterative scheme", one iteration already being a strong regulariser (abstract). The
abstract does not name the scheme; we use Frank-Wolfe on ``Q`` over the ball, as issue 14 asks
and as in the same authors' Frank-Wolfe adversarial training (arXiv:2012.12368), one
Hessian-vector product per iteration:

    delta_0 = 0;  for k = 0..K-1:
      s_k = argmax_{||s|| <= eps} <grad Q(delta_k), s>      (eps sign(.) / eps (.)/||.||_2)
      delta_{k+1} = delta_k + gamma_k (s_k - delta_k)
    R_SCORPIO(x) = Q(delta_K),          loss = CE(x) + lambda R_SCORPIO(x),              (SCORPIO)

with ``grad Q(delta) = g + H delta``. The first iterate is the FGSM (Linf) / FGM (L2) point
``eps step(g)``, so one iteration penalises ``eps ||g||_* + eps^2/2 step(g)^T H step(g)``.
The paper body (equation numbers, step rule, number of iterations, lambda) was NOT reachable;
the choices here are ours and documented: exact line search on the quadratic (default; ``Q``
never decreases) or the classical ``gamma_k = 2 / (k + 2)``; ``steps = 5``; ``lambda = 1``, which
makes the objective the worst-case quadratic model of the adversarial loss, ``CE(x) + max Q``.
The parameter gradient uses Danskin's theorem: the maximiser is ``stop_gradient``-ed and ``Q``
re-evaluated at it, so the Frank-Wolfe loop is never differentiated.

Cost per training step, in forward/backward passes of the batch (an exact HVP is ~1.4
gradients): SOAR, the one-step init (1 gradient), the cross-entropy, two value-and-gradients for
the difference, and the parameter gradient through them (double backpropagation); SCORPIO, one
gradient and ``steps`` HVPs for the search, one HVP to re-evaluate ``Q``, and its parameter
gradient (third-order through the HVP). Neither method constrains ``x + delta`` to the box
``[0, 1]`` (the Taylor model is taken over the ball only).

Conventions (:mod:`krylov_adv.hvp`): ``loss_fn`` maps a batch ``(B, ...)`` to per-example losses
``(B,)`` with the model in inference mode, so every gradient and HVP of the summed loss is
per-example (block-diagonal Hessian). The regularisers are differentiable w.r.t. whatever
``loss_fn`` closes over (the model parameters): build ``logits_fn`` from the parameters inside
the function you differentiate.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from krylov_adv import attacks, losses, projections
from krylov_adv import hvp as hvp_lib

Array = jax.Array
LossFn = Callable[[Array], Array]
LogitsFn = Callable[[Array], Array]

SOAR_HVPS = ("fd", "exact")
SOAR_INITS = ("pgd1", "none")
SCORPIO_STEP_RULES = ("line_search", "classic")


def _dot(a: Array, b: Array) -> Array:
  """Per-example inner product ``<a_i, b_i>``: ``(B, ...) x (B, ...) -> (B,)``."""
  return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


def _value_and_input_grad(loss_fn: LossFn, x: Array) -> tuple[Array, Array]:
  """Per-example losses ``(B,)`` and input gradients ``(B, ...)`` in one pass."""

  def total(z):
    per_example = loss_fn(z)
    return jnp.sum(per_example), per_example

  (_, values), grad = jax.value_and_grad(total, has_aux=True)(x)
  return values, grad


# ---------------------------------------------------------------------------------------------
# SOAR


def soar_scale(x: Array, eps, norm: str):
  """``1/2 (q eps^2 + 1)``, the radius factor of the SOAR bound, with ``q = d`` (the input
  dimension per example) for Linf and ``q = 1`` for L2 (module docstring)."""
  projections.check_norm(norm, projections.TRAINING_NORMS)
  q = x[0].size if norm == "linf" else 1
  return 0.5 * (q * jnp.asarray(eps, x.dtype) ** 2 + 1.0)


def augmented_hessian_product(loss_fn: LossFn, x: Array, z_x: Array, z_t: Array, *,
                              method: str = "fd", h: float = 0.01) -> tuple[Array, Array]:
  """``H~ z`` for the augmented Hessian ``H~ = [[H, g], [g^T, 1]]`` of each example.

  ``H~`` is the Hessian at ``(x, t = 1)`` of ``f(x, t) = t L(x) + t^2 / 2``, whose gradient is
  ``(t grad L(x), L(x) + t)``. ``method="exact"``: ``H~ z = (H z_x + z_t g, g^T z_x + z_t)``
  with :func:`krylov_adv.hvp.exact_hvp`. ``method="fd"``: the forward difference of ``grad f``
  along the unit direction ``u = z / ||z||`` with step ``h`` (so ``h`` is the actual distance
  moved in ``(x, t)``), rescaled by ``||z||``:

      H~ u ~ ( ((1 + h u_t) grad L(x + h u_x) - grad L(x)) / h,
               (L(x + h u_x) - L(x)) / h + u_t ),

  truncation error ``O(h)`` times third derivatives, rounding error ``~ eps_mach / h`` (in
  float32, ``h`` much below ``1e-3`` is mostly rounding; ``h = 0.01`` is our default). Costs one
  extra value-and-gradient beyond the one at ``x``. On a ReLU network the two differ by more
  than truncation: the exact ``H`` holds only the softmax's curvature (the network is piecewise
  linear), while the difference also sees every activation that switches within distance ``h``
  (measured on the untrained TinyCNN, 8x8 inputs, Linf 0.1: mean SOAR value 0.95 / 1.13 / 1.57
  at ``h`` = 0.1 / 0.01 / 0.001 against 0.63 exact; with softplus all agree to 1e-3). The
  authors' networks are ReLU ResNets trained with the difference.

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode.
    x: float ``(B, ...)``.
    z_x: ``(B, ...)`` like ``x``, the input part of ``z``; z_t: ``(B,)``, its last coordinate.
    method: ``"fd"`` or ``"exact"``.
    h: difference step (> 0), ``"fd"`` only.

  Returns:
    ``(top (B, ...), bottom (B,))``: the two blocks of ``H~ z`` per example.
  """
  if method == "exact":
    _, g = _value_and_input_grad(loss_fn, x)
    hz = hvp_lib.exact_hvp(loss_fn, x, z_x)
    return hz + projections.bcast(z_t, g) * g, _dot(g, z_x) + z_t
  if method != "fd":
    raise ValueError(f"unknown SOAR product {method!r}; use one of {SOAR_HVPS}")
  if isinstance(h, (int, float)) and not h > 0:
    raise ValueError(f"finite-difference step h must be > 0, got {h}")
  r = jnp.sqrt(_dot(z_x, z_x) + z_t * z_t)
  r_safe = jnp.maximum(r, 1e-30)
  u_x, u_t = z_x / projections.bcast(r_safe, z_x), z_t / r_safe
  l0, g0 = _value_and_input_grad(loss_fn, x)
  l1, g1 = _value_and_input_grad(loss_fn, x + h * u_x)
  top = ((1.0 + h * projections.bcast(u_t, g1)) * g1 - g0) / h
  bottom = (l1 - l0) / h + u_t
  return top * projections.bcast(r, top), bottom * r


def soar_regularizer(loss_fn: LossFn, x: Array, key: Array, *, eps, norm: str, h: float = 0.01,
                     method: str = "fd", num_samples: int = 1, norm_clip=None) -> Array:
  """SOAR's regulariser ``1/2 (q eps^2 + 1) ||H~ z||_2`` per example (module docstring, (SOAR)).

  With ``num_samples = n > 1`` the Frobenius estimate is ``sqrt(mean_k ||H~ z_k||^2)``
  (``E ||H~ z||^2 = ||H~||_F^2`` for ``z ~ N(0, I_{d+1})``); SOAR uses one sample.

  ``norm_clip = (lo, hi)`` (the authors' option, ``[0, 10]`` in their defaults; its body is not
  public, so the meaning is ours): the per-example norm estimate is clamped,
  ``clip(||H~ z||_2, lo, hi)``, before the radius factor, with ``jnp.clip``'s gradient (zero
  outside ``[lo, hi]``, as ``torch.clamp``'s). Why this reading: a clip named after a norm with
  a lower end of 0 only makes sense on a non-negative quantity, and the norm is the one SOAR
  computes; clamping it bounds each example's penalty at ``1/2 (q eps^2 + 1) hi`` and stops the
  examples whose Hessian estimate explodes from steering the parameter gradient (without a
  bound the regulariser's gradient was ~140 times the cross-entropy's at initialisation on
  Fashion-MNIST, and training collapsed to a constant classifier). ``None`` or ``()``: off.

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode; differentiable in
      what it closes over.
    x: float ``(B, ...)``, the point of the Taylor expansion (SOAR: the one-step PGD point).
    key: PRNG key for ``z``.
    eps: ball radius; norm: ``"linf" | "l2"`` (``q = d`` or ``1``).
    h: difference step of :func:`augmented_hessian_product`; method: ``"fd" | "exact"``.
    num_samples: Gaussian probes per example (static int >= 1).
    norm_clip: ``None``, ``()`` or ``(lo, hi)`` with ``0 <= lo <= hi``: the clamp above.

  Returns:
    ``(B,)`` of ``x``'s dtype, >= 0.
  """
  if int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(f"num_samples must be an integer >= 1, got {num_samples}")

  def one_sample(i, sq):
    kx, kt = jax.random.split(jax.random.fold_in(key, i))
    z_x = jax.random.normal(kx, x.shape, x.dtype)
    z_t = jax.random.normal(kt, x.shape[:1], x.dtype)
    top, bottom = augmented_hessian_product(loss_fn, x, z_x, z_t, method=method, h=h)
    return sq + _dot(top, top) + bottom * bottom

  sq = jax.lax.fori_loop(0, int(num_samples), one_sample, jnp.zeros(x.shape[:1], x.dtype))
  estimate = jnp.sqrt(sq / int(num_samples))
  if norm_clip is not None and len(norm_clip):
    lo, hi = (float(v) for v in norm_clip)
    if not 0 <= lo <= hi:
      raise ValueError(f"norm_clip must be (lo, hi) with 0 <= lo <= hi, got {norm_clip}")
    estimate = jnp.clip(estimate, lo, hi)
  return soar_scale(x, eps, norm) * estimate


def soar_expansion_point(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps,
                         norm: str, init: str = "pgd1", init_step_size=None) -> Array:
  """The point ``x'`` where SOAR expands the loss (``stop_gradient``-ed), ``(B, ...)``.

  ``init="pgd1"`` (the authors' setting): ``x' = Proj(x0 + a step(grad CE(x0)))`` with ``x0``
  uniform in the ball and ``a = init_step_size`` (default ``eps / 4``, their ``2/255`` for
  ``8/255``), i.e. :func:`krylov_adv.attacks.fgsm` with ``random_start``;
  ``init="none"``: ``x' = x``.

  Args:
    logits_fn: ``(B, ...) in [0, 1] -> (B, K)``, inference mode (the attack's view).
    x: float ``(B, ...)`` in ``[0, 1]``; y: ``(B,)`` int; key: PRNG key of the random start.
    eps, norm: the threat model; init, init_step_size: as above.
  """
  if init not in SOAR_INITS:
    raise ValueError(f"unknown SOAR init {init!r}; use one of {SOAR_INITS}")
  if init == "none":
    return jax.lax.stop_gradient(x)
  a = eps / 4 if init_step_size is None else init_step_size
  x_exp = attacks.get("fgsm")(logits_fn, x, y, key, eps=eps, norm=norm, step_size=a,
                              random_start=True)
  return jax.lax.stop_gradient(x_exp)


def soar_loss(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps, norm: str,
              lam: float = 1.0, h: float = 0.01, method: str = "fd", num_samples: int = 1,
              init: str = "pgd1", init_step_size=None,
              attack_logits_fn: LogitsFn | None = None) -> Array:
  """The SOAR training objective ``mean CE(f(x'), y) + lam * mean R_SOAR(x')`` (scalar).

  ``x'`` from :func:`soar_expansion_point` (with ``attack_logits_fn``, default ``logits_fn``),
  ``R_SOAR`` from :func:`soar_regularizer` on the cross-entropy of ``logits_fn``; both terms at
  ``x'`` as in the authors' code. Differentiable w.r.t. the parameters ``logits_fn`` closes
  over. ``lam = 1`` and ``h = 0.01`` are our defaults (the published values were not found).

  Args:
    logits_fn: ``(B, ...) in [0, 1] -> (B, K)``, built from the parameters being trained.
    x: float ``(B, ...)`` in ``[0, 1]``; y: ``(B,)`` int; key: PRNG key (start and probes).
    eps, norm: threat model; lam: weight of the regulariser; h, method, num_samples: as in
    :func:`soar_regularizer`; init, init_step_size: :func:`soar_expansion_point`.
    attack_logits_fn: the model as the initialisation attack sees it (e.g. the parameters at
      the start of the step, inference mode); default ``logits_fn``.

  Returns:
    Scalar of ``x``'s dtype.
  """
  k_init, k_z = jax.random.split(key)
  x_exp = soar_expansion_point(logits_fn if attack_logits_fn is None else attack_logits_fn, x,
                               y, k_init, eps=eps, norm=norm, init=init,
                               init_step_size=init_step_size)
  ce = jnp.mean(losses.cross_entropy(logits_fn(x_exp), y))
  r = soar_regularizer(lambda z: losses.cross_entropy(logits_fn(z), y), x_exp, k_z, eps=eps,
                       norm=norm, h=h, method=method, num_samples=num_samples)
  return ce + lam * jnp.mean(r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clip_gradient_norm(tree, max_norm: float):
  """Identity on a pytree (e.g. parameters) whose backward pass clips the cotangent to global
  L2 norm ``<= max_norm``: ``g * min(1, max_norm / ||g||)``.

  Route the parameters of one term through it to clip that term's gradient alone, as the SOAR
  authors' code does for the regulariser (``clip_grad_norm_`` on the regulariser's gradient
  before the cross-entropy's is added; value of ``grad_clip`` not found)::

    loss = ce(params) + lam * reg(clip_gradient_norm(params, grad_clip))
  """
  del max_norm
  return tree


def _clip_fwd(tree, max_norm):
  del max_norm
  return tree, None


def _clip_bwd(max_norm, _, g):
  norm = optax.global_norm(g)
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return (jax.tree_util.tree_map(lambda t: t * scale.astype(t.dtype), g),)


clip_gradient_norm.defvjp(_clip_fwd, _clip_bwd)


# ---------------------------------------------------------------------------------------------
# SCORPIO


class QuadraticMax(NamedTuple):
  """Frank-Wolfe's maximiser of ``Q(delta) = g^T delta + 1/2 delta^T H delta`` over the ball.

  Attributes:
    delta: ``(B, ...)`` the last iterate, ``||delta_i|| <= eps``.
    value: ``(B,)`` ``Q(delta_i)``.
    gap: ``(B,)`` Frank-Wolfe gap ``max_s <grad Q(delta), s - delta> >= 0`` at ``delta``; zero
      at a stationary point of ``Q`` on the ball (first-order optimality), not a bound on the
      distance to the global max (``Q`` need not be concave).
  """
  delta: Array
  value: Array
  gap: Array


def _lmo(v: Array, eps, norm: str) -> Array:
  """Linear maximisation oracle ``argmax_{||s|| <= eps} <v, s>`` per example."""
  return jnp.asarray(eps, v.dtype) * projections.normalize_step(v, norm)


def quadratic_max_frank_wolfe(grad: Array, matvec: Callable[[Array], Array], *, eps, norm: str,
                              steps: int = 5, step_rule: str = "line_search") -> QuadraticMax:
  """Frank-Wolfe ascent on ``Q(delta) = g^T delta + 1/2 delta^T H delta`` over the eps-ball.

  ``delta_0 = 0``; iteration ``k``: ``s = LMO(g + H delta)``, ``delta <- delta + gamma (s -
  delta)``. ``H delta`` is carried along (``H delta_{k+1} = H delta_k + gamma (H s - H
  delta_k)``), so each iteration costs exactly one product ``H s``. ``step_rule``:

  * ``"line_search"``: ``gamma = argmax_{[0, 1]} Q(delta + gamma (s - delta))``, in closed form
    for the quadratic: with ``b = <grad Q(delta), s - delta> >= 0`` and ``c = (s - delta)^T H
    (s - delta)``, ``gamma = min(1, b / -c)`` if ``c < 0`` else ``1``; ``Q`` never decreases.
  * ``"classic"``: ``gamma_k = 2 / (k + 2)`` (Frank and Wolfe; ``gamma_0 = 1``).

  Both make the first iterate ``eps step(g)``.

  Args:
    grad: ``(B, ...)`` per-example ``g``.
    matvec: ``v (B, ...) -> (B, ...)`` per-example ``H v`` (e.g. ``hvp.make_hvp(...).matvec``).
    eps: radius (scalar); norm: ``"linf" | "l2"``.
    steps: number of iterations ``K >= 1`` (= HVPs).
    step_rule: ``"line_search" | "classic"``.

  Returns:
    :class:`QuadraticMax`.
  """
  projections.check_norm(norm, projections.TRAINING_NORMS)
  if step_rule not in SCORPIO_STEP_RULES:
    raise ValueError(f"unknown Frank-Wolfe step rule {step_rule!r}; use {SCORPIO_STEP_RULES}")
  if int(steps) != steps or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps}")
  g = grad

  def body(k, carry):
    delta, h_delta = carry
    grad_q = g + h_delta
    s = _lmo(grad_q, eps, norm)
    h_s = matvec(s)
    d = s - delta
    h_d = h_s - h_delta
    if step_rule == "line_search":
      b = _dot(grad_q, d)
      c = _dot(d, h_d)
      gamma = jnp.where(c < 0, jnp.clip(b / jnp.where(c < 0, -c, 1.0), 0.0, 1.0), 1.0)
    else:
      gamma = jnp.full(g.shape[:1], 2.0 / (k + 2.0), g.dtype)
    gamma = projections.bcast(gamma.astype(g.dtype), g)
    return delta + gamma * d, h_delta + gamma * h_d

  zero = jnp.zeros_like(g)
  delta, h_delta = jax.lax.fori_loop(0, int(steps), body, (zero, zero))
  value = _dot(g, delta) + 0.5 * _dot(delta, h_delta)
  grad_q = g + h_delta
  gap = _dot(grad_q, _lmo(grad_q, eps, norm) - delta)
  return QuadraticMax(delta, value, gap)


def scorpio_maximizer(loss_fn: LossFn, x: Array, *, eps, norm: str, steps: int = 5,
                      step_rule: str = "line_search", hvp: str = hvp_lib.DEFAULT_METHOD,
                      eta: float = hvp_lib.DEFAULT_ETA) -> QuadraticMax:
  """The worst case of the quadratic model (*) of ``loss_fn`` at ``x`` over the eps-ball, by
  :func:`quadratic_max_frank_wolfe` with the gradient and HVPs of
  :func:`krylov_adv.hvp.make_hvp` (``hvp``, ``eta``). Cost: one gradient and ``steps``
  HVPs. Shapes: ``x (B, ...)`` -> :class:`QuadraticMax` with ``(B, ...)`` / ``(B,)`` fields."""
  op = hvp_lib.make_hvp(loss_fn, x, method=hvp, eta=eta)
  return quadratic_max_frank_wolfe(op.grad, op.matvec, eps=eps, norm=norm, steps=steps,
                                   step_rule=step_rule)


def quadratic_model(loss_fn: LossFn, x: Array, delta: Array, *,
                    hvp: str = hvp_lib.DEFAULT_METHOD, eta: float = hvp_lib.DEFAULT_ETA) -> Array:
  """``Q(delta) = g^T delta + 1/2 delta^T H delta`` per example ``(B,)``, differentiable in what
  ``loss_fn`` closes over (one ``jax.jvp`` of the input gradient for the exact methods)."""
  if hvp in ("exact", "exact_linearized"):
    g, h_delta = jax.jvp(jax.grad(lambda z: jnp.sum(loss_fn(z))), (x,), (delta,))
  else:
    op = hvp_lib.make_hvp(loss_fn, x, method=hvp, eta=eta)
    g, h_delta = op.grad, op.matvec(delta)
  return _dot(g, delta) + 0.5 * _dot(delta, h_delta)


def scorpio_regularizer(loss_fn: LossFn, x: Array, *, eps, norm: str, steps: int = 5,
                        step_rule: str = "line_search", hvp: str = hvp_lib.DEFAULT_METHOD,
                        eta: float = hvp_lib.DEFAULT_ETA,
                        search_loss_fn: LossFn | None = None) -> Array:
  """SCORPIO's regulariser ``max_{||delta|| <= eps} Q(delta)`` per example (module docstring).

  The maximiser comes from :func:`scorpio_maximizer` under ``stop_gradient``; the value is
  re-evaluated at it by :func:`quadratic_model`, so the gradient w.r.t. the parameters is
  Danskin's ``dQ(delta*)/dtheta`` and the Frank-Wolfe loop is not differentiated.

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode, differentiable in
      the parameters it closes over.
    x: float ``(B, ...)``; eps, norm: the ball; steps, step_rule: Frank-Wolfe
      (:func:`quadratic_max_frank_wolfe`); hvp, eta: :func:`krylov_adv.hvp.make_hvp`.
    search_loss_fn: the same loss as the search sees it (e.g. built from the parameters at the
      start of a training step, outside the differentiated function, so that the loop is not
      even linearised); default ``loss_fn``.

  Returns:
    ``(B,)`` of ``x``'s dtype (``>= 0`` with the line search, since ``Q(0) = 0``).
  """
  qmax = scorpio_maximizer(loss_fn if search_loss_fn is None else search_loss_fn, x, eps=eps,
                           norm=norm, steps=steps, step_rule=step_rule, hvp=hvp,
                           eta=eta)
  delta = jax.lax.stop_gradient(qmax.delta)
  return quadratic_model(loss_fn, x, delta, hvp=hvp, eta=eta)


def scorpio_loss(logits_fn: LogitsFn, x: Array, y: Array, key: Array | None = None, *, eps,
                 norm: str, lam: float = 1.0, steps: int = 5, step_rule: str = "line_search",
                 hvp: str = hvp_lib.DEFAULT_METHOD, eta: float = hvp_lib.DEFAULT_ETA,
                 search_logits_fn: LogitsFn | None = None) -> Array:
  """The SCORPIO training objective ``mean CE(f(x), y) + lam * mean max Q`` (scalar).

  ``key`` is accepted for the common ``(logits_fn, x, y, key)`` signature and unused (the
  method is deterministic). ``lam = 1``: the objective is the worst-case quadratic model of the
  adversarial loss. Differentiable w.r.t. the parameters ``logits_fn`` closes over;
  ``search_logits_fn`` (default ``logits_fn``) is the model the Frank-Wolfe search sees
  (:func:`scorpio_regularizer`'s ``search_loss_fn``).
  """
  del key
  ce = jnp.mean(losses.cross_entropy(logits_fn(x), y))
  search = None if search_logits_fn is None else (
      lambda z: losses.cross_entropy(search_logits_fn(z), y))
  reg = scorpio_regularizer(lambda z: losses.cross_entropy(logits_fn(z), y), x, eps=eps,
                            norm=norm, steps=steps, step_rule=step_rule, hvp=hvp,
                            eta=eta, search_loss_fn=search)
  return ce + lam * jnp.mean(reg)
