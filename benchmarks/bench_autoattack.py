"""Benchmark: AutoAttack components on a small undefended digits CNN, linf and l2 (JSON out).

  python -m benchmarks.bench_autoattack [--points 256] [--steps 300]
                                        [--out benchmarks/results/autoattack.json]
  python -m benchmarks.bench_autoattack --side-by-side [--points 1000] [--eps 0.1]
                                        [--mnist ../shared/data/mnist]

``--side-by-side``: ours against a PyTorch AutoAttack on the same weights and points (see
:func:`side_by_side`; needs the optional ``bench`` extra: CPU ``torch`` and ``torchattacks``).

A TinyCNN is trained for ``--steps`` Adam steps on scikit-learn digits (8x8, no defence); the
attacks run on the first ``--points`` test images it classifies correctly, with the published
hyperparameters (APGD 100 iterations, APGD-T/FAB-T 9 targets, FAB 100 iterations, Square 5000
queries). For each budget the JSON records:

* ``alone``: each component by itself on all points: robust accuracy, ``compile_seconds`` (first
  call minus a warm call) and ``seconds`` (a warm call).
* ``standard``: the AutoAttack ensemble's report: robust accuracy after each component and the
  time of each, cold (compilation included) and warm.
* ``random_noise``: accuracy under a uniform random point of the ball, the no-attack baseline.

Budgets: linf 0.3 (MNIST standard) and l2 1.5 (see tests/test_autoattack.py for the scaling to
8x8), plus the smaller 0.1 / 0.5, where the undefended model is not broken by every component
and the components differ.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax

from krylov_adv import attacks, data, projections
from krylov_adv.attacks import _autoattack as aa
from krylov_adv.models import layers
from krylov_adv.models.cnn import TinyCNN

BUDGETS = (("linf", 0.3), ("linf", 0.1), ("l2", 1.5), ("l2", 0.5))


def adam_trainer(model, params, learning_rate: float):
  """``(opt_state, step)``: Adam on the mean cross-entropy, ``step(params, opt_state, xb, yb)
  -> (params, opt_state)`` jitted; the benchmarks' models are trained with it."""
  opt = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb).mean())(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  return opt.init(params), step


def train_digits_params(steps: int, seed: int = 0):
  """TinyCNN trained with Adam(3e-3), batch 64, on digits; returns (model, params, dataset)."""
  ds = data.load_digits(seed=seed)
  model = TinyCNN(num_classes=10)
  params = model.init(jax.random.PRNGKey(seed), ds.x_train[:1])
  opt_state, step = adam_trainer(model, params, 3e-3)

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(ds.y_train), 64)
    params, opt_state = step(params, opt_state, ds.x_train[idx], ds.y_train[idx])
  return model, params, ds


def train_digits_model(steps: int, seed: int = 0):
  """TinyCNN trained with Adam(3e-3), batch 64, on digits; returns (logits_fn, dataset, acc)."""
  model, params, ds = train_digits_params(steps, seed)
  logits_fn = jax.jit(lambda x: model.apply(params, x))
  acc = float(np.mean(np.asarray(jnp.argmax(logits_fn(ds.x_test), 1)) == ds.y_test))
  return logits_fn, ds, acc


def _accuracy(logits_fn, x, y) -> float:
  return float(np.mean(np.asarray(jnp.argmax(logits_fn(x), axis=1)) == np.asarray(y)))


