"""One job: the library user's page on the attacks, ``docs/attacks.md``, generated so it cannot drift.

  python -m experiments.attack_docs            # rewrites docs/attacks.md
  python -m experiments.attack_docs --check    # exit 1 when docs/attacks.md is out of date

Per registered attack (``krylov_adv.attacks.available()``) one line: its paper, its
hyperparameters with their defaults read from ``inspect.signature`` of the attack (the one place
each default lives), and its cost in gradient-equivalents per example. The paper and the cost
are not in a signature, so they are in :data:`ATTACKS` below; ``tests/test_attack_docs.py``
fails when an attack is registered without an entry here, when ``docs/attacks.md`` differs from
what this module generates, or when a listed default differs from the signature.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from typing import NamedTuple

from krylov_adv import attacks
from krylov_adv.attacks import _eot


class AttackDoc(NamedTuple):
  """What a signature cannot say: the attack's paper and its cost per example, in gradient
  evaluations (one forward plus one backward pass) written with its hyperparameters."""
  paper: str
  cost: str


# The papers in shared/papers: 000 is the SOAE paper, 004 the S-O paper.
ATTACKS: dict[str, AttackDoc] = {
    "fgsm": AttackDoc("Goodfellow et al. 2015, FGSM", "1"),
    "pgd": AttackDoc("Madry et al. 2018, PGD", "steps * restarts"),
    "second_order": AttackDoc(
        "Li et al. 2019, the S-O paper (Eq. 4; shared/papers/004): PGD on gradients averaged "
        "over Gaussian-perturbed inputs",
        "steps * samples (form='expectation'; steps with form='power')"),
    "soae": AttackDoc(
        "Qian et al., the SOAE paper (Algorithm 1; shared/papers/000): Krylov-Newton steps, "
        "GMRES on H d = g with Hessian-vector products",
        "at most steps * (1 + (m + 2) * c), c the HVP's cost in gradients (1 for fd_forward, 2 "
        "for fd_central; for exact, the ratio experiments.costs.measure_hvp_cost measures on "
        "the model, recorded in a table's hvp_cost.json): per outer step one gradient, one HVP "
        "for r_0, one per "
        "Krylov vector and one for the true residual; a batch pays for its largest Krylov "
        "dimension"),
    "trades": AttackDoc("Zhang et al. 2019, TRADES (Algorithm 1 lines 5-7)", "steps"),
    "apgd_ce": AttackDoc("Croce and Hein 2020, AutoAttack's APGD-CE", "steps * restarts"),
    "apgd_dlr": AttackDoc("Croce and Hein 2020, AutoAttack+'s APGD-DLR", "steps * restarts"),
    "apgd_t": AttackDoc("Croce and Hein 2020, AutoAttack's APGD-T (targeted DLR)",
                        "steps * restarts * n_target_classes"),
    "fab": AttackDoc("Croce and Hein 2020, FAB (untargeted)",
                     "steps * restarts * K (the Jacobian of the K logits per step)"),
    "fab_t": AttackDoc("Croce and Hein 2020, AutoAttack's FAB-T",
                       "steps * restarts * n_target_classes"),
    "square": AttackDoc("Andriushchenko et al. 2020, Square Attack (score-based)",
                        "0 gradients: steps forward passes (about steps / 3)"),
    "autoattack": AttackDoc(
        "Croce and Hein 2020, AutoAttack",
        "the sum of its components' costs, each on the points still robust; standard: APGD-CE "
        "(100) + APGD-T (9 * 100) + FAB-T (9 * 100) + Square (5000 forward passes), i.e. up "
        "to about 3600 on a robust point"),
}

# The page's opening: how to hand a model to the attacks, one runnable block per family
# (tests/test_attack_docs.py executes every ```python block of the page).
MODELS_AS_DATA = """\
## Your model, its parameters as data

