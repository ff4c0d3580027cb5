"""PSNR and SSIM of FGSM, PGD, AutoAttack and SOAE examples (the SOAE paper's Table V).

  python -m experiments.perceptual --config configs/perceptual.py --workdir /tmp/analysis
  python -m experiments.perceptual --config configs/perceptual.py:paper --workdir DIR

For each attack, the adversarial examples of the first ``num_examples`` test images are compared
with their originals: PSNR with data range 1 (images in ``[0, 1]``), the same PSNR with data
range 255 (``+ 20 log10 255 = +48.13 dB``; Table V's values of 72-82 dB at eps = 8/255 are only
reachable with that convention, since an Linf perturbation of 8/255 on every pixel has PSNR
``20 log10(255 / 8) = 30.1 dB`` with range 1), and SSIM (Wang et al. 2004, 11 x 11 Gaussian
window, sigma 1.5; ``krylov_adv.metrics``). Means are over the examples the attack actually
changed (AutoAttack returns the clean image where it fails: PSNR there is infinite) and over the
successful ones (prediction changed). SSIM needs images of at least 11 x 11, hence MNIST-sized
data for this experiment (the small config uses the real MNIST test set, split into a training
and a held-out part, or where those files are missing scikit-learn's digits upsampled to 16 x 16:
``experiments.datasets.choose_data`` decides and the run prints which).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli, datasets, outputs, trained_models
from krylov_adv import attacks, evaluation, metrics

NAME = "perceptual"


def _summary(values: np.ndarray, mask: np.ndarray) -> float | None:
  v = values[mask]
  return float(np.mean(v)) if v.size else None


def measure(logits_fn, x: np.ndarray, y: np.ndarray, x_adv: np.ndarray, *, eps: float,
            norm: str) -> dict:
  """PSNR / SSIM statistics of one attack's examples ``x_adv`` against ``x`` ``(N, H, W, C)``;
  ``ValueError`` when an example leaves the threat model (``evaluation.check_admissible``)."""
  xa, xc = jnp.asarray(x_adv), jnp.asarray(x)
  evaluation.check_admissible(xa, xc, eps=eps, norm=norm)
  psnr = np.asarray(metrics.psnr(xc, xa), np.float64)
  ssim = np.asarray(metrics.ssim(xc, xa), np.float64)
  pred = np.asarray(evaluation.predictions(logits_fn, x_adv))
  changed = np.asarray(jnp.any((xa != xc).reshape(len(x), -1), axis=1))
  success = (pred != y) & changed
  return dict(
      num_examples=len(y), perturbed=float(changed.mean()), success_rate=float(success.mean()),
      robust_accuracy=float(np.mean(pred == y)),
      psnr=_summary(psnr, changed), psnr_255=_summary(psnr + metrics.psnr_offset_for_range(255.0),
                                                      changed),
      ssim=_summary(ssim, changed), psnr_successful=_summary(psnr, success),
      ssim_successful=_summary(ssim, success),
      mean_linf=float(np.abs(x_adv - x).reshape(len(x), -1).max(axis=1).mean()),
      mean_l2=float(np.sqrt(((x_adv - x) ** 2).reshape(len(x), -1).sum(axis=1)).mean()))


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Writes ``workdir/perceptual/{results.json, report.md, *.png}``."""
  out_dir = outputs.output_dir(workdir, NAME)
  config, data_note = datasets.choose_data(config)
  if progress and data_note:
    print(data_note, flush=True)
  e = config.experiment
  dataset = datasets.load_data(config.data)
  (model,) = trained_models.by_method(config, dataset, [e.model_method], workdir,
                                      progress=progress).values()
  x, y = datasets.first_examples(dataset, e.num_examples)
  rows, examples = [], {}
  order = {name: i for i, name in enumerate(outputs.ROW_ORDER)}
  items = sorted(e.attacks.items(), key=lambda kv: order.get(kv[1].name, len(order)))
  for label, acfg in items:
    c = dict(acfg.to_dict())
    name = c.pop("name")
    if name not in attacks.available():
      rows.append(dict(attack=label, skipped=f"attack {name!r} is not registered"))
      continue
    attack = functools.partial(attacks.get(name), eps=float(e.eps), norm=e.norm, **c)
    start = time.perf_counter()
    x_adv = evaluation.run_attack(model.logits_fn, attack, x, y,
                                  jax.random.PRNGKey(config.seed + 3), eps=float(e.eps),
                                  norm=e.norm, batch_size=int(e.batch_size),
                                  keep_examples=True).x_adv
    stats = measure(model.logits_fn, x, y, x_adv, eps=float(e.eps), norm=e.norm)
    rows.append(dict(attack=label, seconds=time.perf_counter() - start, **stats))
    examples[label] = x_adv[:e.num_shown]
    if progress:
      print(f"{label}: PSNR {stats['psnr']}, SSIM {stats['ssim']}, robust acc "
            f"{stats['robust_accuracy']:.3f}", flush=True)
  results = {"rows": rows, "eps": float(e.eps), "norm": e.norm, "model": model.label,
             "clean_accuracy": model.clean_accuracy, "image_shape": list(x.shape[1:]),
             "data": dataset.name, "data_note": data_note}
  figures = plot(x[:e.num_shown], examples, out_dir,
                 title=f"Adversarial examples, {e.norm} eps={float(e.eps):g} "
                       f"({model.label} model, {dataset.name})")
  outputs.write_analysis(out_dir, config, results, markdown(results, figures),
                         progress=progress)
  return results


