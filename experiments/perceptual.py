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
and a held-out part).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from krylov_adv import attacks, evaluation, metrics, projections

NAME = "perceptual"


def _summary(values: np.ndarray, mask: np.ndarray) -> float | None:
  v = values[mask]
  return float(np.mean(v)) if v.size else None


def measure(logits_fn, x: np.ndarray, y: np.ndarray, x_adv: np.ndarray, *, eps: float,
            norm: str) -> dict:
  """PSNR / SSIM statistics of one attack's examples ``x_adv`` against ``x`` ``(N, H, W, C)``."""
  xa, xc = jnp.asarray(x_adv), jnp.asarray(x)
  dist = np.asarray(projections.per_example_norm(xa - xc, norm))
  if dist.max(initial=0.0) > eps * (1 + 1e-5) + 1e-6:
    raise ValueError(f"adversarial examples leave the {norm} ball of radius {eps}")
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


def adversarial_examples(attack_fn, logits_fn, x: np.ndarray, y: np.ndarray, key, *,
                         batch_size: int) -> np.ndarray:
  """``attack_fn(logits_fn, x, y, key) -> x_adv`` over fixed-size batches (the last one
  padded)."""
  out = []
  n = len(y)
  for b, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, start + batch_size) % n
    valid = min(batch_size, n - start)
    res = attack_fn(logits_fn, jnp.asarray(x[idx]), jnp.asarray(y[idx]),
                    jax.random.fold_in(key, b))
    out.append(np.asarray(res)[:valid])
  return np.concatenate(out)


def run(config, workdir: str, *, progress: bool = True) -> dict:
  """Writes ``workdir/perceptual/{results.json, report.md, *.png}``."""
  out_dir = common.output_dir(workdir, NAME)
  e = config.experiment
  dataset = common.load_data(config.data)
  model = common.get_model(config, dataset, e.model_method,
                           cache_dir=os.path.join(workdir, "models"), progress=progress)
  x, y = common.first_examples(dataset, e.num_examples)
  rows, examples = [], {}
  order = {name: i for i, name in enumerate(evaluation.ROW_ORDER)}
  items = sorted(e.attacks.items(), key=lambda kv: order.get(kv[1].name, len(order)))
  for label, acfg in items:
    c = dict(acfg.to_dict())
    name = c.pop("name")
    if name not in attacks.available():
      rows.append(dict(attack=label, skipped=f"attack {name!r} is not registered"))
      continue
    attack = functools.partial(attacks.get(name), eps=float(e.eps), norm=e.norm, **c)
    start = time.perf_counter()
    x_adv = adversarial_examples(attack, model.logits_fn, x, y,
                                 jax.random.PRNGKey(config.seed + 3),
                                 batch_size=min(int(e.batch_size), len(y)))
    stats = measure(model.logits_fn, x, y, x_adv, eps=float(e.eps), norm=e.norm)
    rows.append(dict(attack=label, seconds=time.perf_counter() - start, **stats))
    examples[label] = x_adv[:e.num_shown]
    if progress:
      print(f"{label}: PSNR {stats['psnr']}, SSIM {stats['ssim']}, robust acc "
            f"{stats['robust_accuracy']:.3f}", flush=True)
  results = {"rows": rows, "eps": float(e.eps), "norm": e.norm, "model": model.label,
             "clean_accuracy": model.clean_accuracy, "image_shape": list(x.shape[1:])}
  figures = plot(x[:e.num_shown], examples, out_dir)
  common.write_results(out_dir, config, results, markdown(results, figures))
  return results


def plot(x: np.ndarray, examples: dict, out_dir: str) -> list[str]:
  if not examples:
    return []
  plt = common.pyplot()
  n = len(x)
  fig, axes = plt.subplots(len(examples) + 1, n, figsize=(1.3 * n, 1.4 * (len(examples) + 1)),
                           squeeze=False)
  for j in range(n):
    for i, (label, xa) in enumerate([("clean", x), *examples.items()]):
      ax = axes[i][j]
      ax.imshow(xa[j, ..., 0] if xa.shape[-1] == 1 else xa[j], cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(label, fontsize=7)
  return [common.save_figure(fig, os.path.join(out_dir, "examples.png"))]


def _fmt(v, spec=".2f"):
  return "-" if v is None else format(v, spec)


def markdown(results: dict, figures: list[str]) -> str:
  lines = ["## PSNR and SSIM of adversarial examples (perceptual, Table V)", "",
           f"Model {results['model']} (clean accuracy {100 * results['clean_accuracy']:.1f}%), "
           f"{results['norm']} eps={results['eps']:g}, images {results['image_shape']}. PSNR in "
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
  lines.append(common.markdown_table(
      ["attack", "PSNR", "PSNR (255)", "SSIM", "PSNR succ.", "SSIM succ.", "success",
       "robust acc.", "note"], table))
  lines += [f"![{f}]({f})" for f in figures] + [""]
  return "\n".join(lines)


if __name__ == "__main__":
  common.main(run)