An attack takes `logits_fn(x) -> logits`; pass a *pytree callable* whose arrays are the
parameters (`krylov_adv.models.as_logits_fn`, or any `jax.tree_util.Partial(apply_fn, params)`).
The attacks' jitted steps then trace the parameters instead of baking them in as constants: a
second checkpoint, seed or fine-tuned copy of the same architecture and input shape reuses
every compiled attack. One way per model family:

Flax linen (the variables dict, BatchNorm statistics included; `apply` keyword arguments select
inference mode):

```python
import flax.linen as nn
import jax
import jax.numpy as jnp
from krylov_adv import attacks, models

class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(10)(x)

x = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1))   # images in [0, 1]
y = jnp.arange(8) % 10
module = Net()
for seed in (0, 1):  # the second parameter set compiles nothing
  variables = module.init(jax.random.PRNGKey(seed), x)
  logits_fn = models.as_logits_fn(module, variables, train=False)
  x_adv = attacks.pgd(logits_fn, x, y, jax.random.PRNGKey(1), eps=0.1, norm="linf", steps=5)
```

Flax NNX (split into a static graph definition and a traced state; the adapter calls `.eval()`
on a copy, so Dropout is off and BatchNorm uses its running averages):

```python
import jax
import jax.numpy as jnp
from flax import nnx
from krylov_adv import attacks, models

class Net(nnx.Module):
  def __init__(self, rngs):
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.linear = nnx.Linear(784, 10, rngs=rngs)
  def __call__(self, x):
    return self.linear(self.dropout(x.reshape(x.shape[0], -1)))

x = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1))
y = jnp.arange(8) % 10
logits_fn = models.as_logits_fn(Net(nnx.Rngs(0)))
x_adv = attacks.apgd_ce(logits_fn, x, y, jax.random.PRNGKey(1), eps=0.1, norm="linf", steps=5)
```

Equinox (a model of ONE example, vmapped over the batch; `equinox.nn.inference_mode` applied):

```python
import equinox as eqx
import jax
import jax.numpy as jnp
from krylov_adv import attacks, models

class Net(eqx.Module):
  mlp: eqx.nn.MLP
  def __call__(self, xi):                      # xi: (28, 28, 1)
    return self.mlp(xi.reshape(-1))

x = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1))
y = jnp.arange(8) % 10
net = Net(eqx.nn.MLP(784, 10, 32, 1, key=jax.random.PRNGKey(2)))
x_adv = attacks.fgsm(models.as_logits_fn(net), x, y, jax.random.PRNGKey(1), eps=0.1,
                     norm="linf")
```

What compiles: each attack's jitted steps compile once per architecture (the static part of the
pytree, compared by value: equal Flax modules, one NNX graph definition, one Equinox structure),
input shape, batch size and static hyperparameter (norm, steps, ...); the parameter values never
recompile. A plain Python function or closure is static: it compiles once per function object,
and a new `lambda` (or `jax.jit(...)` wrapper) per call recompiles every attack, with the
parameters it closes over baked in as constants. AutoAttack additionally compiles one shape per
still-robust subset size (bucketed), so a model that leaves other points robust can compile a
few more shapes. An eager call runs cheap checks on the model once per parameter set (a softmax
output, a randomized model: `krylov_adv.attacks.checks.ModelWarning`).
"""

# L1 in each attack (every attack takes linf and l2, and the box `bounds`).
L1_SUPPORT: dict[str, str] = {
    "fgsm": "the sparse sign step (top 1% of |g|, SLIDE) projected onto the L1 ball and box",
    "pgd": "the sparse sign step (top 1% of |g|, SLIDE), exact projection onto ball and box",
    "second_order": "the sparse sign step on the smoothed gradient (not in the paper)",
    "soae": "direction='newton' through the sparse sign step (not in the paper); the "
            "trust-region direction refuses L1",
    "trades": "the sparse sign step on the KL gradient",
    "apgd_ce": "l1-APGD ('Mind the box': adaptive sparsity, no momentum; `use_largereps` for "
               "the 3 eps / 2 eps / eps schedule)",
    "apgd_dlr": "l1-APGD, as apgd_ce",
    "apgd_t": "l1-APGD, as apgd_ce",
    "fab": "the exact minimal-L1 step onto the hyperplane in the box (greedy by |w_i|)",
    "fab_t": "as fab",
    "square": "the reference code's L1 windows, projected onto the L1 ball and box",
    "autoattack": "standard: APGD-CE (5 restarts) and APGD-T (5 targets) with `use_largereps`, "
                  "FAB-T, Square, as the reference's `set_version`",
}

THREAT_MODELS = """## Threat models: norms and the input box

