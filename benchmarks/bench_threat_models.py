"""Benchmark: threat models (issue 24) on the digits TinyCNN: L1 AutoAttack per component beside
the reference, and the standardised-model agreement of every attack and norm (JSON out).

  python -m benchmarks.bench_threat_models [--points 100] [--steps 300] [--eps-l1 1.0 2.0]
        [--reference /work/.mirror/fra31+auto-attack/repo] [--fast]
        [--sections l1,agreement,rand] [--out benchmarks/results/threat_models.json]

One set of weights: a TinyCNN trained as ``bench_autoattack`` trains it
(:func:`benchmarks.bench_autoattack.train_digits_params`, ``--steps`` Adam steps on scikit-learn
digits, 8x8x1 in ``[0, 1]``, no defence); the points are the first ``--points`` test digits it
classifies correctly. Three sections:

* ``l1``: for each L1 budget (``--eps-l1``, default 1.0 and 2.0: a few pixels' worth on 8x8, where
  the undefended model is neither unbroken nor fully broken) ours ``attacks.autoattack_with_report
  (..., norm="l1")`` (the reference's standard L1 settings, ``_autoattack.L1_STANDARD``: APGD-CE 5
  restarts and APGD-T 5 targets, both ``use_largereps``, FAB-T 9 targets, Square 5000 queries,
  100 iterations each), robust accuracy after each component and its seconds (compilation
  included), beside L1 APGD-CE alone (1 restart, no ``use_largereps``). With ``--reference PATH``
  (a git directory holding fra31/auto-attack; its ``autoattack/*.py`` are extracted to a temporary
  folder put on ``sys.path``, nothing installed) the reference runs on the same weights
  (:func:`benchmarks.bench_autoattack.torch_tiny_cnn`, whose logits must agree to 1e-5) and
  points: ``AutoAttack(net, norm='L1', eps=eps, version='standard', seed)``'s
  ``run_standard_evaluation`` on one batch, its per-component robust accuracy and cumulative time
  parsed from its log, plus its ``APGDAttack`` alone with our APGD-CE-alone settings. It needs CPU
  ``torch`` (the ``bench`` extra); without it, or without ``--reference``, only our side runs.
* ``agreement``: for every attack of ours (fgsm, pgd, second_order, soae, trades, apgd_ce,
  apgd_t, fab_t, square, autoattack) and norm (linf 0.1, l2 0.5, L1 the first ``--eps-l1``): the
  robust accuracy of ``f`` attacked in ``[0, 1]`` with ``eps`` and of ``g(z) = f(z * s + mu)``
  (MNIST's ``s = 0.3081``, ``mu = 0.1307``) attacked in ``z`` with ``bounds = ((0 - mu) / s,
  (1 - mu) / s)`` and ``eps / s`` (S-O's absolute noise ``sigma`` scaled by ``1 / s`` too), and
  ``max |z_adv * s + mu - x_adv|``, with the attacks' default hyperparameters. The box of ``z``
  is computed with ``z``'s own float32 arithmetic (``(0 - mu) / s`` in float64 lies 4e-8 above
  ``z`` at a pixel 0, and an attack refuses ``x`` outside its box). Rounding alone separates the
  two runs, except where an attack is not scale-invariant: SOAE's GMRES starts from ``d_0 = g``
  and stops at ``tau ||r_0||``, which in ``z`` is the ``x``-space solve started from ``s^2 g``,
  so its direction (and robust accuracy) changes with ``s`` (a pure shift, ``s = 1``, agrees).
  L1-APGD's and FAB's discrete choices (top-k coordinates, active faces) turn rounding into
  different iterates, with the same robust points.
* ``rand``: a randomized model (:class:`DropoutTinyCNN`: dropout 0.3 on the hidden units,
  trained with it and left on at test time, declared with ``attacks.stochastic``), ours
  ``autoattack(version="rand")`` (APGD-CE and APGD-DLR, 1 restart, 20 EoT samples) beside the
  reference's ``AutoAttack(..., version='rand')`` (``eot_iter`` 20) on the same weights, Linf 0.1
  and L1 1.0: each library's single-draw accuracy after each component, and the robust accuracy
  of its ``x_adv`` over 100 draws (:func:`rand_section`).

``--fast``: reduced settings for a loaded machine (:data:`FAST_L1` on both sides, e.g. 20 APGD /
FAB iterations and 500 Square queries; :data:`FAST_AGREEMENT`); the JSON records the settings
that ran. ``load_average`` (1, 5, 15 min) is recorded beside every section's seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from krylov_adv import attacks, models, projections
from krylov_adv.attacks import _autoattack as aa
from benchmarks.bench_autoattack import _accuracy, train_digits_params, torch_tiny_cnn

# MNIST's standardisation, the usual ``Normalize((0.1307,), (0.3081,))`` in front of a network.
SCALE, MEAN = 0.3081, 0.1307
AGREEMENT_ATTACKS = ("fgsm", "pgd", "second_order", "soae", "trades", "apgd_ce", "apgd_t",
                     "fab_t", "square", "autoattack")
AGREEMENT_EPS = {"linf": 0.1, "l2": 0.5}  # l1: the first --eps-l1
# The reference's iterations (AutoAttack standard) and the --fast reduction of them.
FULL_L1 = {"apgd_steps": 100, "fab_steps": 100, "square_queries": 5000}
FAST_L1 = {"apgd_steps": 20, "fab_steps": 20, "square_queries": 500}
FAST_AGREEMENT = {
    "pgd": {"steps": 5}, "second_order": {"steps": 5, "samples": 4}, "soae": {"steps": 2},
    "trades": {"steps": 5}, "apgd_ce": {"steps": 20}, "apgd_t": {"steps": 20},
    "fab_t": {"steps": 20}, "square": {"steps": 500},
    "autoattack": {"hyperparameters": {"apgd_ce": {"steps": 20}, "apgd_t": {"steps": 20},
                                       "fab_t": {"steps": 20}, "square": {"steps": 500}}},
}
_REFERENCE_NAMES = {"apgd_ce": "APGD-CE", "apgd_dlr": "APGD-DLR", "apgd_t": "APGD-T",
                    "fab_t": "FAB-T", "square": "SQUARE"}
_REFERENCE_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
# Section 3: dropout on the TinyCNN's 32 hidden units, trained with it and left on at test time;
# the budgets attacked with version='rand'; the draws robust accuracy is averaged over.
DROPOUT = 0.3
RAND_BUDGETS = (("linf", 0.1), ("l1", 1.0))
RAND_DRAWS = 100


def _load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def _standardised(f, z):
  """``g(z) = f(z * s + mu)``: ``f`` (a ``Partial``, its parameters traced) behind MNIST's
  normalisation."""
  return f(z * SCALE + MEAN)


def _to_z(x):
  """``z = (x - mu) / s``, in ``x``'s dtype."""
  return (x - MEAN) / SCALE


