"""Mean input-gradient norm per iteration for PGD and the S-O attack (the S-O paper's Fig. 1).

  python -m experiments.grad_norms --config configs/grad_norms.py --workdir /tmp/analysis
  python -m experiments.grad_norms --config configs/grad_norms.py:paper --workdir DIR \
      --config.models_dir=SOAT_WORKDIR   (standard/ and trades/ checkpoints of experiments.soat)

The S-O paper plots ``(1 / N_batch) sum_i ||grad_x L(theta, x_i^(t), y_i)||_2`` against the
iteration ``t`` for a naturally trained model attacked by PGD, a TRADES model attacked by PGD and
a TRADES model attacked by S-O: an adversarially trained model has a flat loss around the data
("degenerate global minimum"), so PGD's gradients are small and it stalls, while S-O's averaged
gradient over Gaussian-perturbed inputs finds the steep direction.

The attacks are the library's (``krylov_adv.attacks.pgd_with_report`` and
``second_order_with_report``), whose report traces every iterate ``x_t``, ``t = 0..T``: the
per-example loss, true gradient norm and correctness, averaged here over the batch.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, datasets, outputs, trained_models
from krylov_adv import attacks

NAME = "grad_norms"
ATTACKS = ("pgd", "second_order")


class Trace(NamedTuple):
  """Per-iteration batch statistics of a traced attack, ``t = 0..steps``.

  grad_norm: ``(steps + 1,)`` mean ``||grad_x L(x_t)||_2``; loss: ``(steps + 1,)`` mean
  cross-entropy; accuracy: ``(steps + 1,)``; x_adv: the last iterate ``(B, H, W, C)``.
  """
  grad_norm: jax.Array
  loss: jax.Array
  accuracy: jax.Array
  x_adv: jax.Array


def trace_attack(logits_fn, x: jax.Array, y: jax.Array, key: jax.Array, *, attack: str,
                 eps: float, norm: str, steps: int, step_size: float, samples: int = 1,
                 sigma: float = 0.0, random_start: bool = False) -> Trace:
  """Runs PGD or S-O for ``steps`` iterations and averages every iterate's statistics.

  Args:
    logits_fn: ``(B, H, W, C) -> (B, K)``, inference mode.
    x: ``(B, H, W, C)`` in ``[0, 1]``; y: ``(B,)``; key: PRNG key (S-O noise, random start).
    attack: ``"pgd"`` or ``"second_order"``.
    eps, norm: the threat model; step_size: ``a``.
    samples, sigma: S-O's Gaussian average (``samples`` draws of standard deviation ``sigma``).
    random_start: start at a uniform point of the ball.

  Returns:
    :class:`Trace`.
  """
  if attack not in ATTACKS:
    raise ValueError(f"unknown attack {attack!r}; use one of {ATTACKS}")
  kw = dict(eps=eps, norm=norm, steps=steps, step_size=step_size, random_start=random_start)
  if attack == "pgd":
    out = attacks.pgd_with_report(logits_fn, x, y, key, restarts=1, **kw)
    trace = jax.tree_util.tree_map(lambda a: a[0], out.report.trace)  # the one restart
  else:
    out = attacks.second_order_with_report(logits_fn, x, y, key, samples=samples, sigma=sigma,
                                           **kw)
    trace = out.report.trace
  return Trace(jnp.mean(trace.grad_norm, axis=1), jnp.mean(trace.loss, axis=1),
               jnp.mean(trace.correct, axis=1), out.x_adv)


def traces(config, dataset, models_by_method) -> list[dict]:
  e = config.experiment
  x, y = datasets.first_examples(dataset, e.num_examples)
  bs = min(int(e.batch_size), len(y))
  rows = []
  for method, model in models_by_method.items():
    for norm in e.norms:
      eps = float(e.eps[norm])
      for attack in e.attacks:
        kw = dict(attack=attack, eps=eps, norm=norm, steps=int(e.steps),
                  step_size=float(e.step_size[norm]), random_start=bool(e.random_start))
        if attack == "second_order":
          kw.update(samples=int(e.samples), sigma=float(e.sigma))
        sums = None
        count = 0
        for b, s in enumerate(range(0, len(y) - bs + 1, bs)):
          tr = trace_attack(model.logits_fn, jnp.asarray(x[s:s + bs]), jnp.asarray(y[s:s + bs]),
                            jax.random.PRNGKey(config.seed + 13 + b), **kw)
          vals = np.stack([np.asarray(tr.grad_norm), np.asarray(tr.loss),
                           np.asarray(tr.accuracy)]).astype(np.float64)
          sums = vals if sums is None else sums + vals
          count += 1
        mean = sums / count
        rows.append(dict(model=method, attack=attack, norm=norm, eps=eps,
                         grad_norm=mean[0].tolist(), loss=mean[1].tolist(),
                         accuracy=mean[2].tolist(), clean_accuracy=model.clean_accuracy,
                         num_examples=count * bs))
  return rows


def conclusions(rows: list[dict]) -> list[str]:
  out = []
  for r in rows:
    g = r["grad_norm"]
    out.append(f"{r['model']} model, {r['attack']} ({r['norm']} eps={r['eps']:g}): mean "
               f"||grad|| {g[0]:.3g} at t=0, max {max(g):.3g}, {g[-1]:.3g} at t={len(g) - 1}; "
               f"accuracy {100 * r['accuracy'][0]:.1f}% -> {100 * r['accuracy'][-1]:.1f}%.")
  return out


def make_figures(results: dict) -> dict:
  """``{"grad_norms.png": figure}``: mean gradient norm (top) and accuracy (bottom) per
  iteration, one column per norm; colour = model, line style = attack."""
  from matplotlib.ticker import MaxNLocator
  rows = results["rows"]
  norms = list(dict.fromkeys(r["norm"] for r in rows))
  models = list(dict.fromkeys(r["model"] for r in rows))
  attack_names = list(dict.fromkeys(r["attack"] for r in rows))
  fig, axes = outputs.figure(2, len(norms), panel_size=(5.2, 3.2))
  for j, norm in enumerate(norms):
    for r in (r for r in rows if r["norm"] == norm):
      i, v = models.index(r["model"]), attack_names.index(r["attack"])
      style = dict(outputs.series_style(i, v), markevery=max(len(r["grad_norm"]) // 10, 1))
      label = f"{r['model']} model" if v == 0 else None
      axes[0][j].semilogy(range(len(r["grad_norm"])), np.maximum(r["grad_norm"], 1e-12),
                          label=label, **style)
      axes[1][j].plot(range(len(r["accuracy"])), 100 * np.asarray(r["accuracy"]), **style)
    eps = next(r["eps"] for r in rows if r["norm"] == norm)
    axes[0][j].set_title(f"{norm} eps={eps:g}: mean ||grad_x L(x_t)||_2", fontsize=10)
    axes[0][j].set_ylabel("mean input-gradient norm (log)")
    outputs.plain_log_ticks(axes[0][j].yaxis)
    axes[1][j].set_title(f"{norm} eps={eps:g}: accuracy on the iterates", fontsize=10)
    axes[1][j].set_ylabel("accuracy (%)")
    for ax in axes[:, j]:
      ax.set_xlabel("iteration t")
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      ax.grid(True, alpha=0.3)
  outputs.finish_figure(
      fig, f"Gradient norms along PGD and S-O ({rows[0]['num_examples']} test points)",
      extra_handles=outputs.variant_handles(tuple(f"{a} attack" for a in attack_names)))
  return {"grad_norms.png": fig}


def plot(results: dict, out_dir: str) -> list[str]:
  return outputs.save_figures(make_figures(results), out_dir)


def markdown(results: dict, figures: list[str]) -> str:
  rows = results["rows"]
  lines = ["## Gradient norms along PGD and S-O (grad_norms, S-O paper Fig. 1)", "",
           f"{rows[0]['num_examples']} test points, {results['steps']} iterations.", ""]
  lines.append(outputs.markdown_table(
      ["model", "attack", "norm", "eps", "||g|| t=0", "||g|| max", "||g|| last", "acc. t=0",
       "acc. last"],
      [[r["model"], r["attack"], r["norm"], f"{r['eps']:g}", r["grad_norm"][0],
        max(r["grad_norm"]), r["grad_norm"][-1], f"{100 * r['accuracy'][0]:.1f}%",
        f"{100 * r['accuracy'][-1]:.1f}%"] for r in rows]))
  lines += ["Findings:", ""] + [f"- {c}" for c in results["conclusions"]] + [""]
  lines += [f"![{f}]({f})" for f in figures] + [""]
  return "\n".join(lines)


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Writes ``workdir/grad_norms/{results.json, report.md, *.png}``."""
  out_dir = outputs.output_dir(workdir, NAME)
  e = config.experiment
  dataset = datasets.load_data(config.data)
  by_method = trained_models.by_method(config, dataset, e.model_methods, workdir,
                                       progress=progress)
  rows = traces(config, dataset, by_method)
  results = {"rows": rows, "steps": int(e.steps), "conclusions": conclusions(rows),
             "models": {m.label: m.clean_accuracy for m in by_method.values()}}
  figures = plot(results, out_dir)
  outputs.write_analysis(out_dir, config, results, markdown(results, figures),
                         progress=progress)
  return results


if __name__ == "__main__":
  cli.main(run)