Every attack takes `norm="linf" | "l2" | "l1"` and `bounds=(lo, hi)`, the box admissible inputs
live in (default `(0, 1)`): scalars, or arrays broadcastable to `x` (per channel `(C,)` for a
standardised model). Every projection, random start and clip keeps `x_adv` inside it, `x`
outside it is a `ValueError`, and the box is traced data (another box of the same shape compiles
nothing). A model that standardises its input, `z = (x - mu) / s`, is attacked in `z` with
`bounds=((0 - mu) / s, (1 - mu) / s)` and `eps / s` (scalar `s`: the same threat model as `eps`
in pixels; `tests/test_threat_models.py` checks every attack gives the same robust points,
except SOAE: Algorithm 1 starts GMRES at `d_0 = g`, which in `z` is the pixel-space solve
started from `s^2 g`, so SOAE depends on the input scale):

```python
import jax
import jax.numpy as jnp
import numpy as np
from krylov_adv import attacks

mu, s = np.array([0.49, 0.48, 0.45], np.float32), 0.25     # per-channel mean, one scale
w = jax.random.normal(jax.random.PRNGKey(0), (8 * 8 * 3, 10)) * 0.1
logits_fn = jax.tree_util.Partial(lambda w, z: z.reshape(z.shape[0], -1) @ w, w)
x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3))   # pixels in [0, 1]
y = jnp.argmax(logits_fn((x - mu) / s), axis=1)
z_adv = attacks.apgd_ce(logits_fn, (x - mu) / s, y, jax.random.PRNGKey(2), eps=8 / 255 / s,
                        norm="linf", steps=10, bounds=((0 - mu) / s, (1 - mu) / s))
```

L1 in each attack:

""" + "\n".join(f"- `{name}`: {text}" for name, text in L1_SUPPORT.items()) + "\n"

# A randomized model: how to declare it, which attacks take it, how it is judged.
RANDOMIZED = """\
## A randomized model

A model with randomness at test time (dropout left on, input noise, a randomized defence) is
declared with `attacks.stochastic(fn)`, `fn(x, key) -> logits`; like any model, its arrays are
traced when `fn` is a pytree callable. Attacks that take one average each gradient over
`eot_samples` draws (Expectation over Transformation), with keys derived from the attack's key:
the same key gives the same `x_adv`. `attacks.autoattack(..., version="rand")` is the reference's
randomized version (APGD-CE and APGD-DLR, one restart, 20 draws per gradient). The evaluation
judges a randomized model's accuracy as the mean over `draws` draws (recorded in the result).
The draws change only the gradients and the predictions: EoT takes every norm and box of the
threat-model section above (`norm="l1"`, `bounds=(lo, hi)`), and every `x_adv` is checked
against the ball and the box as for a deterministic model. An undeclared randomized model gets a
`ModelWarning` pointing here.