def _max_norm(x_adv, x, norm: str) -> float:
  return float(jnp.max(projections.per_example_norm(jnp.asarray(x_adv) - x, norm)))


# ----------------------------------------------------------------------------------------------
# The reference (fra31/auto-attack), from a git directory, never installed.


def load_reference(git_dir: str):
  """``(autoattack module, commit)``: the reference's ``autoattack/*.py`` at ``HEAD`` of
  ``git_dir`` extracted into a temporary folder put first on ``sys.path`` (its examples, which
  hold large model files a snapshot may lack, are left out)."""
  names = subprocess.run(["git", "-C", git_dir, "ls-tree", "--name-only", "HEAD", "autoattack/"],
                         check=True, capture_output=True, text=True).stdout.split()
  names = [n for n in names if n.endswith(".py")]
  folder = tempfile.mkdtemp(prefix="autoattack_reference_")
  archive = subprocess.run(["git", "-C", git_dir, "archive", "HEAD", *names], check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
  commit = subprocess.run(["git", "-C", git_dir, "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  sys.path.insert(0, folder)
  import autoattack  # pylint: disable=import-outside-toplevel
  if not os.path.abspath(autoattack.__file__).startswith(folder):
    raise ImportError(f"another autoattack was imported: {autoattack.__file__}")
  return autoattack, commit


def _reference_apgd_ce(net, xt, yt, eps: float, steps: int, seed: int) -> dict:
  from autoattack.autopgd_base import APGDAttack  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  attack = APGDAttack(net, n_restarts=1, n_iter=steps, norm="L1", eps=eps, loss="ce",
                      eot_iter=1, rho=.75, seed=seed, device="cpu", use_largereps=False)
  start = time.perf_counter()
  adv = attack.perturb(xt, yt)
  seconds = time.perf_counter() - start
  with torch.no_grad():
    acc = float((net(adv).argmax(1) == yt).numpy().mean())
  return {"robust_accuracy": acc, "seconds": seconds,
          "max_l1": float((adv - xt).detach().abs().flatten(1).sum(1).max())}


def _reference_autoattack(autoattack, net, xt, yt, eps: float, settings: dict, seed: int,
                          norm: str = "l1", version: str = "standard") -> dict:
  """The reference's ``run_standard_evaluation`` on one batch; per-component robust accuracy
  and seconds from its log lines ``robust accuracy after X: p% (total time t s)``, checked
  against the accuracy of the returned ``x_adv`` (for a deterministic ``net``; the caller
  judges a randomized one over draws, ``x_adv`` is returned under ``"x_adv"``)."""
  import torch  # pylint: disable=import-outside-toplevel
  adversary = autoattack.AutoAttack(net, norm=_REFERENCE_NORMS[norm], eps=eps, version=version,
                                    seed=seed, device="cpu")
  for apgd in (adversary.apgd, adversary.apgd_targeted):  # n_iter_orig drives use_largereps
    apgd.n_iter = apgd.n_iter_orig = settings["apgd_steps"]
  adversary.fab.n_iter = settings["fab_steps"]
  adversary.square.n_queries = settings["square_queries"]
  log = io.StringIO()
  start = time.perf_counter()
  with contextlib.redirect_stdout(log):
    adv = adversary.run_standard_evaluation(xt, yt, bs=len(yt))
  total = time.perf_counter() - start
  text = log.getvalue()
  after, cumulative = {}, {}
  for name, label in _REFERENCE_NAMES.items():
    m = re.search(rf"robust accuracy after {re.escape(label)}: ([0-9.]+)% \(total time "
                  rf"([0-9.]+) s\)", text)
    if m:  # a component that found no robust point left is not logged
      after[name], cumulative[name] = float(m.group(1)) / 100, float(m.group(2))
  with torch.no_grad():
    final = float((net(adv).argmax(1) == yt).numpy().mean())
  if version != "rand" and after and abs(list(after.values())[-1] - final) > 0.51e-4:
    raise AssertionError(f"parsed {after} but x_adv's robust accuracy is {final}")  # {:.2%}
  seconds, previous = {}, 0.0
  for name, t in cumulative.items():
    seconds[name], previous = t - previous, t
  delta = (adv - xt).detach().flatten(1)
  norms = {"linf": delta.abs().max(1)[0], "l2": delta.norm(dim=1), "l1": delta.abs().sum(1)}
  return {"robust_accuracy_after": after, "robust_accuracy": final, "seconds": seconds,
          "total_seconds": total, f"max_{norm}": float(norms[norm].max()),
          "box": [float(adv.min()), float(adv.max())],
          "settings": {"components": list(adversary.attacks_to_run),
                       "apgd_restarts": adversary.apgd.n_restarts,
                       "apgd_eot_iter": adversary.apgd.eot_iter,
                       "apgd_t_target_classes": adversary.apgd_targeted.n_target_classes,
                       "use_largereps": bool(adversary.apgd.use_largereps),
                       "fab_target_classes": adversary.fab.n_target_classes, **settings},
          "log": [line for line in text.splitlines() if line.strip()], "x_adv": adv}


# ----------------------------------------------------------------------------------------------
# Section 1: L1 AutoAttack per component, ours beside the reference.


def l1_section(f, params, x, y, eps_list, settings: dict, seed: int, reference=None) -> dict:
  key = jax.random.PRNGKey(seed)
  hyper = {"apgd_ce": {"steps": settings["apgd_steps"]},
           "apgd_t": {"steps": settings["apgd_steps"]},
           "fab_t": {"steps": settings["fab_steps"]},
           "square": {"steps": settings["square_queries"]}}
  out = {"settings": {"ours": {name: dict(kw) for name, kw in aa.version_components(
             "standard", hyperparameters=hyper, norm="l1")}, **settings},
         "budgets": []}
  ref_inputs = None
  if reference is not None:
    import torch  # pylint: disable=import-outside-toplevel
    net = torch_tiny_cnn(params)
    xt = torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2), np.float32))
    yt = torch.from_numpy(np.array(y, np.int64))
    with torch.no_grad():
      diff = float(np.max(np.abs(net(xt).numpy() - np.asarray(f(x)))))
    out["max_logit_difference"] = diff
    if diff > 1e-5:
      raise AssertionError(f"the PyTorch copy's logits differ by {diff}")
    ref_inputs = (net, xt, yt)
    out["reference"] = {"commit": reference[1], "torch": torch.__version__,
                        "threads": torch.get_num_threads()}
  for eps in eps_list:
    entry = {"eps": eps, "load_average_start": _load()}
    x_adv, sec = _timed(lambda: attacks.apgd_ce(f, x, y, key, eps=eps, norm="l1",
                                                steps=settings["apgd_steps"]))
    entry["apgd_ce_alone"] = {"ours": {"robust_accuracy": _accuracy(f, x_adv, y),
                                       "seconds": sec, "max_l1": _max_norm(x_adv, x, "l1")}}
    start = time.perf_counter()
    x_adv, report = attacks.autoattack_with_report(f, x, y, key, eps=eps, norm="l1",
                                                   hyperparameters=hyper)
    total = time.perf_counter() - start
    entry["autoattack"] = {"ours": {
        "robust_accuracy_after": dict(zip(report.components, report.robust_accuracy_after)),
        "robust_accuracy": report.robust_accuracy,
        "seconds": dict(zip(report.components, report.seconds)), "total_seconds": total,
        "max_l1": _max_norm(x_adv, x, "l1"),
        "box": [float(jnp.min(x_adv)), float(jnp.max(x_adv))]}}
    entry["load_average_ours_end"] = _load()
    if ref_inputs is not None:
      entry["apgd_ce_alone"]["reference"] = _reference_apgd_ce(
          *ref_inputs, eps, settings["apgd_steps"], seed)
      ref = _reference_autoattack(reference[0], *ref_inputs, eps, settings, seed)
      del ref["x_adv"]
      entry["autoattack"]["reference"] = ref
      entry["load_average_reference_end"] = _load()
    out["budgets"].append(entry)
    print(json.dumps({k: v for k, v in entry.items()}, default=str)[:2000], flush=True)
  return out