def _timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def run(points: int = 256, steps: int = 300, seed: int = 0) -> dict:
  logits_fn, ds, clean_accuracy = train_digits_model(steps, seed)
  correct = np.asarray(jnp.argmax(logits_fn(ds.x_test), 1)) == ds.y_test
  x = jnp.asarray(ds.x_test[correct][:points])
  y = jnp.asarray(ds.y_test[correct][:points])
  key = jax.random.PRNGKey(seed)
  results = []
  for norm, eps in BUDGETS:
    entry = {"norm": norm, "eps": eps,
             "random_noise": _accuracy(logits_fn, projections.random_start(key, x, eps, norm), y),
             "alone": {}}
    for name in ("apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "fab", "square"):
      call = lambda name=name: attacks.get(name)(logits_fn, x, y, key, eps=eps, norm=norm)
      _, cold = _timed(call)
      x_adv, warm = _timed(call)
      dist = float(jnp.max(projections.per_example_norm(x_adv - x, norm)))
      entry["alone"][name] = {"robust_accuracy": _accuracy(logits_fn, x_adv, y),
                              "seconds": warm, "compile_seconds": max(cold - warm, 0.0),
                              "max_perturbation": dist}
    for label in ("cold", "warm"):
      _, report = attacks.autoattack_with_report(logits_fn, x, y, key, eps=eps, norm=norm)
      entry[f"standard_{label}"] = {
          "components": list(report.components),
          "clean_accuracy": report.clean_accuracy,
          "robust_accuracy_after": dict(zip(report.components, report.robust_accuracy_after)),
          "seconds": dict(zip(report.components, report.seconds)),
          "robust_accuracy": report.robust_accuracy,
      }
    results.append(entry)
    print(json.dumps(entry), flush=True)
  return {
      "benchmark": "autoattack",
      "device": str(jax.devices()[0]),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "model": f"TinyCNN(relu), {steps} Adam steps on sklearn digits, no defence",
      "test_clean_accuracy": clean_accuracy,
      "points": int(x.shape[0]),
      "hyperparameters": {name: dict(kw) for name, kw in aa.version_components("standard")},
      "budgets": results,
  }


# ----------------------------------------------------------------------------------------------
# Side by side with a PyTorch AutoAttack (torchattacks, a port of fra31/auto-attack).


class SmallCNN(nn.Module):
  """conv 16 5x5, max-pool 2, conv 32 5x5, max-pool 2, dense 128, dense 10 (ReLU, SAME
  padding): the issue's MNIST CNN. NHWC ``(B, 28, 28, 1)`` in ``[0, 1]`` -> logits ``(B, 10)``.

  ``flax_layers=False`` pools with :func:`krylov_adv.models.layers.max_pool`, as the library's
  Madry CNN does, ``True`` with plain ``nn.max_pool``: the same function and the same
  gradient, ties included; only the cost of the gradient on the CPU backend differs."""
  flax_layers: bool = False

  @nn.compact
  def __call__(self, x):
    if self.flax_layers:
      pool = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2))
    else:
      pool = lambda z: layers.max_pool(z, (2, 2))
    x = pool(nn.relu(nn.Conv(16, (5, 5), padding="SAME")(x)))
    x = pool(nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x)))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def train_mnist_model(root: str, epochs: int, seed: int = 0):
  """SmallCNN trained with Adam(1e-3), batch 128, on the first 9000 MNIST test images (the
  attacked points are taken from the last 1000). Returns ``(params, x (10000, 28, 28, 1), y)``."""
  x, y = data.load_idx_split(root, "t10k")
  x = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
  y = np.asarray(y, np.int32)
  model = SmallCNN()
  params = model.init(jax.random.PRNGKey(seed), x[:1])
  opt_state, step = adam_trainer(model, params, 1e-3)

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    perm = rng.permutation(9000)
    for i in range(0, 9000 - 127, 128):
      b = perm[i:i + 128]
      params, opt_state = step(params, opt_state, x[b], y[b])
  return params, x, y


def _with_flax_weights(net, params):
  """``net`` (two convolutions ``c1``, ``c2`` and two dense layers ``f1``, ``f2``) holding the
  Flax ``params``: conv kernels ``(kh, kw, in, out) -> (out, in, kh, kw)``, dense ``(in, out) ->
  (out, in)``; in ``eval()`` mode."""
  import torch  # pylint: disable=import-outside-toplevel

  p = jax.tree_util.tree_map(np.asarray, params)["params"]
  with torch.no_grad():
    for name, layer in (("Conv_0", net.c1), ("Conv_1", net.c2)):
      layer.weight.copy_(torch.from_numpy(p[name]["kernel"].transpose(3, 2, 0, 1).copy()))
      layer.bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
    for name, layer in (("Dense_0", net.f1), ("Dense_1", net.f2)):
      layer.weight.copy_(torch.from_numpy(p[name]["kernel"].T.copy()))
      layer.bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
  return net.eval()