def make_figures(x: np.ndarray, examples: dict, *, title: str = "") -> dict:
  """``{"examples.png": figure}``: the clean images (top row) and each attack's adversarial
  examples (one row per attack, named on the left); no legend, since the rows are labelled."""
  if not examples:
    return {}
  n = len(x)
  fig, axes = outputs.figure(len(examples) + 1, n, panel_size=(1.3, 1.35))
  for j in range(n):
    for i, (label, xa) in enumerate([("clean", x), *examples.items()]):
      ax = axes[i][j]
      ax.imshow(xa[j, ..., 0] if xa.shape[-1] == 1 else xa[j], cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(label, fontsize=8)
  outputs.finish_figure(fig, title or "Clean images and adversarial examples", legend=False)
  return {"examples.png": fig}


def plot(x: np.ndarray, examples: dict, out_dir: str, *, title: str = "") -> list[str]:
  return outputs.save_figures(make_figures(x, examples, title=title), out_dir)


def _fmt(v, spec=".2f"):
  return "-" if v is None else format(v, spec)


def markdown(results: dict, figures: list[str]) -> str:
  lines = ["## PSNR and SSIM of adversarial examples (perceptual, Table V)", "",
           f"Model {results['model']} (clean accuracy {100 * results['clean_accuracy']:.1f}%), "
           f"{results['norm']} eps={results['eps']:g}, data {results.get('data', '?')}, images "
           f"{results['image_shape']}. PSNR in "
           f"dB with data range 1 and (Table V's apparent convention) 255; means over the "
           f"perturbed examples, and over the successful ones.", ""]
  table = []
  for r in results["rows"]:
    if "skipped" in r:
      table.append([r["attack"]] + ["-"] * 7 + [r["skipped"]])
      continue
    table.append([r["attack"], _fmt(r["psnr"]), _fmt(r["psnr_255"]), _fmt(r["ssim"], ".3f"),
                  _fmt(r["psnr_successful"]), _fmt(r["ssim_successful"], ".3f"),
                  f"{100 * r['success_rate']:.1f}%", f"{100 * r['robust_accuracy']:.1f}%", ""])
  lines.append(outputs.markdown_table(
      ["attack", "PSNR", "PSNR (255)", "SSIM", "PSNR succ.", "SSIM succ.", "success",
       "robust acc.", "note"], table))
  lines += [f"![{f}]({f})" for f in figures] + [""]
  return "\n".join(lines)


if __name__ == "__main__":
  cli.main(run)