# ----------------------------------------------------------------------------------------------
# Section 2: f in [0, 1] against g(z) = f(z * s + mu) in the standardised box.


def agreement_section(f, x, y, eps_l1: float, seed: int, fast: bool) -> dict:
  g = jax.tree_util.Partial(_standardised, f)
  z = _to_z(x)
  # The box of z computed by the same float32 arithmetic as z: (0 - MEAN) / SCALE in float64
  # lies above z's float32 value at a pixel 0 (by 4e-8), and x outside the box is an error.
  lo, hi = (float(v) for v in _to_z(jnp.asarray([0.0, 1.0], x.dtype)))
  assert float(jnp.min(z)) >= lo and float(jnp.max(z)) <= hi
  key = jax.random.PRNGKey(seed)
  budgets = {**AGREEMENT_EPS, "l1": eps_l1}
  rows = []
  for name in AGREEMENT_ATTACKS:
    for norm, eps in budgets.items():
      kw = dict(FAST_AGREEMENT.get(name, {})) if fast else {}
      kw_z = dict(kw)
      if name == "second_order":  # S-O's Gaussian displacement is absolute: scaled as eps
        sigma = inspect.signature(attacks.second_order).parameters["sigma"].default
        kw["sigma"], kw_z["sigma"] = sigma, sigma / SCALE
      attack = attacks.get(name)
      x_adv, sec_f = _timed(lambda: attack(f, x, y, key, eps=eps, norm=norm, **kw))
      z_adv, sec_g = _timed(lambda: attack(g, z, y, key, eps=eps / SCALE, norm=norm,
                                           bounds=(lo, hi), **kw_z))
      z_np = np.asarray(z_adv)
      row = {"attack": name, "norm": norm, "eps": eps, "eps_z": eps / SCALE,
             "robust_accuracy_f": _accuracy(f, x_adv, y),
             "robust_accuracy_g": _accuracy(g, z_adv, y),
             "same_robust_points": bool(np.array_equal(
                 np.asarray(jnp.argmax(f(x_adv), 1) == y),
                 np.asarray(jnp.argmax(g(z_adv), 1) == y))),
             "max_abs_difference": float(np.max(np.abs(z_np * SCALE + MEAN - np.asarray(x_adv)))),
             "z_in_box": bool(z_np.min() >= lo - 1e-6 and z_np.max() <= hi + 1e-6),
             "max_norm_z_over_eps_z": _max_norm(z_adv, z, norm) / (eps / SCALE),
             "seconds_f": sec_f, "seconds_g": sec_g, "load_average": _load(),
             "hyperparameters": {k: v for k, v in kw.items() if k != "hyperparameters"}
                                if name != "autoattack" else kw.get("hyperparameters", {})}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return {"scale": SCALE, "mean": MEAN, "box_z": [lo, hi], "budgets": budgets,
          "settings": "fast" if fast else "defaults", "rows": rows}