def torch_model(params):
  """The same network in PyTorch (NCHW input), holding ``params``' weights: conv kernels
  ``(kh, kw, in, out) -> (out, in, kh, kw)``, dense ``(in, out) -> (out, in)``, and the
  features flattened in Flax's NHWC order."""
  import torch  # pylint: disable=import-outside-toplevel

  class Net(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.c1 = torch.nn.Conv2d(1, 16, 5, padding=2)
      self.c2 = torch.nn.Conv2d(16, 32, 5, padding=2)
      self.f1 = torch.nn.Linear(32 * 7 * 7, 128)
      self.f2 = torch.nn.Linear(128, 10)

    def forward(self, x):
      x = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
      x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
      return self.f2(torch.relu(self.f1(x)))

  return _with_flax_weights(Net(), params)


def torch_tiny_cnn(params, dropout: float = 0.0):
  """:class:`krylov_adv.models.cnn.TinyCNN` (ReLU, 8x8x1 input) in PyTorch (NCHW input),
  holding ``params``' weights, converted as in :func:`torch_model`: conv 8 3x3 (SAME: padding
  1), average pool 2, conv 16 3x3, average pool 2, dense 32, dense 10, the ``(2, 2, 16)``
  features flattened in Flax's NHWC order. ``dropout``: ``torch.nn.Dropout(dropout)`` on the 32
  hidden units (active in ``train()`` mode; the returned network is in ``eval()`` mode)."""
  import torch  # pylint: disable=import-outside-toplevel

  class Net(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
      self.c2 = torch.nn.Conv2d(8, 16, 3, padding=1)
      self.f1 = torch.nn.Linear(16 * 2 * 2, 32)
      self.drop = torch.nn.Dropout(dropout)
      self.f2 = torch.nn.Linear(32, 10)

    def forward(self, x):
      x = torch.nn.functional.avg_pool2d(torch.relu(self.c1(x)), 2)
      x = torch.nn.functional.avg_pool2d(torch.relu(self.c2(x)), 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
      return self.f2(self.drop(torch.relu(self.f1(x))))

  return _with_flax_weights(Net(), params)


def torch_input_gradient(net, x: np.ndarray, y: np.ndarray):
  """A zero-argument callable: PyTorch's input gradient of the summed cross-entropy of ``net``
  at NHWC ``x`` ``(B, H, W, C)`` with labels ``y`` ``(B,)`` (the bare cost every
  gradient-based iteration of the reference pays)."""
  import torch  # pylint: disable=import-outside-toplevel

  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))

  def gradient():
    xx = xt.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(net(xx), yt, reduction="sum")
    return torch.autograd.grad(loss, [xx])[0]

  return gradient


def _torch_autoattack(net, x: np.ndarray, y: np.ndarray, eps: float, *, apgd_steps: int,
                      fab_steps: int, square_queries: int, n_targets: int) -> dict:
  """The standard ensemble with torchattacks' components at the reference's settings
  (fra31/auto-attack ``version='standard'``: APGD-CE 100 iterations, APGD-T and FAB-T over 9
  targets, Square 5000 queries, 1 restart each), each component on the still-robust points as
  torchattacks' ``MultiAttack`` does, timed one by one. (torchattacks' own ``AutoAttack``
  wrapper keeps the components' default 10 iterations, so it is not the same work.)"""
  import torch  # pylint: disable=import-outside-toplevel
  import torchattacks  # pylint: disable=import-outside-toplevel

  class Counting(torch.nn.Module):
    """``net``, counting the examples of every forward pass whose input requires a gradient
    (the passes a gradient evaluation starts from)."""

    def __init__(self):
      super().__init__()
      self.net, self.examples = net, 0

    def forward(self, z):
      if z.requires_grad:
        self.examples += z.shape[0]
      return self.net(z)

  counting = Counting().eval()
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))
  with torch.no_grad():
    robust = (net(xt).argmax(1) == yt).numpy()
  clean = float(robust.mean())
  comps = [
      ("apgd_ce", torchattacks.APGD(counting, norm="Linf", eps=eps, steps=apgd_steps,
                                    n_restarts=1, loss="ce", seed=0)),
      ("apgd_t", torchattacks.APGDT(counting, norm="Linf", eps=eps, steps=apgd_steps,
                                    n_restarts=1, n_classes=n_targets + 1, seed=0)),
      ("fab_t", torchattacks.FAB(counting, norm="Linf", eps=eps, steps=fab_steps,
                                 n_restarts=1, multi_targeted=True, n_classes=n_targets + 1,
                                 seed=0)),
      ("square", torchattacks.Square(counting, norm="Linf", eps=eps,
                                     n_queries=square_queries, n_restarts=1,
                                     resc_schedule=False, seed=0)),
  ]
  seconds, points, after, grads = {}, {}, {}, {}
  for name, attack in comps:
    idx = np.nonzero(robust)[0]
    points[name] = int(idx.size)
    counting.examples = 0
    start = time.perf_counter()
    if idx.size:
      adv = attack(xt[idx], yt[idx])
      with torch.no_grad():
        robust[idx[(net(adv).argmax(1) != yt[idx]).numpy()]] = False
    seconds[name] = time.perf_counter() - start
    after[name] = float(robust.mean())
    grads[name] = counting.examples
  return {"clean_accuracy": clean, "robust_accuracy": float(robust.mean()),
          "robust_accuracy_after": after, "points": points, "seconds": seconds,
          "example_gradients": grads,
          "total_seconds": float(sum(seconds.values())), "threads": torch.get_num_threads(),
          "torch": torch.__version__, "torchattacks": torchattacks.__version__}


