"""Demo: solve H_i d_i = g_i for a batch of real digits with the exact input HVP and GMRES.

Trains a small smooth CNN on scikit-learn's digits for a few hundred steps (seconds on a CPU),
then, for a batch of held-out digits, builds the per-example input Hessian of the cross-entropy
with the exact (forward-over-reverse) HVP and solves the Newton system of the SOAE paper
(Algorithm 1 steps 2-17) by batched GMRES, printing each example's Krylov dimension.

  python -m experiments.krylov_demo [--batch 16] [--tau 1e-2] [--max-dim 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from krylov_adv import hvp, krylov, losses
from krylov_adv.models.cnn import TinyCNN


def _load_digits(seed: int):
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--tau", type=float, default=1e-2)
  parser.add_argument("--max-dim", type=int, default=30)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  x_tr, y_tr, x_te, y_te = _load_digits(args.seed)
  # Softplus: a ReLU net's input Hessian has rank <= K - 1 and is zero in most directions.
  model = TinyCNN(num_classes=10, activation=jax.nn.softplus)
  params = model.init(jax.random.PRNGKey(args.seed), x_tr[:1])
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state, xb, yb):
    grads = jax.grad(lambda p: losses.cross_entropy(model.apply(p, xb), yb).mean())(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(args.seed)
  t0 = time.time()
  for _ in range(args.steps):
    idx = rng.integers(0, len(y_tr), 64)
    params, opt_state = train_step(params, opt_state, x_tr[idx], y_tr[idx])
  acc = float(jnp.mean(jnp.argmax(model.apply(params, x_te), -1) == y_te))
  print(f"trained TinyCNN(softplus) on digits: test accuracy {acc:.3f} ({time.time() - t0:.1f}s)")

  x, y = jnp.asarray(x_te[:args.batch]), jnp.asarray(y_te[:args.batch])

  @jax.jit
  def newton_direction(x, y):
    loss_fn = lambda z: losses.cross_entropy(model.apply(params, z), y)
    op = hvp.make_hvp(loss_fn, x, method="exact")
    return op.grad, krylov.gmres(op.matvec, op.grad, op.grad, tol=args.tau, max_dim=args.max_dim)

  g, res = newton_direction(x, y)
  d = np.asarray(res.x).reshape(len(y), -1)
  gf = np.asarray(g).reshape(len(y), -1)
  cos = np.sum(d * gf, 1) / (np.linalg.norm(d, axis=1) * np.linalg.norm(gf, axis=1) + 1e-30)
  print(f"GMRES on H d = g, tau={args.tau}, max_dim={args.max_dim}, input dim {gf.shape[1]}")
  print(f"{'ex':>3} {'label':>5} {'krylov_dim':>10} {'rel_residual':>12} {'converged':>9}"
        f" {'cos(d,g)':>8}")
  rel = np.asarray(res.residual_norm) / np.maximum(np.asarray(res.initial_residual_norm), 1e-30)
  for i in range(len(y)):
    print(f"{i:>3} {int(y[i]):>5} {int(res.num_iters[i]):>10} {rel[i]:>12.2e} "
          f"{str(bool(res.converged[i])):>9} {cos[i]:>8.3f}")
  print(f"Krylov dimension: mean {float(jnp.mean(res.num_iters)):.1f}, "
        f"max {int(jnp.max(res.num_iters))}; converged {int(jnp.sum(res.converged))}/{len(y)}")


if __name__ == "__main__":
  main()