# ----------------------------------------------------------------------------------------------
# Section 3: a randomized model (dropout at test time), version='rand' beside the reference's.


class DropoutTinyCNN(nn.Module):
  """:class:`krylov_adv.models.cnn.TinyCNN` with ``nn.Dropout(rate)`` on its 32 hidden units
  (no parameters of its own: TinyCNN's parameter tree, so :func:`torch_tiny_cnn` ports it)."""
  rate: float = DROPOUT

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x)), (2, 2), strides=(2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x)), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
    x = nn.Dropout(self.rate, deterministic=deterministic)(x)
    return nn.Dense(10)(x)


def _dropout_apply(params, x, key):
  """One draw of the dropout model: ``fn(x, key) -> logits`` for ``attacks.stochastic``."""
  return DropoutTinyCNN().apply(params, x, deterministic=False, rngs={"dropout": key})


def train_dropout_params(ds, steps: int, seed: int = 0):
  """DropoutTinyCNN trained as :func:`benchmarks.bench_autoattack.train_digits_params` trains
  TinyCNN (Adam 3e-3, batch 64, the same batches), with a fresh dropout mask per step."""
  model = DropoutTinyCNN()
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:1])
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb, key):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        _dropout_apply(p, xb, key), yb).mean())(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, len(ds.y_train), 64)
    params, opt_state = step(params, opt_state, ds.x_train[idx], ds.y_train[idx],
                             jax.random.fold_in(jax.random.PRNGKey(seed + 1), i))
  return params