def side_by_side(root: str, points: int = 1000, eps: float = 0.1, epochs: int = 2,
                 apgd_steps: int = 100, fab_steps: int = 100, square_queries: int = 5000,
                 n_targets: int = 9, reference: bool = True, flax_layers: bool = False) -> dict:
  """Ours and a PyTorch AutoAttack (torchattacks) on the same SmallCNN weights and points.

  The model is trained in JAX (:func:`train_mnist_model`), copied into PyTorch
  (:func:`torch_model`; the logits must agree to 1e-4), and both libraries attack the last
  ``points`` MNIST test images, one batch, Linf ``eps``, standard version. Ours runs twice
  (``first_call``: compilation included, then ``warm``); the reference once. For each component
  the JSON gives seconds, the points it ran on and the robust accuracy after it, for both, and
  ``ratio`` = ours / reference (per component and in total).

  Per gradient evaluation: ``example_gradients`` counts, per component, the examples that went
  through a gradient (ours: the padded subset size times the iterations of every run, by
  construction of the host-driven loops; the reference's: counted by wrapping its model, every
  forward pass whose input requires a gradient), and ``ratio_per_gradient`` compares seconds
  per example-gradient. ``one_gradient_seconds`` is one bare input gradient of the summed
  cross-entropy on the whole batch in each library (warm, median of 5), the floor both pay.
  ``flax_layers``: the JAX model pools with plain ``nn.max_pool`` instead of
  :func:`krylov_adv.models.layers.max_pool` (see :class:`SmallCNN`).
  """
  params, x_all, y_all = train_mnist_model(root, epochs)
  model = SmallCNN(flax_layers=flax_layers)
  logits_fn = jax.jit(lambda z: model.apply(params, z))
  x, y = x_all[-points:], y_all[-points:]
  out = {"benchmark": "autoattack_side_by_side", "device": str(jax.devices()[0]),
         "platform": platform.platform(), "jax": jax.__version__, "points": points, "eps": eps,
         "model": f"SmallCNN ({'flax' if flax_layers else 'krylov_adv.models.layers'} layers), {epochs} "
                  f"Adam epochs on MNIST t10k[:9000]",
         "clean_accuracy_test_tail": _accuracy(logits_fn, x, y),
         "settings": dict(apgd_steps=apgd_steps, fab_steps=fab_steps,
                          square_queries=square_queries, n_targets=n_targets)}
  hyper = {"apgd_ce": dict(steps=apgd_steps), "apgd_t": dict(steps=apgd_steps,
                                                                n_target_classes=n_targets),
           "fab_t": dict(steps=fab_steps, n_target_classes=n_targets),
           "square": dict(steps=square_queries)}
  for label in ("first_call", "warm"):
    start = time.perf_counter()
    _, report = attacks.autoattack_with_report(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps,
                                               norm="linf", hyperparameters=hyper)
    total = time.perf_counter() - start
    after = dict(zip(report.components, report.robust_accuracy_after))
    before = [report.clean_accuracy, *report.robust_accuracy_after[:-1]]
    out[f"ours_{label}"] = {
        "clean_accuracy": report.clean_accuracy, "robust_accuracy": report.robust_accuracy,
        "robust_accuracy_after": after,
        "points": {n: int(round(b * points)) for n, b in zip(report.components, before)},
        "seconds": dict(zip(report.components, report.seconds)), "total_seconds": total}
    out[f"ours_{label}"]["example_gradients"] = _our_example_gradients(
        out[f"ours_{label}"]["points"], points, apgd_steps, fab_steps, n_targets)
    print(json.dumps({label: out[f"ours_{label}"]}), flush=True)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(z), jnp.asarray(y)))))
  out["one_gradient_seconds"] = {"jax": _median_seconds(
      lambda: jax.block_until_ready(grad(jnp.asarray(x))))}
  if reference:
    import torch  # pylint: disable=import-outside-toplevel
    net = torch_model(params)
    with torch.no_grad():
      tl = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    diff = float(np.max(np.abs(tl - np.asarray(logits_fn(x)))))
    out["max_logit_difference"] = diff
    if diff > 1e-4:
      raise AssertionError(f"the PyTorch copy's logits differ by {diff}")
    ref = _torch_autoattack(net, x, y, eps, apgd_steps=apgd_steps, fab_steps=fab_steps,
                            square_queries=square_queries, n_targets=n_targets)
    out["reference"] = ref
    out["one_gradient_seconds"]["torch"] = _median_seconds(torch_input_gradient(net, x, y))
    for label in ("first_call", "warm"):
      ours = out[f"ours_{label}"]
      out[f"ratio_{label}"] = {
          **{n: ours["seconds"][n] / max(ref["seconds"][n], 1e-9) for n in ref["seconds"]},
          "total": sum(ours["seconds"].values()) / max(ref["total_seconds"], 1e-9)}
      out[f"ratio_per_gradient_{label}"] = {
          n: (ours["seconds"][n] / ours["example_gradients"][n]) /
             (ref["seconds"][n] / ref["example_gradients"][n])
          for n in ref["seconds"]
          if ours["example_gradients"].get(n) and ref["example_gradients"].get(n)}
  return out


