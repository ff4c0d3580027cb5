"""Data parallelism with JAX's own sharding: a device mesh, batch-sharded inputs, replicated
parameters, and multi-host start-up.

Everything in krylov_adv is per example along the leading batch axis (attacks, the block-diagonal
input HVP, the batched GMRES), so sharding that axis over a ``"data"`` mesh axis lets XLA's SPMD
partitioner keep every per-example computation on the device that holds the example. The only
cross-device traffic is what the math needs: the reduction of parameter gradients in a training
step, and scalar ``any``/``all`` reductions (e.g. GMRES's "is any example still iterating"). The
Krylov basis and every per-example vector stay on their device: no gather of the batch.

Several hosts: :func:`initialize_distributed` first, then each host places its slice of every
global batch (:func:`host_local_to_global`), values that span hosts are reduced on the devices
or gathered with :func:`to_host`, and only the primary process (:func:`is_primary`) writes files.

Usage::

  mesh = parallel.make_mesh()                       # all visible devices on "data"
  x, y = parallel.shard_batch((x, y), mesh)         # leading axis split over devices
  params = parallel.replicate(params, mesh)
  step = jax.jit(train_step)                        # shardings propagate from the inputs
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
_DISTRIBUTED_INITIALIZED = False


def make_mesh(shape: Sequence[int] | None = None,
              axis_names: Sequence[str] = (DATA_AXIS,),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A device mesh; by default every visible device (all hosts) on one ``"data"`` axis.

  Args:
    shape: mesh shape, e.g. ``(8,)``; ``None`` or a ``-1`` entry uses all devices; a mesh
      smaller than the device count uses the first devices.
    axis_names: one name per mesh axis; the batch is sharded over ``"data"``.
    devices: devices to use (default ``jax.devices()``).

  Returns:
    ``jax.sharding.Mesh``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = (len(devices),)
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh dimension may be -1, got {shape}")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape = tuple(len(devices) // known if s == -1 else s for s in shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} and axis names {tuple(axis_names)} differ in length")
  need = int(np.prod(shape))
  if need > len(devices) or need < 1:
    raise ValueError(f"mesh shape {shape} needs {need} devices, {len(devices)} are visible")
  # A smaller mesh takes the first devices (e.g. (1,) runs on one device of many).
  return Mesh(np.asarray(devices[:need]).reshape(shape), tuple(axis_names))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays whose leading (batch) axis is split over the ``"data"`` mesh axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays held whole on every device (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
  """Raises ``ValueError`` unless the global batch splits evenly over the data axis.

  No padding rule is applied: padded examples would silently enter accuracies and losses.
  """
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"global batch size {batch_size} is not divisible by the {n} devices of "
                     f"the '{DATA_AXIS}' mesh axis; choose a multiple of {n}")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a pytree of global host arrays ``(B, ...)`` on the mesh, batch axis sharded.

  Single-host form: every host holds the whole global batch. For multi-host input pipelines,
  where each host reads only its shard, use :func:`host_local_to_global`.
  """
  sharding = data_sharding(mesh)

  def put(a):
    check_batch_divisible(np.shape(a)[0], mesh)
    return jax.device_put(a, sharding)

  return jax.tree_util.tree_map(put, batch)


def host_local_to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles per-host shards ``(B / num_hosts, ...)`` into global batch-sharded arrays.

  Each host passes the examples it read itself (see :func:`host_shard_indices`); the result is a
  global ``jax.Array`` of leading size ``B`` sharded over ``"data"``.
  """
  sharding = data_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)


def host_shard_indices(num_examples: int) -> np.ndarray:
  """The indices of the examples this host reads: a contiguous ``1 / process_count`` share."""
  per_host = num_examples // jax.process_count()
  start = jax.process_index() * per_host
  return np.arange(start, start + per_host)


def batch_sharding(x: Any) -> tuple[NamedSharding | None, int]:
  """The sharding of ``x``'s leading (batch) axis: ``(sharding, number of shards)``.

  ``(x.sharding, d)`` when ``x`` is a ``jax.Array`` with a ``NamedSharding`` that splits axis 0
  into ``d > 1`` pieces; ``(None, 1)`` otherwise (a NumPy array, one device, replicated). Used
  by code that re-batches a sharded batch (AutoAttack's still-robust subsets) to keep the new
  batch sharded the same way and of a size that splits evenly.
  """
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding) or not len(sharding.spec):
    return None, 1
  axes = sharding.spec[0]
  if axes is None:
    return None, 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  d = int(np.prod([sharding.mesh.shape[a] for a in axes]))
  return (sharding, d) if d > 1 else (None, 1)


def to_host(a: Any) -> np.ndarray:
  """The whole value of a (possibly multi-host) ``jax.Array`` as NumPy, on every host.

  ``np.asarray`` when this process holds all of it (one host, or replicated); otherwise an
  all-gather across processes (``multihost_utils.process_allgather``). Meant for small per-example
  vectors (predictions, masks); keep large arrays on the devices.
  """
  if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
    return np.asarray(a)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def is_primary() -> bool:
  """Whether this is the process that writes files (process 0; always true on one host)."""
  return jax.process_index() == 0


def all_hosts(flag: bool) -> bool:
  """``flag`` when it holds on every process (an all-gather of one bool); ``flag`` itself on one
  host. For choices that lead into collective work, which every host must make alike (e.g.
  "read a cached model, or train it": training is collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (parameters, optimizer state) whole on every device of the mesh."""
  return jax.device_put(tree, replicated_sharding(mesh))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Multi-host start-up through ``jax.distributed.initialize``.

  Arguments given here (e.g. from a config) win; otherwise the environment variables
  ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (JAX itself reads only the first; the other two are read here), and what JAX detects from the
  cluster (SLURM, Open MPI, Cloud TPU, ...) for whatever is still unset. Does nothing and
  returns ``False`` for a single-process run with no such settings, so that the same entry
  point serves one machine and a pod.

  Idempotent: a second call (training, then evaluation) does nothing more.

  Returns:
    ``True`` when the distributed runtime is (now) initialised.
  """
  global _DISTRIBUTED_INITIALIZED
  if _DISTRIBUTED_INITIALIZED:
    return True
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  cluster = any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                   "OMPI_COMM_WORLD_SIZE"))
  if coordinator_address is None and not cluster:
    return False
  kwargs = {}
  if coordinator_address is not None:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes is not None:
    kwargs["num_processes"] = int(num_processes)
  if process_id is not None:
    kwargs["process_id"] = int(process_id)
  jax.distributed.initialize(**kwargs)
  _DISTRIBUTED_INITIALIZED = True
  return True