def rand_section(ds, points: int, steps: int, settings: dict, seed: int, draws: int,
                 reference=None) -> dict:
  """Ours ``autoattack(version="rand")`` on ``attacks.stochastic(_dropout_apply)`` beside the
  reference's ``AutoAttack(net, version='rand')`` (APGD-CE, APGD-DLR, 1 restart, ``eot_iter``
  20) on the same weights (``net`` in train mode: dropout on) and points: the first ``points``
  test digits the model classifies correctly with dropout off. Per component: each library's
  single-draw accuracy after it (what its ensemble decides with); robust accuracy: the mean
  over ``draws`` draws of the returned ``x_adv`` (ours' draws: ``evaluation.draw_predictions``;
  the reference's: ``draws`` forward passes in train mode)."""
  from krylov_adv import evaluation  # pylint: disable=import-outside-toplevel
  params = train_dropout_params(ds, steps, seed)
  det = jax.tree_util.Partial(lambda p, z: DropoutTinyCNN().apply(p, z), params)
  model = attacks.stochastic(jax.tree_util.Partial(_dropout_apply, params))
  correct = np.asarray(jnp.argmax(det(ds.x_test), 1)) == ds.y_test
  x = jnp.asarray(ds.x_test[correct][:points])
  y = jnp.asarray(ds.y_test[correct][:points])
  key = jax.random.PRNGKey(seed)
  judge = jax.random.PRNGKey(seed + 1000)

  def over_draws(z):
    return float(np.mean(np.asarray(evaluation.draw_predictions(model, z, judge, draws=draws))
                         == np.asarray(y)[None]))

  hyper = {"apgd_ce": {"steps": settings["apgd_steps"]},
           "apgd_dlr": {"steps": settings["apgd_steps"]}}
  out = {"model": f"TinyCNN with dropout {DROPOUT} on the hidden dense layer, {steps} Adam steps "
                  f"with dropout, left on at test time",
         "test_clean_accuracy_dropout_off": float(correct.mean()), "points": int(x.shape[0]),
         "draws": draws, "clean_accuracy_over_draws": over_draws(x),
         "settings": {"ours": {name: dict(kw) for name, kw in aa.version_components(
             "rand", hyperparameters=hyper)}, "apgd_steps": settings["apgd_steps"]},
         "budgets": []}
  net = None
  if reference is not None:
    import torch  # pylint: disable=import-outside-toplevel
    net = torch_tiny_cnn(params, dropout=DROPOUT)
    xt = torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2), np.float32))
    yt = torch.from_numpy(np.array(y, np.int64))
    with torch.no_grad():
      out["max_logit_difference_dropout_off"] = float(np.max(np.abs(
          net(xt).numpy() - np.asarray(det(x)))))
    if out["max_logit_difference_dropout_off"] > 1e-5:
      raise AssertionError("the PyTorch copy's logits differ by "
                           f"{out['max_logit_difference_dropout_off']}")
    net.train()  # dropout on: the reference attacks the randomized model
    torch.manual_seed(seed)

    def torch_over_draws(z):
      with torch.no_grad():
        return float(np.mean([(net(z).argmax(1) == yt).numpy().mean() for _ in range(draws)]))

    out["reference_clean_accuracy_over_draws"] = torch_over_draws(xt)
  for norm, eps in RAND_BUDGETS:
    entry = {"norm": norm, "eps": eps, "load_average_start": _load()}
    start = time.perf_counter()
    x_adv, report = attacks.autoattack_with_report(model, x, y, key, eps=eps, norm=norm,
                                                   version="rand", hyperparameters=hyper)
    total = time.perf_counter() - start
    entry["ours"] = {
        "clean_accuracy_one_draw": report.clean_accuracy,
        "robust_accuracy_after_one_draw": dict(zip(report.components,
                                                   report.robust_accuracy_after)),
        "robust_accuracy_over_draws": over_draws(x_adv),
        "seconds": dict(zip(report.components, report.seconds)), "total_seconds": total,
        f"max_{norm}": _max_norm(x_adv, x, norm)}
    entry["load_average_ours_end"] = _load()
    if net is not None:
      ref = _reference_autoattack(reference[0], net, xt, yt, eps, settings, seed, norm=norm,
                                  version="rand")
      ref["robust_accuracy_one_draw"] = ref.pop("robust_accuracy")
      ref["robust_accuracy_after_one_draw"] = ref.pop("robust_accuracy_after")
      ref["robust_accuracy_over_draws"] = torch_over_draws(ref.pop("x_adv"))
      entry["reference"] = ref
      entry["load_average_reference_end"] = _load()
    out["budgets"].append(entry)
    print(json.dumps(entry)[:2000], flush=True)
  return out