```python
import jax
import jax.numpy as jnp
from krylov_adv import attacks, evaluation

def apply(params, x, key):                      # dropout (p = 0.5) left on at test time
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"])
  keep = jax.random.bernoulli(key, 0.5, h.shape)
  return jnp.where(keep, 2.0 * h, 0.0) @ params["w2"]

k1, k2 = jax.random.split(jax.random.PRNGKey(2))
params = {"w1": jax.random.normal(k1, (784, 32)) / 28, "w2": jax.random.normal(k2, (32, 10))}
model = attacks.stochastic(jax.tree_util.Partial(apply, params))
x = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1))
y = jnp.arange(8) % 10
x_adv = attacks.apgd_ce(model, x, y, jax.random.PRNGKey(1), eps=0.1, norm="linf", steps=5,
                        eot_samples=4)
attack = attacks.from_config(dict(name="apgd_ce", eps=0.1, norm="linf", steps=5,
                                  eot_samples=4))
acc = evaluation.robust_accuracy(model, attack, x, y, jax.random.PRNGKey(1), eps=0.1,
                                 norm="linf", draws=10)   # mean over 10 draws per point
```
"""


def randomized(name: str) -> str:
  """What the attack does with a randomized model: EoT, or its refusal with the reason (read
  from the code: ``_eot.supports_randomized`` and ``_eot.REFUSALS``)."""
  attack = attacks.get(name)
  if getattr(attack, "supports_randomized", False):
    return ("EoT (`eot_samples`)" if "eot_samples" in inspect.signature(attack).parameters
            else "`version='rand'`")
  reason = _eot.REFUSALS.get(name) or _eot.REFUSALS[name.split("_")[0]]
  return f"refused ({reason})"


_SKIP = ("logits_fn", "x", "y", "key", "eps", "norm", "example_index", "bounds")
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "attacks.md")


def hyperparameters(name: str) -> dict[str, object]:
  """``{hyperparameter: default}`` of the registered attack ``name`` from its signature
  (``None``: computed from eps, see the attack's docstring)."""
  params = inspect.signature(attacks.get(name)).parameters.values()
  return {p.name: p.default for p in params
          if p.name not in _SKIP and p.kind is inspect.Parameter.KEYWORD_ONLY}


def attack_line(name: str) -> str:
  """The page's line for one attack."""
  doc = ATTACKS[name]
  defaults = ", ".join(f"`{k}={v!r}`" for k, v in hyperparameters(name).items())
  return (f"- **`{name}`**: {summary(name)}. Paper: {doc.paper}. Hyperparameters (defaults): "
          f"{defaults or 'none'}. Cost (gradient-equivalents per example): {doc.cost}. "
          f"Randomized models: {randomized(name)}.")


def summary(name: str) -> str:
  """The first paragraph of the attack's docstring, in markdown."""
  text = inspect.getdoc(attacks.get(name)) or ""
  first = " ".join(text.split("\n\n")[0].split())
  first = re.sub(r":\w+:`([^`]+)`", r"`\1`", first).replace("``", "`")
  return first.rstrip(".;")


def page() -> str:
  """The whole of ``docs/attacks.md``."""
  missing = [n for n in attacks.available() if n not in ATTACKS or n not in L1_SUPPORT]
  if missing:
    raise KeyError(f"attacks without an entry in experiments.attack_docs.ATTACKS or "
                   f"L1_SUPPORT: {missing}")
  lines = [
      "# Attacks",
      "",
      "Generated by `python -m experiments.attack_docs` from the registry and the attacks' "
      "signatures (do not edit by hand; `tests/test_attack_docs.py` checks it).",
      "",
      "Every attack is `attacks.NAME(logits_fn, x, y, key, *, eps, norm, ...) -> x_adv` "
      "(`krylov_adv/attacks/__init__.py`); `None` defaults are computed from eps (step sizes "
      "`2.5 eps / steps`, FGSM's `eps`, SOAE's `alpha = eps`). A gradient-equivalent is one "
      "forward and one backward pass of the model on one example.",
      "",
      MODELS_AS_DATA,
      THREAT_MODELS,
      RANDOMIZED,
      "## The attacks",
      "",
  ]
  lines += [attack_line(n) for n in attacks.available()]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  text = page()
  if "--check" in argv:
    with open(PATH) as f:
      if f.read() != text:
        print(f"{PATH} is out of date: run python -m experiments.attack_docs", file=sys.stderr)
        return 1
    return 0
  os.makedirs(os.path.dirname(PATH), exist_ok=True)
  with open(PATH, "w") as f:
    f.write(text)
  print(PATH)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
