"""Randomized models and Expectation over Transformation (EoT).

A randomized model (dropout left on at test time, input noise, a randomized defence) is
declared as ``attacks.stochastic(fn)`` with ``fn(x (B, ...), key) -> logits (B, K)``. The
declaration is data like any model (:class:`Stochastic` is a pytree whose child is ``fn``), so
``toolkit.as_model`` traces the arrays of ``fn`` (``jax.tree_util.Partial(apply, params)``) and
a second parameter set of the same shapes compiles nothing; :func:`is_stochastic` recognises it,
also inside a jitted core where it is a ``toolkit.TracedModel`` (from its static structure).

Draws are per example: draw ``s`` of example ``i`` is ``fn(x_i[None], k_{i,s})[0]`` with its own
key (:func:`draw`, a ``vmap`` over the batch), so an example's randomness, like its random
start, does not depend on the rest of the batch (AutoAttack re-runs components on subsets) and
examples never interact. Keys are derived, never drawn from a global state: from the attack's
per-example keys (``toolkit.example_keys``) by ``fold_in`` of a stream tag (:data:`DRAW_STREAM`
for the gradients an attack ascends, :data:`CHECK_STREAM` for the predictions its bookkeeping
uses, :data:`JUDGE_STREAM` for ``krylov_adv.evaluation``'s verdict), then of the run, the
iterate and the sample. So the same key gives the same ``x_adv``, and the draws an
evaluation judges with are independent of those the attack ascended.

EoT (Athalye et al. 2018, "Synthesizing robust adversarial examples"; the reference AutoAttack's
``eot_iter``, ``autoattack/autopgd_base.py``): the gradient an attack ascends at ``x`` is the
mean over ``S = eot_samples`` draws,

  ``g(x) = (1 / S) sum_{s < S} grad_x L(fn(x, k_s), y)``,

and, as in the reference, the loss and logits used for the bookkeeping (best loss, "was this
iterate misclassified") are those of the last draw ``s = S - 1`` (:func:`eot_value_and_grad`).
The draws run in a ``lax.fori_loop`` (memory of one gradient, as the reference's loop).

Which attacks take a randomized model (:func:`supports_randomized` marks them;
``toolkit.attack_entry`` refuses the others with :data:`REFUSALS`' reason):
FGSM, PGD, APGD (``apgd``, ``apgd_ce``, ``apgd_dlr``, ``apgd_t``) with ``eot_samples``, and
AutoAttack (``version="rand"``: APGD-CE and APGD-DLR, 20 EoT samples). FAB, Square, S-O, SOAE and
TRADES refuse: see :data:`REFUSALS`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# fold_in tags of the key streams (module docstring); distinct from the restart / run / batch
# numbers folded into the same keys elsewhere (those are small).
DRAW_STREAM = 0x45_6F_54  # the draws whose gradients an attack ascends ("EoT")
CHECK_STREAM = 0x43_48_4B  # the draws of an attack's own predictions ("CHK")
JUDGE_STREAM = 0x4A_44_47  # the draws krylov_adv.evaluation judges x_adv with ("JDG")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["fn"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Stochastic:
  """A randomized model ``fn(x, key) -> logits``, declared as such (:func:`stochastic`).

  A pytree whose one child is ``fn``: the arrays among ``fn``'s leaves are traced by the attacks
  (``toolkit.as_model``), the rest is static. Calling it needs a key:
  ``model(x (B, ...), key) -> (B, K)`` is ``fn(x, key)``; ``model(x)`` raises ``TypeError`` (a
  caller that takes only deterministic models).
  """
  fn: Callable[[Array, Array], Array]

  def __call__(self, x, key=None):
    if key is None:
      raise TypeError("a randomized model (attacks.stochastic) is called as model(x, key); this "
                      "caller takes deterministic models only: attack it with fgsm, pgd, apgd, "
                      "apgd_ce, apgd_dlr, apgd_t (eot_samples) or autoattack(version='rand')")
    return self.fn(x, key)


def stochastic(fn: Callable[[Array, Array], Array]) -> Stochastic:
  """Declares a randomized model: ``fn(x, key) -> logits``, ``x`` ``(B, ...)`` float,
  ``key`` a PRNG key, logits ``(B, K)`` float.

  Pass a pytree callable, e.g. ``jax.tree_util.Partial(apply, params)`` with ``apply(params, x,
  key)``, for the parameters to be traced (a second parameter set compiles nothing); a plain
  function or closure is static, as for deterministic models. Attacks call ``fn`` on one example
  at a time (``x`` of shape ``(1, ...)``, under ``vmap``), each with its own key (:func:`draw`).
  Idempotent.
  """
  if isinstance(fn, Stochastic):
    return fn
  if not callable(fn):
    raise TypeError(f"stochastic() takes a function fn(x, key) -> logits, got "
                    f"{type(fn).__name__}")
  return Stochastic(fn)


def is_stochastic(model) -> bool:
  """Whether ``model`` is a declared randomized model: a :class:`Stochastic`, or a
  ``toolkit.TracedModel`` of one (read from its static tree structure: usable under ``jit``)."""
  if isinstance(model, Stochastic):
    return True
  treedef = getattr(model, "treedef", None)  # a toolkit.TracedModel
  if not isinstance(treedef, jax.tree_util.PyTreeDef):
    return False
  root = treedef.node_data()
  return root is not None and root[0] is Stochastic


def draw(model, x: Array, keys: Array) -> Array:
  """One draw of a randomized model per example: row ``i`` is ``model(x[i:i+1], keys[i])[0]``.

  ``x`` ``(B, ...)``; ``keys`` ``(B, ...)`` per-example PRNG keys (raw ``uint32 (B, 2)`` or typed
  ``(B,)``). Returns logits ``(B, K)``. A ``vmap`` over examples: each example's draw depends on
  its key alone, not on the batch."""
  return jax.vmap(lambda xi, ki: model(xi[None], ki)[0])(x, keys)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["model", "keys"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Drawn:
  """A randomized model at fixed per-example keys: a deterministic ``logits_fn``,
  ``Drawn(model, keys)(x) == draw(model, x, keys)``. A pytree (the model's arrays and the keys
  are leaves), so it is traced like any model; the batch must have ``len(keys)`` examples."""
  model: Any
  keys: Array

  def __call__(self, x):
    return draw(self.model, x, self.keys)


def at_draw(model, keys: Array):
  """``model`` itself when it is deterministic, else :class:`Drawn` ``(model, keys)``: the model
  an attack's bookkeeping predicts with (one draw per example)."""
  return Drawn(model, keys) if is_stochastic(model) else model