def _median_seconds(fn, repeats: int = 5) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _our_example_gradients(points: dict, batch: int, apgd_steps: int, fab_steps: int,
                           n_targets: int) -> dict:
  """Examples through a gradient per component of our standard ensemble: each runs on the
  still-robust subset padded to ``_bucket``; APGD takes ``steps + 1`` gradients per run (the
  start and each iteration), FAB-T one per iteration, over ``n_targets`` runs; Square none.
  An upper bound where a component stopped early because every point was fooled."""
  size = {n: aa._bucket(p, batch) if p else 0 for n, p in points.items()}
  return {"apgd_ce": size["apgd_ce"] * (apgd_steps + 1),
          "apgd_t": size["apgd_t"] * (apgd_steps + 1) * n_targets,
          "fab_t": size["fab_t"] * fab_steps * n_targets, "square": 0}


def main(argv=None):
  parser = argparse.ArgumentParser(description="AutoAttack per-component accuracy and time.")
  parser.add_argument("--points", type=int, default=None,
                      help="default 256 (digits), 1000 with --side-by-side")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None)
  parser.add_argument("--side-by-side", action="store_true",
                      help="ours vs torchattacks on an MNIST CNN (needs the 'bench' extra)")
  parser.add_argument("--mnist", default="../shared/data/mnist",
                      help="folder with the t10k idx files (side by side)")
  parser.add_argument("--eps", type=float, default=0.1)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--apgd-steps", type=int, default=100)
  parser.add_argument("--fab-steps", type=int, default=100)
  parser.add_argument("--square-queries", type=int, default=5000)
  parser.add_argument("--no-reference", action="store_true",
                      help="side by side without the PyTorch run (ours alone)")
  parser.add_argument("--flax-layers", action="store_true",
                      help="side by side: the JAX model pools with nn.max_pool")
  args = parser.parse_args(argv)
  if args.side_by_side:
    result = side_by_side(args.mnist, args.points or 1000, args.eps, args.epochs,
                          args.apgd_steps, args.fab_steps, args.square_queries,
                          reference=not args.no_reference, flax_layers=args.flax_layers)
    args.out = args.out or "benchmarks/results/autoattack_side_by_side.json"
  else:
    result = run(args.points or 256, args.steps, args.seed)
    args.out = args.out or "benchmarks/results/autoattack.json"
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
