"""Hessian-vector products of a per-example loss w.r.t. the *input*.

Conventions
-----------
``loss_fn`` maps a batch ``x`` of shape ``(B, ...)`` to per-example losses of shape ``(B,)``.
Every product here differentiates the *summed* loss ``S(x) = sum_i loss_fn(x)_i``.

Block-diagonal assumption. With the model in inference mode (BatchNorm using its running
statistics, no dropout) example ``i``'s loss depends on ``x_i`` alone, so ``d^2 S / dx_i dx_j = 0``
for ``i != j`` and the Hessian of ``S`` w.r.t. the batch is block diagonal with blocks
``H_i = d^2 loss_i / dx_i^2``. One batched product ``H_S v`` therefore returns every example's
``H_i v_i`` at the cost of a single (batched) forward/backward pass. A model in *training* mode
(batch statistics) breaks this; callers must put the model in inference mode before building
``loss_fn``.

The finite-difference products implement the SOAE paper's Algorithm 1 step 3 / Eq. (22),
``H v ~ (grad L(x + eta v) - grad L(x)) / eta``, and the central variant
``(grad L(x + eta v) - grad L(x - eta v)) / (2 eta)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[[Array], Array]
Matvec = Callable[[Array], Array]

# The HVP methods by name (the names configs use), and the finite-difference scheme of each FD
# method, passed to :func:`fd_hvp` as is (a name never has to be sliced apart).
HVP_METHODS = ("exact", "exact_linearized", "fd_forward", "fd_central")
FD_SCHEMES = {"fd_forward": "forward", "fd_central": "central"}
# The one default HVP method and finite-difference step of the library (SOAE, the quadratic
# regularizers, make_hvp): the exact product, and the SOAE paper's eta = 1e-5 (Sec. IV-D,
# "eta <= 1e-5"). In float32 a forward difference at eta = 1e-5 is mostly rounding noise
# (~1% error per product, ``eps_mach / eta``); pass a larger eta (~1e-3) with an FD method in
# float32, or use the exact product.
DEFAULT_METHOD = "exact"
DEFAULT_ETA = 1e-5


def _summed(loss_fn: LossFn) -> Callable[[Array], Array]:
  """Scalar ``S(x) = sum_i loss_fn(x)_i``; its gradient is the batch of per-example gradients."""

  def total(x):
    losses = loss_fn(x)
    if losses.ndim != 1 or losses.shape[0] != x.shape[0]:
      raise ValueError(
          f"loss_fn must map a batch of shape (B, ...) to per-example losses (B,); "
          f"got x {x.shape} -> loss {losses.shape}")
    return jnp.sum(losses)

  return total


def input_grad(loss_fn: LossFn, x: Array) -> Array:
  """Per-example input gradient ``grad_x loss_i(x_i)``.

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode.
    x: float array ``(B, ...)``.

  Returns:
    Array of ``x``'s shape and dtype: row ``i`` is ``d loss_i / d x_i`` (block-diagonal
    assumption, module docstring).
  """
  return jax.grad(_summed(loss_fn))(x)


def exact_hvp(loss_fn: LossFn, x: Array, v: Array) -> Array:
  """Exact per-example Hessian-vector product by forward-over-reverse differentiation.

  Computes ``H_i v_i`` for every example with one ``jax.jvp`` of ``jax.grad``:
  ``d/dt grad S(x + t v) |_{t=0} = H_S v``, and ``H_S`` is block diagonal (module docstring).

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode.
    x: float array ``(B, ...)``, the point at which the Hessian is taken.
    v: array of ``x``'s shape and dtype, one direction per example.

  Returns:
    Array of ``x``'s shape: row ``i`` is ``H_i v_i``.
  """
  _check_same_shape(x, v)
  return jax.jvp(jax.grad(_summed(loss_fn)), (x,), (v,))[1]


def fd_hvp(loss_fn: LossFn, x: Array, v: Array, *, eta: float, scheme: str = "forward",
           grad_x: Array | None = None) -> Array:
  """Finite-difference per-example Hessian-vector product (SOAE paper, Eq. 22).

  ``scheme="forward"``: ``(grad L(x + eta v) - grad L(x)) / eta`` (Algorithm 1 step 3),
  truncation error ``O(eta ||v||^2)``; with ``grad_x`` given it costs one extra gradient.
  ``scheme="central"``: ``(grad L(x + eta v) - grad L(x - eta v)) / (2 eta)``, truncation error
  ``O(eta^2 ||v||^3)``, two gradients. ``eta`` multiplies ``v`` as in the paper, so the actual
  step is ``eta ||v_i||`` per example; GMRES only ever applies the operator to unit vectors
  (plus the start vector), where the two coincide. Rounding error grows like ``eps_mach / eta``:
  in float32 an eta much below ~1e-3 is dominated by it.

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode.
    x: float array ``(B, ...)``.
    v: array of ``x``'s shape, one direction per example.
    eta: difference step, > 0.
    scheme: ``"forward"`` or ``"central"``.
    grad_x: optional precomputed ``input_grad(loss_fn, x)``, reused by the forward scheme.

  Returns:
    Array of ``x``'s shape: row ``i`` approximates ``H_i v_i``.
  """
  _check_same_shape(x, v)
  _check_eta(eta)
  grad_fn = jax.grad(_summed(loss_fn))
  if scheme == "forward":
    g0 = grad_fn(x) if grad_x is None else grad_x
    return (grad_fn(x + eta * v) - g0) / eta
  if scheme == "central":
    return (grad_fn(x + eta * v) - grad_fn(x - eta * v)) / (2.0 * eta)
  raise ValueError(f"unknown finite-difference scheme {scheme!r}; use 'forward' or 'central'")


class HVPOperator(NamedTuple):
  """The input gradient at ``x`` and a batched Hessian matvec at ``x``.

  Attributes:
    grad: ``(B, ...)`` per-example input gradient at ``x``.
    matvec: ``v (B, ...) -> (B, ...)``, row ``i`` being ``H_i v_i`` (exact or approximate).
  """
  grad: Array
  matvec: Matvec


def make_hvp(loss_fn: LossFn, x: Array, *, method: str = DEFAULT_METHOD,
             eta: float = DEFAULT_ETA) -> HVPOperator:
  """Builds the gradient and a batched Hessian matvec at ``x``, the method chosen by name.

  ``method`` (usable from configs):
    * ``"exact"``: :func:`exact_hvp` (``jax.jvp`` over ``jax.grad``) per product, a small
      multiple of a gradient's cost that depends on the model, batch and platform (measured
      per model by ``experiments.costs.measure_hvp_cost``; a table records its one number in
      ``hvp_cost.json``).
    * ``"exact_linearized"``: ``jax.linearize`` of ``grad S`` at ``x``: the primal pass is done
      once and each product evaluates only the linear (tangent) part. Same values as
      ``"exact"``; measured 0.6 gradients per product on an H100 but ~6 on XLA:CPU (whose
      linearised convolutions are slow), so it is an opt-in for accelerators.
    * ``"fd_forward"``: Eq. (22) reusing the gradient at ``x``, one extra gradient per product.
    * ``"fd_central"``: the central difference, two gradients per product.

  Args:
    loss_fn: ``(B, ...) -> (B,)`` per-example loss, model in inference mode (block-diagonal
      Hessian, module docstring).
    x: float array ``(B, ...)``.
    method: one of ``HVP_METHODS`` (default ``DEFAULT_METHOD``, ``"exact"``).
    eta: finite-difference step (> 0, default ``DEFAULT_ETA = 1e-5``, the SOAE paper's; mostly
      rounding noise in float32, see ``DEFAULT_ETA``), ignored by the exact methods.

  Returns:
    ``HVPOperator(grad, matvec)``.
  """
  if method not in HVP_METHODS:
    raise ValueError(f"unknown HVP method {method!r}; choose one of {HVP_METHODS}")
  if method == "exact_linearized":
    grad, matvec = jax.linearize(jax.grad(_summed(loss_fn)), x)
    return HVPOperator(grad, matvec)
  if method == "exact":
    return HVPOperator(input_grad(loss_fn, x), lambda v: exact_hvp(loss_fn, x, v))
  scheme = FD_SCHEMES[method]
  _check_eta(eta)
  grad = input_grad(loss_fn, x)

  def matvec(v):
    return fd_hvp(loss_fn, x, v, eta=eta, scheme=scheme, grad_x=grad)

  return HVPOperator(grad, matvec)


def _check_same_shape(x: Array, v: Array) -> None:
  if x.shape != v.shape:
    raise ValueError(f"direction v must have the shape of x: x {x.shape}, v {v.shape}")


def _check_eta(eta) -> None:
  # eta is a Python number from a config; a traced eta is accepted unchecked.
  if isinstance(eta, (int, float)) and not 0 < eta < float("inf"):
    raise ValueError(f"finite-difference step eta must be a finite number > 0, got {eta}")