@jax.jit
def fold(keys: Array, *data) -> Array:
  """``fold_in(... fold_in(keys[i], data[0]) ..., data[-1])`` for every per-example key:
  ``(B, ...)`` keys, ``data`` int scalars (traced: one compile per key shape and arity)."""
  for d in data:
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, d)
  return keys


def eot_value_and_grad(value_and_grad_of: Callable[[Any], Callable[[Array], tuple]], model,
                       x: Array, keys: Array, samples: int) -> tuple[Any, Array]:
  """EoT of an attack's ``value_and_grad`` over ``samples`` draws (module docstring).

  Args:
    value_and_grad_of: ``m -> (x -> (value, grad))`` for a deterministic model ``m``: the
      attack's own loss and gradient (``value`` any pytree: the loss, its logits, ...).
    model: a randomized model (:func:`is_stochastic`).
    x: ``(B, ...)`` the point. keys: ``(B, ...)`` per-example keys of this evaluation; draw
      ``s`` uses ``fold(keys, s)``.
    samples: ``S >= 1`` (static).

  Returns:
    ``(value, grad)``: the last draw's ``value`` and ``(1 / S) sum_s grad_s`` (summed in the
    order ``s = 0..S-1``, as the reference), of ``x``'s shape.
  """

  def at(s):
    return value_and_grad_of(Drawn(model, fold(keys, s)))(x)

  value, grad = at(samples - 1)
  if samples == 1:
    return value, grad
  total = lax.fori_loop(0, samples - 1, lambda s, acc: acc + at(s)[1], jnp.zeros_like(grad))
  return value, (total + grad) / samples


def eot_grad(loss_of: Callable[[Any], Callable[[Array], Array]], model, x: Array, keys: Array,
             samples: int) -> Array:
  """The EoT gradient ``(1 / S) sum_s grad_x sum_i loss_of(m_s)(x)_i`` of a per-example loss
  (``loss_of(m)``: ``(B, ...) -> (B,)`` for the model ``m``; ``m_s`` the draw ``s``), the
  direction FGSM and PGD ascend on a randomized model. ``(B, ...)``."""

  def value_and_grad_of(m):
    return lambda z: (None, jax.grad(lambda w: jnp.sum(loss_of(m)(w)))(z))

  return eot_value_and_grad(value_and_grad_of, model, x, keys, samples)[1]


# ----------------------------------------------------------------------------------------------
# Which attacks take a randomized model.

# Why an attack without EoT refuses a randomized model (toolkit.attack_entry's message).
REFUSALS = {
    "fab": "FAB linearises the decision boundary at each iterate and searches for a minimal "
           "perturbation by comparing points; with a new draw at every call its steps and its "
           "'is this point adversarial' checks follow the noise (the reference's version='rand' "
           "leaves it out)",
    "square": "Square's random search accepts a candidate whose loss at one draw beats the "
              "current loss at another, so it accepts noise (the reference's version='rand' "
              "leaves it out)",
    "second_order": "S-O averages gradients over Gaussian input noise of its own; the model's "
                    "randomness would need EoT inside each of its samples",
    "soae": "SOAE's Hessian-vector products are differences of gradients at nearby points: "
            "with a new draw per gradient the difference is the noise over the finite-difference "
            "step, and the Newton system is meaningless",
    "trades": "TRADES is a training attack on the KL divergence to the clean prediction, which "
              "is not zero at x itself for a randomized model",
}


def supports_randomized(attack: Callable[..., Any]) -> Callable[..., Any]:
  """Marks ``attack`` (a public entry, before ``toolkit.attack_entry`` wraps it) as taking
  randomized models; ``toolkit.attack_entry`` refuses a randomized model for the others."""
  attack.supports_randomized = True
  return attack


def check_supported(attack: Callable[..., Any], model) -> None:
  """Raises ``ValueError`` when ``model`` is randomized (:func:`is_stochastic`) and ``attack``
  is not marked by :func:`supports_randomized`, with the reason from :data:`REFUSALS`."""
  if not is_stochastic(model) or getattr(attack, "supports_randomized", False):
    return
  name = attack.__name__.removesuffix("_with_report")
  reason = REFUSALS.get(name) or REFUSALS.get(name.split("_")[0],  # fab_t: fab's reason
                                              "it has no Expectation over Transformation")
  raise ValueError(f"{attack.__name__} does not attack randomized models (attacks.stochastic): "
                   f"{reason}. Attack it with fgsm, pgd, apgd, apgd_ce, apgd_dlr or apgd_t "
                   f"(eot_samples) or autoattack(version='rand')")
