"""Krylov dimension m reached per GMRES threshold tau (the SOAE paper's Table IV and Fig. 2).

  python -m experiments.krylov_dims --config configs/krylov_dims.py --workdir /tmp/analysis
  python -m experiments.krylov_dims --config configs/krylov_dims.py:paper --workdir DIR

For a batch of test images the Newton system of Algorithm 1 (steps 2-17) is solved at the clean
point: ``H delta = g`` from ``delta_0 = g`` (so ``r_0 = g - H g``), with the exact HVP and the
forward finite difference (Eq. 22). GMRES's iterates do not depend on the threshold (it only
stops them), so one run with the smallest tau gives every tau's dimension: ``m(tau)`` is the
first step ``j`` with ``||r_j|| <= tau ||r_0||`` (``max_dim`` when never reached). Reported: mean
and max of m over examples and the fraction that converged, per tau, HVP method and model.

Rank check. For a network that is piecewise linear in its input (ReLU, max/avg pooling) the
input Hessian of the cross-entropy is ``J^T (diag(p) - p p^T) J`` with ``J`` the logit Jacobian,
of rank at most ``K - 1``; with ``g = J^T (p - e_y)`` in its range, exact-arithmetic GMRES stops
after at most ``rank(H) <= K - 1`` steps. The experiment also computes the full per-example
Hessians of a few examples (``jax.hessian``) and reports their numerical rank.

Fig. 2: robust accuracy under SOAE and its wall time per tau of ``attack_taus`` (median of
``timing_repeats`` runs after a compiling one, with min and max).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, datasets, outputs, timing, trained_models
from krylov_adv import attacks, evaluation, krylov

NAME = "krylov_dims"


@functools.partial(jax.jit, static_argnames=("logits_fn", "method", "eta", "tol", "max_dim"))
def newton_residual_histories(logits_fn, x: jax.Array, y: jax.Array, *, method: str, eta: float,
                              tol: float, max_dim: int) -> krylov.GMRESResult:
  """GMRES on Algorithm 1's system ``H_i delta_i = g_i`` from ``delta_0 = g`` at ``x``: the
  solve of SOAE's first iteration (:func:`krylov_adv.attacks.soae_direction`).

  Args:
    logits_fn: ``(B, H, W, C) -> (B, K)`` (static).
    x: ``(B, H, W, C)``; y: ``(B,)``.
    method: HVP method of ``krylov_adv.hvp.make_hvp``; eta: its difference step.
    tol: the smallest tau of the sweep; max_dim: Krylov dimension cap.

  Returns:
    The :class:`krylov_adv.krylov.GMRESResult` (``residual_history (B, max_dim)``,
    ``initial_residual_norm (B,)``, ``num_iters (B,)``).
  """
  loss_fn = trained_models.cross_entropy_fn(logits_fn, y)
  return attacks.soae_direction(loss_fn, x, tau=tol, m=max_dim, hvp=method, eta=eta).gmres


def dims_per_tau(history: np.ndarray, r0: np.ndarray, taus, max_dim: int):
  """``m(tau)`` per example from residual histories.

  Args:
    history: ``(B, max_dim)`` ``||r_j||`` after step ``j = 1..`` (NaN after the run stopped).
    r0: ``(B,)`` ``||r_0||``.
    taus: thresholds.

  Returns:
    ``(dims (T, B) int, converged (T, B) bool)``: the first ``j`` with ``||r_j|| <= tau
    ||r_0||`` (GMRES's stopping rule), ``max_dim`` and ``False`` where no step reached it.
  """
  history = np.asarray(history, np.float64)
  r0 = np.asarray(r0, np.float64)
  dims, conv = [], []
  for tau in taus:
    with np.errstate(invalid="ignore"):
      hit = history <= tau * r0[:, None]
    # r_0 = 0 needs no step at all.
    zero = r0 == 0
    any_hit = hit.any(axis=1)
    first = np.where(any_hit, hit.argmax(axis=1) + 1, max_dim)
    dims.append(np.where(zero, 0, first))
    conv.append(any_hit | zero)
  return np.stack(dims), np.stack(conv)


def hessian_ranks(logits_fn, x: np.ndarray, y: np.ndarray, *, rtol: float) -> np.ndarray:
  """Numerical rank of each example's full input Hessian (``jax.hessian`` in float32):
  singular values above ``rtol`` times the largest. ``(B,)`` int."""
  shape = x.shape[1:]

  def loss_one(xf, yi):
    return trained_models.cross_entropy_fn(logits_fn, yi[None])(xf.reshape((1,) + shape))[0]

  hess = jax.jit(jax.vmap(jax.hessian(loss_one)))(jnp.asarray(x.reshape(len(x), -1)),
                                                   jnp.asarray(y))
  sv = np.linalg.svd(np.asarray(hess, np.float64), compute_uv=False)
  return (sv > rtol * sv[:, :1]).sum(axis=1)


def dims_part(config, dataset, models_by_act) -> list[dict]:
  e = config.experiment
  x, y = datasets.first_examples(dataset, e.num_examples)
  taus = sorted((float(t) for t in e.taus), reverse=True)
  max_dim = int(e.max_dim)
  rows = []
  for act, model in models_by_act.items():
    for method in e.hvp_methods:
      res = newton_residual_histories(model.logits_fn, jnp.asarray(x), jnp.asarray(y),
                                      method=method, eta=float(e.eta), tol=min(taus),
                                      max_dim=max_dim)
      res = jax.device_get(res)
      dims, conv = dims_per_tau(res.residual_history, res.initial_residual_norm, taus, max_dim)
      for ti, tau in enumerate(taus):
        rows.append(dict(activation=act, hvp=method, eta=None if method.startswith("exact")
                         else float(e.eta), tau=tau, m_mean=float(dims[ti].mean()),
                         m_max=int(dims[ti].max()), m_median=float(np.median(dims[ti])),
                         converged=float(conv[ti].mean()), num_examples=len(y)))
  return rows


def rank_part(config, dataset, models_by_act) -> dict:
  e = config.experiment
  x, y = datasets.first_examples(dataset, e.rank_examples)
  out = {"num_classes": dataset.num_classes, "input_dim": int(np.prod(x.shape[1:])),
         "rtol": float(e.rank_rtol)}
  for act, model in models_by_act.items():
    ranks = hessian_ranks(model.logits_fn, x, y, rtol=float(e.rank_rtol))
    out[act] = {"ranks": ranks.tolist(), "max": int(ranks.max())}
  return out


def attack_with_diagnostics(logits_fn, attack, x: np.ndarray, y: np.ndarray, key, *, eps: float,
                            norm: str, batch_size: int):
  """Runs ``attack`` (``soae_with_report``, partially applied) over the test set with
  ``evaluation.run_attack``.

  Returns:
    ``(robust accuracy, Krylov dimensions (N, n) per outer iteration and example, fallback
    flags (N, n))``; raises ``ValueError`` if an example leaves the threat model.
  """
  run = evaluation.run_attack(logits_fn, attack, x, y, key, eps=eps, norm=norm,
                              batch_size=batch_size)
  # Diagnostics are (outer iteration, batch): keep each batch's real examples.
  dims = np.concatenate([np.asarray(d.num_iters)[:, :v] for d, v in run.extras], axis=1)
  fell = np.concatenate([np.asarray(d.fallback)[:, :v] for d, v in run.extras], axis=1)
  return int(run.correct.sum()) / len(y), dims, fell


def soae_part(config, dataset, models_by_act) -> dict:
  e = config.experiment
  if "soae" not in attacks.available():
    return {"skipped": "attack 'soae' is not registered"}
  x, y = datasets.first_examples(dataset, e.attack_examples)
  rows = []
  for act, model in models_by_act.items():
    for method in e.attack_hvp_methods:
      for tau in sorted((float(t) for t in e.attack_taus), reverse=True):
        kw = dict(e.soae.to_dict(), hvp=method, tau=tau, m=int(e.max_dim))
        if not method.startswith("exact"):
          kw["eta"] = float(e.eta)
        attack = functools.partial(attacks.soae_with_report, eps=float(e.eps), norm=e.norm,
                                   **kw)
        key = jax.random.PRNGKey(config.seed + 11)
        # The first call compiles; the timed repeats measure the attack alone, and the last
        # one's accuracy and diagnostics are reported (every repeat is the same computation).
        timed, (acc, dims, fell) = timing.measure(
            lambda: attack_with_diagnostics(model.logits_fn, attack, x, y, key,
                                            eps=float(e.eps), norm=e.norm,
                                            batch_size=int(e.batch_size)),
            repeats=int(e.timing_repeats), warmup=1)
        rows.append(dict(activation=act, hvp=method, tau=tau, robust_accuracy=acc,
                         clean_accuracy=model.clean_accuracy,
                         seconds=timed.median, seconds_min=timed.min, seconds_max=timed.max,
                         timing_repeats=timed.repeats,
                         attack_m_mean=float(dims.mean()), attack_m_max=int(dims.max()),
                         fallback_rate=float(fell.mean())))
  for r in rows:
    base = [q for q in rows if (q["activation"], q["hvp"]) == (r["activation"], r["hvp"])]
    # Ratio of medians of repeated timings.
    r["time_relative_to_largest_tau"] = r["seconds"] / max(base, key=lambda q: q["tau"])["seconds"]
  return {"rows": rows, "num_examples": len(y), "eps": float(e.eps), "norm": e.norm}


def conclusions(results: dict) -> list[str]:
  out = []
  ranks = results["ranks"]
  k = ranks["num_classes"]
  rows = results["dims"]
  for act in dict.fromkeys(r["activation"] for r in rows):
    exact = [r for r in rows if r["activation"] == act and r["hvp"] == "exact"]
    line = f"{act} model: "
    if exact:
      smallest = min(exact, key=lambda r: r["tau"])
      line += (f"with the exact HVP, m at tau = {smallest['tau']:g} is {smallest['m_mean']:.1f} "
               f"on average and {smallest['m_max']} at most (K - 1 = {k - 1}; input dimension "
               f"{ranks['input_dim']}). ")
    if act in ranks:
      line += f"Numerical rank of the full input Hessian: max {ranks[act]['max']} over " \
              f"{len(ranks[act]['ranks'])} examples. "
    fd = [r for r in rows if r["activation"] == act and r["hvp"] != "exact"]
    if fd:
      smallest = min(fd, key=lambda r: r["tau"])
      line += (f"With {smallest['hvp']} (eta = {smallest['eta']:g}) m at tau = "
               f"{smallest['tau']:g} is {smallest['m_mean']:.1f} on average, {smallest['m_max']} "
               f"at most, {100 * smallest['converged']:.0f}% converged.")
    out.append(line)
  relu_exact = [r for r in rows if r["activation"] == "relu" and r["hvp"] == "exact"]
  if relu_exact:
    m_max = max(r["m_max"] for r in relu_exact)
    out.append(
        f"ReLU: the input Hessian J^T (diag(p) - p p^T) J has rank <= K - 1 = {k - 1}; the "
        f"measured exact-HVP Krylov dimension is at most {m_max} over all tau, "
        + ("consistent with that bound: the Krylov space is exhausted after at most K - 1 steps, "
           "so for ReLU networks a large m (the paper's Table IV reports up to 152 on MNIST) "
           "cannot come from the exact Hessian." if m_max <= k - 1 else
           "above the bound, which rounding (loss of orthogonality in float32) or kinks at the "
           "evaluation point explain."))
  return out


def _series(rows, *fields):
  """The distinct values of ``fields`` in ``rows``, in order of appearance."""
  return list(dict.fromkeys(tuple(r[f] for f in fields) for r in rows))


def make_figures(results: dict) -> dict:
  """``{file name: figure}``: ``m_per_tau.png`` and, when SOAE ran,
  ``soae_accuracy_time_per_tau.png``."""
  figs = {}
  rows = results["dims"]
  acts = [a for (a,) in _series(rows, "activation")]
  methods = [m for (m,) in _series(rows, "hvp")]
  fig, axes = outputs.figure(1, len(acts))
  for ax, act in zip(axes[0], acts):
    for i, method in enumerate(methods):
      sel = sorted((r for r in rows if (r["activation"], r["hvp"]) == (act, method)),
                   key=lambda r: r["tau"])
      if not sel:
        continue
      taus = [r["tau"] for r in sel]
      ax.loglog(taus, [max(r["m_mean"], 0.5) for r in sel], label=f"{method} HVP",
                **outputs.series_style(i, 0))
      ax.loglog(taus, [max(r["m_max"], 0.5) for r in sel], **outputs.series_style(i, 1))
    ax.axhline(results["ranks"]["num_classes"] - 1, color="k", ls=":", lw=1, label="K - 1")
    ax.invert_xaxis()
    ax.set_title(f"{act} model", fontsize=10)
    ax.set_xlabel("GMRES threshold tau (smaller to the right)")
    ax.set_ylabel("Krylov dimension m (log)")
    outputs.plain_log_ticks(ax.yaxis)
    ax.grid(True, which="both", alpha=0.3)
  outputs.finish_figure(
      fig, f"Krylov dimension m per tau ({rows[0]['num_examples']} test points)",
      extra_handles=outputs.variant_handles(("mean over examples", "max over examples")))
  figs["m_per_tau.png"] = fig

  soae = results["soae"]
  if "rows" in soae:
    fig, axes = outputs.figure(1, 2)
    acc_ax, time_ax = axes[0]
    for i, key in enumerate(_series(soae["rows"], "activation", "hvp")):
      sel = sorted((r for r in soae["rows"] if (r["activation"], r["hvp"]) == key),
                   key=lambda r: r["tau"])
      taus = [r["tau"] for r in sel]
      style = outputs.series_style(i)
      acc_ax.semilogx(taus, [100 * r["robust_accuracy"] for r in sel],
                      label=f"{key[0]} model, {key[1]} HVP", **style)
      if all("seconds_min" in r for r in sel):
        med = np.array([r["seconds"] for r in sel])
        err = np.array([[m - r["seconds_min"] for m, r in zip(med, sel)],
                        [r["seconds_max"] - m for m, r in zip(med, sel)]])
        time_ax.errorbar(taus, med, yerr=err, capsize=3, **style)
    for ax in (acc_ax, time_ax):
      ax.set_xscale("log")
      ax.invert_xaxis()
      ax.set_xlabel("GMRES threshold tau (smaller to the right)")
      ax.grid(True, which="both", alpha=0.3)
    acc_ax.set_ylabel("robust accuracy (%)")
    acc_ax.set_title("robust accuracy under SOAE", fontsize=10)
    repeats = {r.get("timing_repeats") for r in soae["rows"]}
    time_ax.set_ylabel("seconds per attack run")
    time_ax.set_title(f"wall time (median, min-max of {'/'.join(map(str, repeats))} runs)",
                      fontsize=10)
    outputs.finish_figure(
        fig, f"SOAE per tau ({soae['num_examples']} test points, {soae['norm']} "
        f"eps={soae['eps']:g})")
    figs["soae_accuracy_time_per_tau.png"] = fig
  return figs


def plot(results: dict, out_dir: str) -> list[str]:
  return outputs.save_figures(make_figures(results), out_dir)


def markdown(results: dict, figures: list[str]) -> str:
  rows = results["dims"]
  taus = sorted({r["tau"] for r in rows}, reverse=True)
  lines = ["## Krylov dimension per tau (krylov_dims)", "",
           f"Newton system of Algorithm 1 at {rows[0]['num_examples']} clean test points; "
           f"cells are mean / max of m over examples (converged fraction in brackets).", ""]
  table = []
  for key in dict.fromkeys((r["activation"], r["hvp"]) for r in rows):
    by_tau = {r["tau"]: r for r in rows if (r["activation"], r["hvp"]) == key}
    table.append(list(key) + [f"{by_tau[t]['m_mean']:.1f} / {by_tau[t]['m_max']} "
                              f"({100 * by_tau[t]['converged']:.0f}%)" for t in taus])
  lines.append(outputs.markdown_table(["model", "hvp"] + [f"tau={t:g}" for t in taus], table))
  lines += ["Findings:", ""] + [f"- {c}" for c in conclusions(results)] + [""]
  soae = results["soae"]
  lines += ["### Robust accuracy and time of SOAE per tau (Fig. 2)", ""]
  if "rows" in soae:
    lines.append(f"{soae['num_examples']} test points, {soae['norm']} eps={soae['eps']:g}.")
    lines.append("")
    lines.append(outputs.markdown_table(
        ["model", "hvp", "tau", "robust acc.", "m mean (attack)", "m max (attack)",
         "fallback", "seconds: median [min, max]", "time / largest tau"],
        [[r["activation"], r["hvp"], f"{r['tau']:g}", f"{100 * r['robust_accuracy']:.1f}%",
          r["attack_m_mean"], r["attack_m_max"], f"{100 * r['fallback_rate']:.0f}%",
          f"{r['seconds']:.3g} [{r['seconds_min']:.3g}, {r['seconds_max']:.3g}] "
          f"({r['timing_repeats']} runs)", r["time_relative_to_largest_tau"]]
         for r in soae["rows"]]))
  else:
    lines += [f"Skipped: {soae['skipped']}.", ""]
  lines += [f"![{f}]({f})" for f in figures] + [""]
  return "\n".join(lines)


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Writes ``workdir/krylov_dims/{results.json, report.md, *.png}``."""
  out_dir = outputs.output_dir(workdir, NAME)
  dataset = datasets.load_data(config.data)
  e = config.experiment
  by_act = trained_models.by_activation(config, dataset, e.activations, workdir,
                                        progress=progress)
  results = {"dims": dims_part(config, dataset, by_act),
             "ranks": rank_part(config, dataset, by_act),
             "soae": soae_part(config, dataset, by_act),
             "models": {m.label: m.clean_accuracy for m in by_act.values()}}
  results["conclusions"] = conclusions(results)
  figures = plot(results, out_dir)
  outputs.write_analysis(out_dir, config, results, markdown(results, figures),
                         progress=progress)
  return results


if __name__ == "__main__":
  cli.main(run)
