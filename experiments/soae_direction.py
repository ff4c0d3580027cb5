"""Why SOAE's Newton direction is weak, measured: the proposition of
``krylov_adv/attacks/_soae.py`` on trained models.

  python -m experiments.soae_direction --config configs/soae_direction.py --workdir /tmp/analysis

Three parts, all at clean test points:

1. Margin gains. For the runner-up margin ``M(x) = z_y - max_{j != y} z_j`` (runner-up fixed at
   ``x``), a direction ``d`` scaled to the eps-ball (``eps sign(d)`` for Linf, ``eps d / ||d||``
   for L2) gains ``-grad M . d_scaled`` to first order; the best direction gains ``eps ||grad
   M||_1`` (Linf) or ``eps ||grad M||_2`` (L2). Reported per model and norm: the mean and median
   ratio gain / best gain of SOAE's Newton direction (exact HVP, with the attack's gradient
   fallback where ``<g, d> <= 0``), of the cross-entropy gradient and of the trust-region
   direction (radius eps), and the median condition number of the logit Jacobian ``J``.
2. Krylov dimension of the Newton solve (``tau``, cap ``m``) with the exact and the forward-
   difference HVP (``eta``), and the cosine between the two solutions.
3. SOAE (Newton and trust region, the config's schedule) vs PGD at equal cost, in
   gradient-equivalents per batch: one gradient = 1, one exact HVP = ``hvp_cost``; each outer
   iteration pays one gradient plus, per batch, the *largest* Krylov dimension of its examples
   plus one product for the true residual, plus step 3's ``H g`` for the Newton direction (the
   trust-region direction starts GMRES at 0). PGD then runs ``round(cost)`` steps of size
   ``2.5 eps / steps`` from a random start.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, datasets, outputs, trained_models
from experiments import costs as costs_lib
from krylov_adv import attacks, evaluation, hvp

NAME = "soae_direction"


def margin_grad(logits_fn, x: jax.Array, y: jax.Array) -> jax.Array:
  """``grad_x (z_y - z_r)`` with ``r`` the runner-up at ``x`` (held fixed), ``(B, ...)``."""
  k = logits_fn(x).shape[1]
  runner = attacks.toolkit.target_order(logits_fn(x), y)[:, 0]
  sel = jax.nn.one_hot(y, k) - jax.nn.one_hot(runner, k)
  return hvp.input_grad(lambda z: jnp.sum(logits_fn(z) * sel, axis=1), x)


def gain_ratio(grad_margin: np.ndarray, d: np.ndarray, norm: str) -> np.ndarray:
  """First-order gain of ``d`` scaled to the unit ball over the best one's, ``(B,)`` (NaN where
  the margin gradient vanishes)."""
  gm = grad_margin.reshape(len(grad_margin), -1).astype(np.float64)
  d = d.reshape(len(d), -1).astype(np.float64)
  if norm not in ("linf", "l2"):
    raise ValueError(f"gain_ratio is defined for linf and l2, got norm {norm!r}")
  if norm == "linf":
    gain, best = -np.sum(gm * np.sign(d), 1), np.abs(gm).sum(1)
  else:
    gain = -np.sum(gm * d, 1) / np.maximum(np.linalg.norm(d, axis=1), 1e-30)
    best = np.linalg.norm(gm, axis=1)
  return np.where(best > 0, gain / np.where(best > 0, best, 1.0), np.nan)


@functools.partial(jax.jit, static_argnames=("logits_fn", "norm", "m", "tau", "eta"))
def directions(logits_fn, x, y, eps, *, norm: str, m: int, tau: float, eta: float) -> dict:
  """The directions compared at ``x``: Newton (exact and FD), gradient, trust region."""
  loss_fn = trained_models.cross_entropy_fn(logits_fn, y)
  exact = attacks.soae_direction(loss_fn, x, tau=tau, m=m, hvp="exact")
  fd = attacks.soae_direction(loss_fn, x, tau=tau, m=m, hvp="fd_forward", eta=eta)
  tr = attacks.soae_direction(loss_fn, x, tau=tau, m=m, hvp="exact", direction="trust_region",
                              radius=eps, norm=norm)
  g = exact.grad
  dot = lambda a, b: jnp.sum((a * b).reshape(len(a), -1), 1)
  fallback = ~(dot(g, exact.direction) > 0)
  newton = jnp.where(fallback.reshape((-1,) + (1,) * (x.ndim - 1)), g, exact.direction)
  nrm = lambda a: jnp.sqrt(dot(a, a))
  cos = dot(exact.direction, fd.direction) / jnp.maximum(nrm(exact.direction) * nrm(fd.direction),
                                                         1e-30)
  return dict(newton=newton, gradient=g, trust_region=tr.direction, fallback=fallback,
              m_exact=exact.gmres.num_iters, m_fd=fd.gmres.num_iters,
              conv_exact=exact.gmres.converged, conv_fd=fd.gmres.converged, cos_fd_exact=cos,
              margin=margin_grad(logits_fn, x, y))


def jacobian_conditions(logits_fn, x: np.ndarray) -> np.ndarray:
  """cond(J) per example (float64 SVD of the float32 Jacobian), ``(B,)``."""
  shape = x.shape[1:]
  jac = jax.jit(jax.vmap(jax.jacobian(lambda v: logits_fn(v.reshape((1,) + shape))[0])))(
      jnp.asarray(x.reshape(len(x), -1)))
  sv = np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)
  return sv[:, 0] / sv[:, -1]


def directions_part(config, dataset, models_by_act) -> list[dict]:
  e = config.experiment
  x, y = datasets.first_examples(dataset, e.num_examples)
  rows = []
  for act, model in models_by_act.items():
    cond = jacobian_conditions(model.logits_fn, x)
    for norm in e.norms:
      eps = float(e.eps[norm])
      out = jax.device_get(directions(model.logits_fn, jnp.asarray(x), jnp.asarray(y), eps,
                                      norm=norm, m=int(e.m), tau=float(e.tau), eta=float(e.eta)))
      row = dict(activation=act, norm=norm, eps=eps, num_examples=len(y),
                 cond_j_median=float(np.median(cond)),
                 fallback_rate=float(np.mean(out["fallback"])),
                 m_exact_mean=float(np.mean(out["m_exact"])),
                 m_exact_max=int(np.max(out["m_exact"])),
                 converged_exact=float(np.mean(out["conv_exact"])),
                 m_fd_mean=float(np.mean(out["m_fd"])), m_fd_max=int(np.max(out["m_fd"])),
                 converged_fd=float(np.mean(out["conv_fd"])),
                 cos_fd_exact_mean=float(np.mean(out["cos_fd_exact"])),
                 abs_cos_fd_exact_median=float(np.median(np.abs(out["cos_fd_exact"]))))
      for name in ("newton", "gradient", "trust_region"):
        r = gain_ratio(out["margin"], out[name], norm)
        row[f"{name}_gain_mean"] = float(np.nanmean(r))
        row[f"{name}_gain_median"] = float(np.nanmedian(r))
      rows.append(row)
  return rows


def attack_part(config, dataset, models_by_method) -> list[dict]:
  e = config.experiment
  x, y = datasets.first_examples(dataset, e.attack_examples)
  bs = int(e.batch_size)
  key = jax.random.PRNGKey(config.seed + 17)
  rows = []
  for method, model in models_by_method.items():
    for norm in e.norms:
      eps = float(e.eps[norm])
      run = functools.partial(evaluation.run_attack, model.logits_fn, x=x, y=y, key=key, eps=eps,
                              norm=norm, batch_size=bs)
      for direction in ("newton", "trust_region"):
        attack = functools.partial(attacks.soae_with_report, eps=eps, norm=norm,
                                   direction=direction, **e.soae.to_dict())
        res = run(attack)
        costs = [costs_lib.soae_batch_cost(d, float(e.hvp_cost), newton=direction == "newton",
                                           valid=v) for d, v in res.extras]
        cost = float(np.mean(costs))
        steps = max(1, int(round(cost)))
        pgd = functools.partial(attacks.pgd, eps=eps, norm=norm, steps=steps,
                                step_size=2.5 * eps / steps)
        pgd_acc = float(run(pgd).correct.mean())
        rows.append(dict(model=method, norm=norm, eps=eps, direction=direction,
                         clean_accuracy=model.clean_accuracy,
                         soae_robust_accuracy=float(res.correct.mean()),
                         cost_gradient_equivalents=cost, pgd_steps=steps,
                         pgd_robust_accuracy=pgd_acc, num_examples=len(y)))
  return rows


def conclusions(results: dict) -> list[str]:
  out = []
  for r in results["directions"]:
    out.append(
        f"{r['activation']} {r['norm']} eps={r['eps']:g}: first-order gain on the runner-up "
        f"margin, as a fraction of the best direction's (mean): Newton (SOAE) "
        f"{100 * r['newton_gain_mean']:.0f}%, gradient {100 * r['gradient_gain_mean']:.0f}%, "
        f"trust region {100 * r['trust_region_gain_mean']:.0f}%; median cond(J) "
        f"{r['cond_j_median']:.2g}. Krylov dimension exact {r['m_exact_mean']:.1f} (max "
        f"{r['m_exact_max']}), FD {r['m_fd_mean']:.1f} (max {r['m_fd_max']}, "
        f"{100 * r['converged_fd']:.0f}% converged); |cos(FD, exact)| median "
        f"{r['abs_cos_fd_exact_median']:.3f}.")
  for r in results["attacks"]:
    out.append(
        f"{r['model']} model {r['norm']} eps={r['eps']:g}: SOAE {r['direction']} "
        f"{100 * r['soae_robust_accuracy']:.1f}% robust accuracy at "
        f"{r['cost_gradient_equivalents']:.1f} gradient-equivalents; PGD-{r['pgd_steps']} at "
        f"that cost {100 * r['pgd_robust_accuracy']:.1f}%.")
  return out


def make_figure(results: dict):
  """Bar chart of the mean margin-gain ratios per model and norm (``margin_gain.png``): a
  title and the legend beside the panel, as every analysis figure."""
  rows = results["directions"]
  fig, axes = outputs.figure(panel_size=(5.5, 3.5))
  ax = axes[0, 0]
  names = ("newton", "gradient", "trust_region")
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    ax.bar([j + i * width for j in range(len(rows))], [r[f"{name}_gain_mean"] for r in rows],
           width, label=f"{name} direction", color=f"C{i}")
  ax.set_xticks([j + width for j in range(len(rows))])
  ax.set_xticklabels([f"{r['activation']}\n{r['norm']} {r['eps']:g}" for r in rows], fontsize=8)
  ax.axhline(1.0, color="k", ls=":", label="best direction (1)")
  ax.set_ylabel("margin gain / best direction's")
  outputs.finish_figure(fig, "First-order gain on the runner-up margin of each direction "
                        f"(mean over {rows[0]['num_examples']} clean test points, standard "
                        "models)")
  return fig


def plot(results: dict, out_dir: str) -> list[str]:
  """Writes :func:`make_figure` as ``margin_gain.png``; returns the file names."""
  fig = make_figure(results)
  return [outputs.save_figure(fig, os.path.join(out_dir, "margin_gain.png"))]


def markdown(results: dict, figures: list[str]) -> str:
  d = results["directions"]
  lines = ["## SOAE's direction (soae_direction)", "",
           f"{d[0]['num_examples']} clean test points per model. Gains: first-order gain on the "
           "runner-up margin of the direction scaled to the eps-ball, as a fraction of the best "
           "direction's (mean / median).", ""]
  lines.append(outputs.markdown_table(
      ["model", "norm", "Newton", "gradient", "trust region", "fallback", "cond(J) median",
       "m exact mean/max", "m FD mean/max (conv.)", "|cos FD,exact| median"],
      [[r["activation"], f"{r['norm']} {r['eps']:g}",
        f"{r['newton_gain_mean']:.2f} / {r['newton_gain_median']:.2f}",
        f"{r['gradient_gain_mean']:.2f} / {r['gradient_gain_median']:.2f}",
        f"{r['trust_region_gain_mean']:.2f} / {r['trust_region_gain_median']:.2f}",
        f"{100 * r['fallback_rate']:.0f}%", f"{r['cond_j_median']:.3g}",
        f"{r['m_exact_mean']:.1f} / {r['m_exact_max']}",
        f"{r['m_fd_mean']:.1f} / {r['m_fd_max']} ({100 * r['converged_fd']:.0f}%)",
        f"{r['abs_cos_fd_exact_median']:.3f}"] for r in d]))
  a = results["attacks"]
  if a:
    lines += ["### SOAE vs PGD at equal cost", "",
              f"{a[0]['num_examples']} test points; cost in gradient-equivalents per batch "
              f"(exact HVP = {results['hvp_cost']:g} gradients; the batch pays its slowest "
              "example's Krylov dimension plus the true-residual product).", ""]
    lines.append(outputs.markdown_table(
        ["model", "norm", "SOAE direction", "clean", "SOAE robust acc.", "cost", "PGD steps",
         "PGD robust acc."],
        [[r["model"], f"{r['norm']} {r['eps']:g}", r["direction"],
          f"{100 * r['clean_accuracy']:.1f}%", f"{100 * r['soae_robust_accuracy']:.1f}%",
          f"{r['cost_gradient_equivalents']:.1f}", r["pgd_steps"],
          f"{100 * r['pgd_robust_accuracy']:.1f}%"] for r in a]))
  lines += ["Findings:", ""] + [f"- {c}" for c in conclusions(results)] + [""]
  lines += [f"![{f}]({f})" for f in figures] + [""]
  return "\n".join(lines)


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Writes ``workdir/soae_direction/{results.json, report.md, margin_gain.png}``."""
  out_dir = outputs.output_dir(workdir, NAME)
  dataset = datasets.load_data(config.data)
  e = config.experiment
  by_act = trained_models.by_activation(config, dataset, e.activations, workdir,
                                        progress=progress)
  by_method = trained_models.by_method(config, dataset, e.attack_methods, workdir,
                                       progress=progress)
  results = {"directions": directions_part(config, dataset, by_act),
             "attacks": attack_part(config, dataset, by_method),
             "hvp_cost": float(e.hvp_cost),
             "models": {m.label: m.clean_accuracy for m in by_act.values()}}
  results["conclusions"] = conclusions(results)
  figures = plot(results, out_dir)
  outputs.write_analysis(out_dir, config, results, markdown(results, figures), progress=progress)
  return results


if __name__ == "__main__":
  cli.main(run)
