"""Profile: what one iteration of each AutoAttack component costs, by sub-step (JSON out).

  python -m benchmarks.profile_autoattack [--batch 1000 500 128] [--flax-layers] [--no-torch]
                                          [--out benchmarks/results/autoattack_profile.json]

On the side-by-side benchmark's MNIST CNN (:class:`benchmarks.bench_autoattack.SmallCNN`, random
weights: costs do not depend on the weights) and uniform random images, for each batch size:

* ``floor``: one forward pass and one input gradient of the summed cross-entropy, jitted, in
  JAX and (unless ``--no-torch``) in PyTorch on the same weights: what every gradient-based
  iteration pays at least, in each library.
* ``apgd_ce_step``, ``apgd_t_step``: one host-driven APGD iteration (``_apgd._apgd_step``:
  momentum step, projection, gradient, checkpoint bookkeeping), and ``apgd_start``.
* ``fab_t_step``: one host-driven FAB-T iteration (``_fab._fab_step``), and its parts: the
  boundary gradient, the hyperplane-box projection of ``2B`` points (``torch_sort``: PyTorch
  sorting the same ``(2B, n)`` array, the reference's way to that projection) and the forward
  pass that checks misclassification.
* ``square_query``: Square's cost per query, from a jitted run of 200 queries on the batch.
* ``compile_seconds``: the compilation of each jitted step (lower + compile, once per shape).

Every time is the median of ``--repeats`` warm calls, in milliseconds. The host round trips
are one dispatch per iteration and one bool per run (``apgd_batch``, ``fab_batch``); their cost
is in the step times, measured from the host like the loops run them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.bench_autoattack import SmallCNN, torch_input_gradient, torch_model
from krylov_adv.attacks import _apgd, _fab, get, toolkit


def _ms(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _compile_seconds(jitted, *args, **kwargs) -> float:
  start = time.perf_counter()
  jitted.lower(*args, **kwargs).compile()
  return time.perf_counter() - start


def profile(batch: int, eps: float = 0.1, flax_layers: bool = False, use_torch: bool = True,
            repeats: int = 5, seed: int = 0) -> dict:
  """The sub-step costs of one batch size (see the module docstring)."""
  model = SmallCNN(flax_layers=flax_layers)
  rng = np.random.default_rng(seed)
  x_np = rng.uniform(size=(batch, 28, 28, 1)).astype(np.float32)
  y_np = rng.integers(0, 10, batch).astype(np.int32)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  params = model.init(jax.random.PRNGKey(seed), x[:1])
  logits_fn = jax.jit(lambda z: model.apply(params, z))
  grad = jax.jit(jax.grad(lambda z: jnp.sum(
      optax.softmax_cross_entropy_with_integer_labels(logits_fn(z), y))))
  out: dict = {"batch": batch, "floor": {"jax_forward": _ms(lambda: logits_fn(x), repeats),
                                         "jax_gradient": _ms(lambda: grad(x), repeats)}}
  keys = toolkit.example_keys(jax.random.PRNGKey(seed), jnp.arange(batch))
  compile_s = {}

  order = toolkit.model_target_order(logits_fn, x, y)
  for name, loss, targeted in (("apgd_ce", "ce", False), ("apgd_t", "dlr", True)):
    static = dict(norm="linf", loss=loss, targeted=targeted, steps=100)
    start_args = (logits_fn, x, y, keys, order, jnp.int32(0), eps, (0.0, 1.0))
    target, state = _apgd._apgd_start(*start_args, **static, restarts=1)
    step_args = (logits_fn, state, 3, x, y, target, eps, (0.0, 1.0))
    # Compiled before the first call, which would cache the executable.
    compile_s[f"{name}_step"] = _compile_seconds(_apgd._apgd_step, *step_args, **static,
                                                 rho=0.75)
    out[f"{name}_step"] = _ms(lambda: _apgd._apgd_step(*step_args, **static, rho=0.75), repeats)
  out["apgd_start"] = _ms(lambda: _apgd._apgd_start(*start_args, **static, restarts=1), repeats)

  fab_static = dict(norm="linf", targeted=True, alpha_max=0.1, overshoot=1.05, beta=0.9)
  box = (jnp.float32(0.0), jnp.float32(1.0))
  target, state = _fab._fab_start(x, keys, order, jnp.int32(0), eps, box, norm="linf",
                                  restarts=1)
  fab_args = (logits_fn, state, x, y, target, box)
  compile_s["fab_t_step"] = _compile_seconds(_fab._fab_step, *fab_args, **fab_static)
  out["fab_t_step"] = _ms(lambda: _fab._fab_step(*fab_args, **fab_static), repeats)

  def boundary(z):
    logits = logits_fn(z)
    return jnp.sum(jnp.take_along_axis(logits, target[:, None], 1) -
                   jnp.take_along_axis(logits, y[:, None], 1))

  boundary_grad = jax.jit(jax.grad(boundary))
  flat = x.reshape(batch, -1)
  w = boundary_grad(x).reshape(batch, -1)
  t2, w2 = jnp.concatenate([flat, flat]), jnp.concatenate([w, w])
  b2 = jnp.sum(w2 * t2, axis=1) - 0.1
  projection = jax.jit(lambda t, v, b: _fab.hyperplane_box_projection(t, v, b, "linf"))
  out["fab_t_parts"] = {
      "boundary_gradient": _ms(lambda: boundary_grad(x), repeats),
      "projection_2B": _ms(lambda: projection(t2, w2, b2), repeats),
      "forward": out["floor"]["jax_forward"]}

  queries = 200
  square = jax.jit(lambda xb, yb, k: get("square")(logits_fn, xb, yb, k, eps=eps, norm="linf",
                                                    steps=queries))
  compile_s["square_200_queries"] = _compile_seconds(square, x, y, jax.random.PRNGKey(seed))
  out["square_query"] = _ms(lambda: square(x, y, jax.random.PRNGKey(seed)), 1) / queries
  out["compile_seconds"] = compile_s

  if use_torch:
    import torch  # pylint: disable=import-outside-toplevel
    net = torch_model(params)
    xt = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
    with torch.no_grad():
      out["floor"]["torch_forward"] = _ms(lambda: net(xt), repeats)
    out["floor"]["torch_gradient"] = _ms(torch_input_gradient(net, x_np, y_np), repeats)
    t2_torch = torch.from_numpy(np.array(t2))
    out["fab_t_parts"]["torch_sort_2B"] = _ms(lambda: torch.sort(t2_torch, dim=1), repeats)
    out["torch_threads"] = torch.get_num_threads()
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description="AutoAttack sub-step profile.")
  parser.add_argument("--batch", type=int, nargs="+", default=[1000, 500, 128])
  parser.add_argument("--flax-layers", action="store_true",
                      help="the CNN pools with nn.max_pool, not krylov_adv.models.layers.max_pool")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch floor")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/autoattack_profile.json")
  args = parser.parse_args(argv)
  result = {"benchmark": "autoattack_profile", "device": str(jax.devices()[0]),
            "platform": platform.platform(), "jax": jax.__version__,
            "layers": "flax" if args.flax_layers else "krylov_adv.models.layers", "unit": "ms",
            "batches": []}
  for batch in args.batch:
    result["batches"].append(profile(batch, flax_layers=args.flax_layers,
                                     use_torch=not args.no_torch, repeats=args.repeats))
    print(json.dumps(result["batches"][-1]), flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
