"""Data parallelism on 8 simulated CPU devices (XLA_FLAGS set in conftest.py): sharded results
equal single-device results, and per-example work never gathers the batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from krylov_adv import hvp, krylov, losses, parallel
from krylov_adv.models.cnn import TinyCNN

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope="module")
def model_and_batch():
  model = TinyCNN(num_classes=10, activation=jax.nn.softplus)
  x = jax.random.uniform(jax.random.PRNGKey(0), (16, 8, 8, 1))
  y = jax.random.randint(jax.random.PRNGKey(1), (16,), 0, 10)
  params = model.init(jax.random.PRNGKey(2), x[:1])
  return model, params, x, y


def test_mesh_construction(mesh):
  assert mesh.shape == {"data": 8}
  assert parallel.make_mesh((2, -1), ("data", "model")).shape == {"data": 2, "model": 4}
  assert parallel.make_mesh((1,)).devices.size == 1
  with pytest.raises(ValueError, match="devices"):
    parallel.make_mesh((16,))
  with pytest.raises(ValueError, match="length"):
    parallel.make_mesh((8,), ("data", "model"))


def test_indivisible_batch_is_a_clear_error(mesh):
  with pytest.raises(ValueError, match="not divisible"):
    parallel.shard_batch(np.zeros((12, 3), np.float32), mesh)


def test_shard_batch_places_examples_on_devices(mesh):
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  xs = parallel.shard_batch(x, mesh)
  assert xs.sharding == parallel.data_sharding(mesh)
  shards = sorted(xs.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8 and all(s.data.shape == (2, 3) for s in shards)
  np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), x)


def test_batch_sharding_and_to_host(mesh):
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  assert parallel.batch_sharding(x) == (None, 1)
  assert parallel.batch_sharding(jax.numpy.asarray(x)) == (None, 1)
  assert parallel.batch_sharding(parallel.replicate(x, mesh)) == (None, 1)
  xs = parallel.shard_batch(x, mesh)
  sharding, shards = parallel.batch_sharding(xs)
  assert shards == 8 and sharding == parallel.data_sharding(mesh)
  np.testing.assert_array_equal(parallel.to_host(xs), x)
  assert parallel.is_primary()


def _newton_solve(model, params):
  def solve(x, y):
    loss_fn = lambda z: losses.cross_entropy(model.apply(params, z), y)
    op = hvp.make_hvp(loss_fn, x, method="exact")
    res = krylov.gmres(op.matvec, op.grad, op.grad, tol=1e-3, max_dim=8)
    return res.x, res.num_iters, res.residual_norm
  return solve


@pytest.mark.slow
def test_sharded_gmres_matches_single_device_without_gather(mesh, model_and_batch):
  model, params, x, y = model_and_batch
  solve = jax.jit(_newton_solve(model, params))
  single = solve(x, y)
  xs, ys = parallel.shard_batch((x, y), mesh)
  sharded = solve(xs, ys)
  for got, want in zip(sharded, single):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  assert sharded[0].sharding.is_equivalent_to(parallel.data_sharding(mesh), x.ndim)
  hlo = solve.lower(xs, ys).compile().as_text()
  # Per-example Krylov work stays on its device: only scalar reductions cross devices.
  assert "all-gather" not in hlo and "all-to-all" not in hlo


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [
    ("pgd", dict(steps=3, step_size=0.05)),
    ("soae", dict(steps=2, m=4, tau=1e-3, hvp="exact")),
])
def test_sharded_attacks_match_single_device_without_gather(mesh, model_and_batch, name, kwargs):
  from krylov_adv import attacks
  model, params, x, y = model_and_batch
  logits_fn = jax.tree_util.Partial(model.apply, params)
  attack = attacks.get(name)
  key = jax.random.PRNGKey(3)
  run = jax.jit(lambda x, y: attack(logits_fn, x, y, key, eps=0.1, norm="linf", **kwargs))
  single = run(x, y)
  xs, ys = parallel.shard_batch((x, y), mesh)
  sharded = run(xs, ys)
  np.testing.assert_allclose(sharded, single, atol=1e-5)
  assert sharded.sharding.is_equivalent_to(parallel.data_sharding(mesh), x.ndim)
  hlo = run.lower(xs, ys).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo


def _tiny_config(method, mesh_shape):
  from configs import test_tiny
  c = test_tiny.get_config(method)
  c.parallel.mesh_shape = mesh_shape
  return c


@pytest.mark.slow
@pytest.mark.parametrize("method", ["standard", "pgd"])
def test_sharded_training_matches_one_device_and_checkpoint_moves_8_to_1(tmp_path, method):
  from experiments import pipeline
  pytest.importorskip("orbax.checkpoint")
  if method != "standard":
    from krylov_adv import attacks
    if "pgd" not in attacks.available():
      pytest.skip("pgd attack not registered")
  # Uninterrupted two epochs on one device.
  _, ref = pipeline.train(_tiny_config(method, (1,)), str(tmp_path / "one"), progress=False)
  # One epoch on 8 devices, killed, then resumed on a single device from the 8-device checkpoint.
  exp8, state8 = pipeline.train(_tiny_config(method, (8,)), str(tmp_path / "moved"),
                                stop_after_epoch=1, progress=False)
  leaf = jax.tree_util.tree_leaves(state8.params)[0]
  assert len(leaf.sharding.device_set) == 8  # really replicated over the 8-device mesh
  _, moved = pipeline.train(_tiny_config(method, (1,)), str(tmp_path / "moved"), progress=False)
  assert int(moved.step) == int(ref.step)
  assert len(jax.tree_util.tree_leaves(moved.params)[0].sharding.device_set) == 1
  for a, b in zip(jax.tree_util.tree_leaves(moved.params), jax.tree_util.tree_leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_indivisible_training_batch_is_rejected(tmp_path):
  from experiments import pipeline
  c = _tiny_config("standard", (8,))
  c.train.batch_size = 12
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train(c, str(tmp_path), progress=False)


@pytest.mark.slow
def test_sharded_evaluation_matches_single_device(mesh, digits_model):
  from krylov_adv import evaluation
  m = digits_model
  x, y = m.x_test[:20], m.y_test[:20]  # 20 examples: batches are padded to multiples of 8
  cfgs = {"clean": dict(label="clean", name="clean", norm="linf", eps=0.0),
          "pgd": dict(label="PGD-3", name="pgd", norm="linf", eps=0.1, steps=3, step_size=0.05)}
  key = jax.random.PRNGKey(0)
  sharded = evaluation.evaluate_attacks(m.logits_fn, x, y, cfgs, key, batch_size=12, mesh=mesh)
  assert [r.accuracy for r in sharded][0] == 1.0  # x_test holds correctly classified points
  assert [r.num_examples for r in sharded] == [20, 20]
  # On 8 devices a batch of 12 is padded to 16 (padding rule), so the single-device reference
  # uses batches of 16: the same PGD noise per batch.
  single = evaluation.evaluate_attacks(m.logits_fn, x, y, cfgs, key, batch_size=16)
  assert [r.accuracy for r in sharded] == [r.accuracy for r in single]
  assert sharded[1].accuracy < 1.0  # the attack really ran


@pytest.mark.slow
def test_sharded_autoattack_matches_single_device(mesh, digits_model):
  from krylov_adv import attacks
  from krylov_adv.attacks import _autoattack as aa
  assert aa._bucket(3, 16, 8) == 8 and aa._bucket(9, 16, 8) == 16 and aa._bucket(5, 64) == 8
  m = digits_model
  x, y = m.x_test[:16], m.y_test[:16]
  fast = dict(apgd_ce=dict(steps=5), apgd_t=dict(steps=5, n_target_classes=2),
              fab_t=dict(steps=5, n_target_classes=2), square=dict(steps=20))
  run = lambda x, y: attacks.autoattack_with_report(m.logits_fn, x, y, jax.random.PRNGKey(0),
                                                    eps=0.1, norm="linf", hyperparameters=fast)
  x_single, single = run(x, y)
  x_sharded, sharded = run(*parallel.shard_batch((x, y), mesh))
  # Every component ran, on still-robust subsets that shrink (padded to multiples of 8).
  assert sharded.components == ("apgd_ce", "apgd_t", "fab_t", "square")
  assert all(s > 0 for s in sharded.seconds)
  assert 0.0 < sharded.robust_accuracy < sharded.clean_accuracy == 1.0
  assert sharded.robust_accuracy_after == single.robust_accuracy_after
  np.testing.assert_array_equal(sharded.robust, single.robust)
  np.testing.assert_allclose(x_sharded, x_single, atol=1e-5)
  assert x_sharded.sharding.is_equivalent_to(parallel.data_sharding(mesh), x.ndim)


class _FakeInitialize:
  """Stands in for ``jax.distributed.initialize``: records its keyword arguments."""

  def __init__(self):
    self.calls = []

  def __call__(self, **kwargs):
    self.calls.append(kwargs)


@pytest.fixture
def fake_initialize(monkeypatch):
  fake = _FakeInitialize()
  monkeypatch.setattr(jax.distributed, "initialize", fake)
  monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
              "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  return fake


def test_distributed_start_up_sources(fake_initialize, monkeypatch):
  # One machine, nothing configured: no distributed runtime.
  assert parallel.initialize_distributed() is False and fake_initialize.calls == []
  # The standard environment variables (JAX reads only the coordinator itself).
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert parallel.initialize_distributed() is True
  assert fake_initialize.calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                        process_id=3)]
  # Idempotent: training then evaluation in one process start it once.
  assert parallel.initialize_distributed("other:1", 2, 0) is True
  assert len(fake_initialize.calls) == 1


def test_distributed_start_up_config_wins_over_environment(fake_initialize, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert parallel.initialize_distributed("host:99", 2, 1) is True
  assert fake_initialize.calls == [dict(coordinator_address="host:99", num_processes=2,
                                        process_id=1)]


def test_distributed_start_up_on_a_cluster_leaves_detection_to_jax(fake_initialize, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "17")
  assert parallel.initialize_distributed() is True
  assert fake_initialize.calls == [{}]