def run(points: int = 100, steps: int = 300, seed: int = 0, eps_l1=(1.0, 2.0),
        reference_dir: str | None = None, fast: bool = False,
        sections=("l1", "agreement", "rand")) -> dict:
  model, params, ds = train_digits_params(steps, seed)
  commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=False)
  f = models.as_logits_fn(model, params)
  correct = np.asarray(jnp.argmax(f(ds.x_test), 1)) == ds.y_test
  x = jnp.asarray(ds.x_test[correct][:points])
  y = jnp.asarray(ds.y_test[correct][:points])
  out = {"benchmark": "threat_models", "commit": commit.stdout.strip(),
         "device": str(jax.devices()[0]),
         "platform": platform.platform(), "jax": jax.__version__,
         "model": f"TinyCNN(relu), {steps} Adam steps on sklearn digits, no defence",
         "test_clean_accuracy": float(correct.mean()), "points": int(x.shape[0]),
         "seed": seed, "fast": fast, "load_average_start": _load()}
  reference = None
  if reference_dir is not None:
    try:
      import torch  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      out["reference_skipped"] = "torch is not installed (the 'bench' extra)"
    else:
      reference = load_reference(reference_dir)
  if "l1" in sections:
    out["l1"] = l1_section(f, params, x, y, eps_l1, FAST_L1 if fast else FULL_L1, seed,
                           reference)
  if "agreement" in sections:
    out["agreement"] = agreement_section(f, x, y, eps_l1[0], seed, fast)
  if "rand" in sections:
    out["rand"] = rand_section(ds, points, steps, FAST_L1 if fast else FULL_L1, seed,
                               RAND_DRAWS, reference)
  out["load_average_end"] = _load()
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description="Threat models: L1 AutoAttack beside the "
                                   "reference, standardised-vs-[0, 1] agreement.")
  parser.add_argument("--points", type=int, default=100)
  parser.add_argument("--steps", type=int, default=300, help="Adam steps of the TinyCNN")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eps-l1", type=float, nargs="+", default=[1.0, 2.0])
  parser.add_argument("--reference", default=None,
                      help="git directory of fra31/auto-attack (needs CPU torch)")
  parser.add_argument("--fast", action="store_true", help="reduced iterations (FAST_L1, "
                      "FAST_AGREEMENT)")
  parser.add_argument("--sections", default="l1,agreement,rand")
  parser.add_argument("--out", default="benchmarks/results/threat_models.json")
  args = parser.parse_args(argv)
  result = run(args.points, args.steps, args.seed, tuple(args.eps_l1), args.reference,
               args.fast, tuple(args.sections.split(",")))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
