"""Runs that cannot lie: what guards a workdir of ``experiments.soat`` (and the entry points that
read one) against being resumed with another config, shared by two runs, restored from a damaged
checkpoint, or ended by a traceback for a user's mistake.

Files it keeps in a (single-method) workdir ``W`` (``W/<method>`` when ``train.method`` lists
several; the lock sits in the top workdir):

  run_config.json   the config the run was started with (flattened, dotted keys; without the
                    ``data.*`` fields its data source does not read, :func:`unread_data_fields`)
                    and the history of allowed changes. A rerun compares its config with it
                    (:func:`check_run_config`): fields in :data:`CHANGEABLE_ON_RESUME` may change,
                    and other methods' blocks (``train.<other method>.*``) are not compared;
                    any other difference is refused with one line naming the fields.
  checksums.json    ``{step: sha256}`` of every saved checkpoint's arrays
                    (:func:`state_checksum`), written atomically *before* orbax starts the save
                    and after the previous save has finished, and never dropped for a step
                    still on disk (:func:`save_checkpoint`), so every finished checkpoint has
                    its checksum, whenever the run is killed. :func:`restore_newest` skips a
                    checkpoint that fails to restore or whose restored arrays do not hash to the
                    recorded value, and restores the newest one that does; beside a run that
                    trains in the workdir it passes over checkpoints deleted meanwhile.
  lock              held with ``fcntl.flock`` while a run uses the workdir
                    (:func:`workdir_lock`); holds the pid, host and start time of the holder.
                    A multi-method run also locks ``W/<method>``, and a run inside a locked
                    folder is refused (:func:`in_use_by`).

Every file is written through a temporary file in the same folder and a rename
(:func:`atomic_write_text`), or appended with ``O_NOFOLLOW`` (:func:`append_line`): a full disk
or a kill leaves the previous file whole, and a symlink planted in the workdir is never written
through.
  damaged_checkpoints/<step>   checkpoints found damaged, moved out of orbax's folder (kept for
                    inspection, never deleted) so that the resumed run can save that step again.

Command line helpers: :class:`ConfigError` (a user's mistake: printed as one line, exit 2),
:func:`parse_flags` (absl ``flags_parser`` that turns every flag and config-override error into
a ConfigError), :func:`run_cli` (the one place that prints those one-liners, and the lines for
Ctrl-C ``interrupted after epoch N; rerun the same command to resume``, exit 130, SIGTERM
``terminated (SIGTERM) after epoch N; ...``, exit 143, and a full disk ``error: no space left
on device in W; stopped after epoch N ...``, exit 1, where N is the newest checkpoint finished
on disk), :func:`require_trained_workdir` (``evaluate`` refuses a missing workdir without
creating it) and :func:`require_writable` (it refuses a read-only one before attacking).

Multi-host: every process runs the same code on the same (shared) workdir. The lock is per host:
process ``i > 0`` locks ``lock.<i>``, so a second run on the same hosts fails on every host at
once (``flock`` on a network file system is only as good as that file system's lock support;
on one whose locks are host-local each host still excludes its own second run). Only the primary
process writes ``run_config.json`` and ``checksums.json`` and moves damaged checkpoints; every
process reads them, so they agree on the step to restore as long as they read the same files.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np

RUN_CONFIG_FILE = "run_config.json"
CHECKSUMS_FILE = "checksums.json"
LOCK_FILE = "lock"
DAMAGED_DIR = "damaged_checkpoints"
CHECKPOINT_DIR = "checkpoints"

# The config fields that may differ between a workdir's first run and a rerun that resumes it;
# every other field defines the run (data, model, seed, training recipe) and must match.
#   "any":  may change freely.
#   "grow": may only increase (train further). Note: the learning-rate schedule is a function
#           of train.epochs (cosine, piecewise), so a run extended from 10 to 20 epochs is not the
#           run a fresh 20-epoch config gives; run_config.json records each extension.
CHANGEABLE_ON_RESUME: dict[str, str] = {
    "train.epochs": "grow",         # train further
    "eval.*": "any",                # evaluation attacks, num_examples, batch_size
    "parallel.*": "any",            # mesh and multi-host start-up: results do not depend on them
    "checkpoint.*": "any",          # how many checkpoints to keep
    "data.data_dir": "any",         # where tensorflow-datasets keeps its files
    "data.test_split": "any",       # analyses only (soat ignores it): which points are measured
    "models_dir": "any",            # analyses only: where trained checkpoints are read from
    "experiment.*": "any",          # analyses only: the experiment's own measurement settings
}


class ConfigError(ValueError):
  """A user's mistake in the command line, config or workdir; its message is one line that says
  what is wrong and names the config field. :func:`run_cli` prints it without a traceback."""


class WorkdirInUse(ConfigError):
  """Another live process holds the workdir's lock."""


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir restores (each one is unreadable or fails its checksum)."""


# ---------------------------------------------------------------------------------------------
# Small file helpers


def atomic_write_text(path: str, text: str, *, mode: int = 0o644) -> None:
  """Writes ``text`` to ``path`` through a fresh temporary file in the same folder, ``fsync`` and
  ``os.replace``: a reader (or a run killed mid-write, or a write cut by a full disk) sees the
  old file or the new one, never a part. The temporary file is created with ``O_EXCL`` (a name
  planted in advance, symlink included, is never opened) and the rename replaces a symlink
  planted at ``path`` instead of writing through it; on any error the temporary file is removed
  and ``path`` is left as it was."""
  atomic_write_bytes(path, text.encode(), mode=mode)


def atomic_write_bytes(path: str, data: bytes, *, mode: int = 0o644) -> None:
  """:func:`atomic_write_text` for bytes (e.g. an ``.npz`` archive built in memory)."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def append_line(path: str, line: str) -> None:
  """Appends ``line`` (one record, newline added) to ``path``, created if needed, refusing to
  write through a symlink planted at ``path`` (``O_NOFOLLOW``: :class:`ConfigError`)."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise ConfigError(f"{path} is a symbolic link; refusing to write through it (remove "
                        f"it)") from None
    raise
  with os.fdopen(fd, "a") as f:
    f.write(line.rstrip("\n") + "\n")


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _one_line(text: Any, limit: int = 160) -> str:
  """The first non-empty line of ``text``, at most ``limit`` characters."""
  lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
  line = lines[0] if lines else ""
  return line if len(line) <= limit else line[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# 1. Config fingerprint


def flatten_config(config) -> dict[str, Any]:
  """``{"train.learning_rate": 0.1, ...}``: every leaf of ``config`` (a ``ConfigDict`` or nested
  dict) under its dotted path, as JSON values (tuples become lists; empty blocks are left
  out, so filling ``model.options`` shows as its new fields)."""
  tree = json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(
      json.dumps(config, default=list))
  flat: dict[str, Any] = {}

  def walk(prefix: str, node):
    if isinstance(node, dict):  # an empty block adds no field
      for key in sorted(node):
        walk(f"{prefix}{key}.", node[key])
    else:
      flat[prefix[:-1]] = node

  walk("", tree)
  return flat


def _rule(field: str) -> str | None:
  for pattern, rule in CHANGEABLE_ON_RESUME.items():
    if fnmatch.fnmatchcase(field, pattern):
      return rule
  return None


class ConfigChange(NamedTuple):
  """One field that differs: ``stored`` / ``current`` are ``MISSING`` when a side lacks it."""
  field: str
  stored: Any
  current: Any


MISSING = "<unset>"


def config_changes(stored: dict[str, Any], current: dict[str, Any]
                   ) -> tuple[list[ConfigChange], list[ConfigChange]]:
  """``(refused, allowed)``: the fields of two flattened configs that differ, split by
  :data:`CHANGEABLE_ON_RESUME` (a ``grow`` field that shrinks is refused)."""
  refused, allowed = [], []
  for field in sorted(set(stored) | set(current)):
    a, b = stored.get(field, MISSING), current.get(field, MISSING)
    if a == b:
      continue
    change = ConfigChange(field, a, b)
    rule = _rule(field)
    if rule == "any":
      allowed.append(change)
    elif (rule == "grow" and isinstance(a, (int, float)) and isinstance(b, (int, float))
          and b > a):
      allowed.append(change)
    else:
      refused.append(change)
  return refused, allowed


def _show(value: Any) -> str:
  return value if isinstance(value, str) else json.dumps(value)


def mismatch_message(workdir: str, refused: list[ConfigChange], limit: int = 6) -> str:
  """``workdir W was trained with a=1, b=relu; this config has 2, softplus: use a new
  workdir`` (at most ``limit`` fields, then ``and N more``)."""
  shown = refused[:limit]
  more = f" (and {len(refused) - limit} more)" if len(refused) > limit else ""
  was = ", ".join(f"{c.field}={_show(c.stored)}" for c in shown)
  now = ", ".join(_show(c.current) for c in shown)
  return (f"workdir {workdir} was trained with {was}{more}; this config has {now}: use a new "
          f"workdir")


def saved_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps in ``workdir/checkpoints`` (orbax names each step's folder
  by its number; temporary folders of an unfinished save are not counted), ascending."""
  path = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path)
                if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def other_method_blocks(config) -> tuple[str, ...]:
  """``("train.<m>.", ...)`` for every registered training method ``m`` other than the run's
  own: each method reads only its own ``train.<method>`` block (``krylov_adv.training``), so
  those fields do not define the run, and a schema change in another method's block (a new
  field such as ``train.soar.grad_clip``) does not refuse the resume of, say, a PGD workdir."""
  from krylov_adv import training  # here, not at the top: the CLI helpers stay light to import
  method = str(config.train.method)
  return tuple(f"train.{m}." for m in training.available() if m != method)


def unread_data_fields(config) -> tuple[str, ...]:
  """``("data.num_train", "data.shape", ...)``: the ``data.*`` fields the run's data source does
  not read (``krylov_adv.data.unread_fields``). They are neither recorded in ``run_config.json``
  nor compared: the schema's ``data.num_train=256`` is a ``synthetic``-source field, and a
  ``digits`` run that trains on 1,400 images must not record it as if it had used it."""
  from krylov_adv import data as data_lib  # here, not at the top: the CLI helpers stay light
  return tuple(f"data.{f}" for f in data_lib.unread_fields(config.data))


def check_run_config(workdir: str, config, *, record: bool = True) -> list[ConfigChange]:
  """Refuses to resume ``workdir`` with a config that differs from the one it was trained with.

  The stored config is ``workdir/run_config.json`` (or, in a workdir written before it existed,
  the ``config.json`` the last run left). A workdir without finished checkpoints has nothing to
  protect: its record is replaced. Call before building anything (it reads two small files).

  Args:
    workdir: the single-method workdir (``W/<method>`` when several methods share ``W``).
    config: the run's config (``ConfigDict``).
    record: write ``run_config.json`` (the primary process of a training run); ``False`` for
      readers such as ``evaluate``.

  Returns:
    The allowed changes (empty for a fresh workdir or an identical config).

  Raises:
    ConfigError: a run-defining field differs; the message is :func:`mismatch_message`.
  """
  unread = set(unread_data_fields(config))
  current = {k: v for k, v in flatten_config(config).items() if k not in unread}
  path = os.path.join(workdir, RUN_CONFIG_FILE)
  legacy = os.path.join(workdir, "config.json")
  stored, history = None, []
  if saved_steps(workdir):
    try:
      if os.path.exists(path):
        data = _read_json(path)
        stored, history = data["config"], list(data.get("history", []))
      elif os.path.exists(legacy):
        stored = flatten_config(_read_json(legacy))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"cannot read the config record of workdir {workdir} "
                        f"({type(e).__name__}: {_one_line(e)}); use a new workdir") from None
  if stored is None:
    if record:
      os.makedirs(workdir, exist_ok=True)
      atomic_write_text(path, json.dumps({"config": current, "history": []}, indent=1) + "\n")
    return []
  ignored = other_method_blocks(config)
  # A record written before unread data fields were left out still holds them: skip them too.
  refused, allowed = config_changes(
      {k: v for k, v in stored.items() if not k.startswith(ignored) and k not in unread},
      {k: v for k, v in current.items() if not k.startswith(ignored)})
  if refused:
    raise ConfigError(mismatch_message(workdir, refused))
  if record and (allowed or not os.path.exists(path)):  # (a legacy workdir gets its record)
    grown = [dict(field=c.field, was=c.stored, now=c.current, after_epoch=max(
        saved_steps(workdir), default=0)) for c in allowed if _rule(c.field) == "grow"]
    atomic_write_text(path, json.dumps({"config": current, "history": history + grown},
                                       indent=1) + "\n")
  return allowed


# ---------------------------------------------------------------------------------------------
# 2. Workdir lock


def _lock_path(workdir: str, process_index: int) -> str:
  return os.path.join(workdir, LOCK_FILE if process_index == 0 else
                      f"{LOCK_FILE}.{process_index}")


def lock_holder(workdir: str, process_index: int = 0) -> str:
  """What the lock file says about its holder (``pid 123 on host h since ...``), or ``""``."""
  try:
    with open(_lock_path(workdir, process_index)) as f:
      return _one_line(f.read())
  except OSError:
    return ""


def _open_no_follow(path: str, flags: int) -> int:
  """``os.open(path, flags | O_NOFOLLOW)``; a symlink planted at ``path`` is a
  :class:`ConfigError` (one line), never followed."""
  try:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise ConfigError(f"{path} is a symbolic link; refusing to write through it (remove "
                        f"it)") from None
    raise


def _is_held(path: str) -> bool:
  """Whether a live process holds the ``flock`` of the lock file ``path`` (absent: no). Probes
  with a non-blocking shared lock, released at once; never creates or writes the file."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return True
    raise
  finally:
    os.close(fd)
  return False


def in_use_by(workdir: str, process_index: int = 0) -> str:
  """``""`` when no live process holds the lock of ``workdir`` or of a folder above it (a
  multi-method run ``W`` trains ``W/<method>``; ``experiments.table`` trains ``W/<row>``);
  otherwise one phrase naming it: ``workdir W in use by pid 123 on host h since ...``."""
  path = os.path.abspath(workdir)
  while True:
    lock = _lock_path(path, process_index)
    if _is_held(lock):
      return f"workdir {path} in use by {lock_holder(path, process_index) or 'another process'}"
    parent = os.path.dirname(path)
    if parent == path:
      return ""
    path = parent


@contextlib.contextmanager
def _flock(workdir: str, process_index: int) -> Iterator[str]:
  """The exclusive ``flock`` of one folder's lock file (see :func:`workdir_lock`)."""
  os.makedirs(workdir, exist_ok=True)
  path = _lock_path(workdir, process_index)
  fd = _open_no_follow(path, os.O_RDWR | os.O_CREAT)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = lock_holder(workdir, process_index) or "another process"
      raise WorkdirInUse(f"workdir {workdir} is in use by {holder}; wait for it to finish or "
                         f"use another workdir") from None
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode(),
              0)
    try:
      yield path
    finally:
      os.ftruncate(fd, 0)  # still held: no other run can have written its pid yet
  finally:
    os.close(fd)  # releases the flock


@contextlib.contextmanager
def workdir_lock(workdir: str, *, process_index: int = 0,
                 subfolders: tuple[str, ...] = ()) -> Iterator[str]:
  """Holds an exclusive lock on ``workdir`` (created if needed) and on each of its
  ``subfolders`` (a multi-method run's ``W/<method>``, the table's ``W/<row>``) for the ``with``
  block.

  ``fcntl.flock`` (non-blocking) on ``workdir/lock`` (``lock.<i>`` for process ``i`` of a
  multi-host run: the lock is per host). The kernel drops a ``flock`` when its holder's last file
  descriptor closes, so the lock dies with the process, SIGKILL included; the file itself stays
  (deleting it would let two runs lock two different files). The holder writes its pid, host and
  start time into the file for the message of the next run. The lock file is opened with
  ``O_NOFOLLOW``: a symlink planted as ``lock`` is refused, never truncated through.

  A run is refused as well when a folder above ``workdir`` is locked (``soat --workdir W/pgd``
  while ``soat --workdir W`` trains ``pgd`` and ``standard`` there), and a run of ``W`` is
  refused when one of its ``subfolders`` is locked by a run of that folder alone.

  Yields:
    The lock file's path.

  Raises:
    WorkdirInUse: another process holds it (``workdir W is in use by pid 123 on host h since
      ...; wait for it to finish or use another workdir``).
    ConfigError: ``workdir/lock`` is a symbolic link.
  """
  parent = os.path.dirname(os.path.abspath(workdir))
  above = in_use_by(parent, process_index) if parent != os.path.abspath(workdir) else ""
  if above:
    raise WorkdirInUse(f"workdir {workdir} lies inside {above}; wait for it to finish or use "
                       f"another workdir")
  with contextlib.ExitStack() as stack:
    path = stack.enter_context(_flock(workdir, process_index))
    for sub in subfolders:
      stack.enter_context(_flock(os.path.join(workdir, sub), process_index))
    yield path


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints: checksums, save, restore with fallback; a tolerant metrics.jsonl


def _host_value(leaf) -> np.ndarray:
  """One leaf as a NumPy array: a replicated (possibly multi-host) ``jax.Array`` through its first
  local shard, anything else through ``np.asarray``."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if not leaf.is_fully_replicated:
      raise ValueError("state_checksum needs replicated or fully addressable arrays")
    return np.asarray(leaf.addressable_data(0))
  return np.asarray(leaf)


def state_checksum(tree) -> str:
  """sha256 hex digest of every array leaf of ``tree`` (parameters, BatchNorm statistics,
  optimiser state, step): for each leaf in ``jax.tree_util`` order (dict keys sorted), its key
  path, dtype, shape and C-order bytes. Deterministic across processes and device counts, and
  the same for a state and its exact restore."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(_host_value(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def read_checksums(workdir: str) -> dict[int, str] | None:
  """``{step: sha256}`` of ``workdir/checksums.json``; ``None`` when the file is absent (a
  workdir written before checksums were kept); ``{}`` when it is unreadable (every checkpoint
  then counts as unverifiable, see :func:`restore_newest`)."""
  path = os.path.join(workdir, CHECKSUMS_FILE)
  if not os.path.exists(path):
    return None
  try:
    return {int(k): str(v) for k, v in _read_json(path).items()}
  except (OSError, ValueError, AttributeError, TypeError):
    return {}


def record_checksum(workdir: str, step: int, checksum: str, keep: list[int] | None = None
                    ) -> None:
  """Adds ``step: checksum`` to ``workdir/checksums.json`` (atomically), dropping the steps not
  in ``keep`` when given. A step whose finished folder is still on disk is never dropped,
  whatever ``keep`` says: orbax stops listing a step it will delete as soon as the next save
  starts, but deletes it only once that save is complete, and until then it may be the only
  finished checkpoint (the one a run killed now must restore)."""
  sums = read_checksums(workdir) or {}
  sums[int(step)] = checksum
  if keep is not None:
    kept = set(keep) | set(saved_steps(workdir)) | {int(step)}
    sums = {s: v for s, v in sums.items() if s in kept}
  atomic_write_text(os.path.join(workdir, CHECKSUMS_FILE),
                    json.dumps({str(s): sums[s] for s in sorted(sums)}, indent=1) + "\n")


def save_checkpoint(mngr, step: int, state, workdir: str, *, primary: bool = True) -> str:
  """Saves ``state`` as checkpoint ``step`` with ``mngr`` (``mngr.save(step,
  args=ocp.args.StandardSave(state))``, asynchronous), in the order that keeps every finished
  checkpoint restorable whenever the process dies (``kill -9`` included):

  1. wait for the previous save to finish (orbax deletes the checkpoints beyond
     ``max_to_keep`` only then, after the new one is complete);
  2. record ``state``'s checksum, keeping the checksum of every step still on disk;
  3. start the save.

  So a finished checkpoint always has its checksum, and the previous one is deleted only after
  the new one is complete and recorded. Every process must call it (the save is collective);
  only the ``primary`` one hashes and writes. Returns the checksum (``""`` on other
  processes)."""
  import orbax.checkpoint as ocp
  mngr.wait_until_finished()
  require_space(workdir, state)
  checksum = ""
  if primary:
    checksum = state_checksum(state)
    record_checksum(workdir, step, checksum, keep=list(mngr.all_steps()) + [int(step)])
  mngr.save(int(step), args=ocp.args.StandardSave(state))
  return checksum


# Room a checkpoint needs beyond its arrays' bytes: orbax's metadata files and the file system's
# blocks (a few dozen small files).
CHECKPOINT_OVERHEAD_BYTES = 256 * 1024


def require_space(workdir: str, state) -> None:
  """Raises ``OSError(ENOSPC)`` naming ``workdir`` when its file system has less free space
  than a checkpoint of ``state`` needs (its arrays' bytes plus a quarter, plus
  :data:`CHECKPOINT_OVERHEAD_BYTES`). Called before each save: a save that runs out of space
  fails in orbax's writer threads, which print tracebacks from several threads (some from
  native code, which no Python hook can silence) and report the error only at the next save,
  an epoch later; checked here, the run stops at once with :func:`run_cli`'s one line, and the
  previous checkpoints stay as they are."""
  nbytes = sum(int(np.prod(np.shape(leaf))) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
               for leaf in jax.tree_util.tree_leaves(state))
  need = nbytes + nbytes // 4 + CHECKPOINT_OVERHEAD_BYTES
  st = os.statvfs(workdir)
  free = st.f_bavail * st.f_frsize
  if free < need:
    raise OSError(errno.ENOSPC, f"{free} bytes free, a checkpoint needs about {need}", workdir)


def checkpoint_record(workdir: str, step: int, state=None) -> dict[str, Any]:
  """``{"step": step, "checksum": sha256}`` of checkpoint ``step`` of ``workdir``: what a
  result measured (:func:`experiments.pipeline.run_metadata`, ``experiments.table``'s cached
  results). The checksum is the one ``checksums.json`` recorded for the step (that of the state
  saved, which a verified restore matched); for a checkpoint without one (written before
  checksums were kept) it is computed from ``state``, or ``None`` without a state."""
  sums = read_checksums(workdir) or {}
  checksum = sums.get(int(step))
  if checksum is None and state is not None:
    checksum = state_checksum(state)
  return dict(step=int(step), checksum=checksum)


class Restored(NamedTuple):
  """What :func:`restore_newest` found.

  state: the restored state (the template when ``step == 0``); step: the checkpoint restored
  (completed epochs), 0 when none; skipped: ``((step, reason), ...)`` newer checkpoints that did
  not restore, newest first; verified: the checksum was recorded and matched (``False`` for a
  checkpoint written before checksums were kept, and when ``step == 0``).
  """
  state: Any
  step: int
  skipped: tuple[tuple[int, str], ...]
  verified: bool

  def messages(self, workdir: str) -> list[str]:
    """One line per skipped checkpoint (``checkpoint 12 unreadable (reason); restored checkpoint
    11``) and one for an unverified restore; empty for a clean restore."""
    lines = []
    for step, reason in self.skipped:
      lines.append(f"{workdir}: checkpoint {step} unreadable ({reason}); restored checkpoint "
                   f"{self.step}")
    if self.step and not self.verified:
      lines.append(f"{workdir}: checkpoint {self.step} has no recorded checksum (written before "
                   f"checksums were kept); restored unverified")
    return lines


def _quarantine(workdir: str, step: int) -> str:
  src = os.path.join(workdir, CHECKPOINT_DIR, str(step))
  dst_dir = os.path.join(workdir, DAMAGED_DIR)
  os.makedirs(dst_dir, exist_ok=True)
  dst, n = os.path.join(dst_dir, str(step)), 1
  while os.path.exists(dst):
    dst, n = os.path.join(dst_dir, f"{step}.{n}"), n + 1
  shutil.move(src, dst)
  return dst


def _step_on_disk(workdir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR, str(step)))


def restore_newest(mngr, template, workdir: str, *, quarantine: bool = False,
                   primary: bool = True, sync: Callable[[], None] | None = None,
                   allow_none: bool = True, passes: int = 5) -> Restored:
  """Restores the newest checkpoint of ``mngr`` that restores and matches its checksum.

  Tries the steps newest first with ``mngr.restore(step, args=StandardRestore(template))``; a
  step whose restore raises (truncated or missing files, bad metadata) or whose restored arrays
  do not hash to ``checksums.json``'s value (a flipped bit, a file that tensorstore reads back
  as fill values) is skipped with its reason. A step without a recorded checksum restores
  unverified when the workdir has no ``checksums.json`` at all (written before checksums were
  kept), and counts as damaged otherwise.

  A reader beside a run that trains in the workdir (``evaluate`` while ``soat`` runs) sees
  checkpoints appear and disappear: a step whose folder is gone after its restore failed was
  deleted by that run (orbax keeps ``max_to_keep``), not damaged, and is passed over silently;
  after the listed steps, the listing is read again (``mngr.reload()``, at most ``passes``
  times) and the steps finished meanwhile are tried; ``checksums.json`` is read again for a
  step recorded after the first read. Only skipped steps newer than the one restored are
  reported.

  Args:
    mngr: the workdir's ``ocp.CheckpointManager``.
    template: the state to restore into (its shardings place the result).
    quarantine: move skipped checkpoints to ``workdir/damaged_checkpoints/`` (the ``primary``
      process does it, then ``sync()``, then ``mngr.reload()``), so that a resumed run can save
      those steps again. ``False`` for readers (``evaluate``).
    sync: multi-host barrier called after the move (e.g. ``lambda:
      multihost_utils.sync_global_devices("quarantine")``).
    allow_none: with no restorable checkpoint, return the template at step 0 (training) instead
      of raising (``evaluate``: ``False``).

  Raises:
    CheckpointError: checkpoints exist but none restores, or none exists and not
      ``allow_none``; one line naming each step and its reason. Its advice to move the folder
      away is given only when no live process holds the workdir's lock (:func:`in_use_by`).
  """
  import orbax.checkpoint as ocp
  skipped: dict[int, str] = {}
  tried: set[int] = set()
  found = None
  for _ in range(max(1, passes)):
    sums = read_checksums(workdir)
    for step in sorted((s for s in mngr.all_steps() if s not in tried), reverse=True):
      tried.add(step)
      try:
        state = mngr.restore(step, args=ocp.args.StandardRestore(template))
      except KeyboardInterrupt:
        raise
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        if _step_on_disk(workdir, step):
          skipped[step] = f"{type(e).__name__}: {_one_line(e, 100)}"
        continue  # (a folder gone meanwhile was deleted by the run writing the workdir)
      if sums is not None and step not in sums:
        sums = read_checksums(workdir)  # recorded after the first read (a run writing here)
      if sums is None:
        found = Restored(state, int(step), (), False)
        break
      if step not in sums:
        skipped[step] = "no recorded checksum" if sums else f"{CHECKSUMS_FILE} unreadable"
        continue
      if state_checksum(state) != sums[step]:
        skipped[step] = "checksum mismatch"
        continue
      found = Restored(state, int(step), (), True)
      break
    if found is not None:
      break
    mngr.reload()  # checkpoints another run finished while these were tried
    if not set(mngr.all_steps()) - tried:
      break
  folder = os.path.join(workdir, CHECKPOINT_DIR)
  newest_first = sorted(skipped.items(), reverse=True)
  if found is None and skipped:
    what = "; ".join(f"checkpoint {s}: {r}" for s, r in newest_first)
    busy = in_use_by(workdir)
    advice = (f"{busy}: rerun once it has saved its next checkpoint" if busy else
              "move the folder away to train afresh")
    raise CheckpointError(f"no checkpoint in {folder} restores ({what}); {advice}")
  if found is None and not allow_none:
    raise CheckpointError(f"no checkpoint in {folder}; train first with "
                          f"python -m experiments.soat")
  if found is None:
    return Restored(template, 0, (), False)
  newer = tuple((s, r) for s, r in newest_first if s > found.step)
  if quarantine and newer:
    if primary:
      for step, _ in newer:
        _quarantine(workdir, step)
    if sync is not None:
      sync()
    mngr.reload()
  return found._replace(skipped=newer)


class MetricsLog(NamedTuple):
  """What :func:`truncate_metrics` kept: ``records`` (parsed, in file order) and ``dropped``
  (unreadable lines removed, e.g. the last line of a run killed mid-write)."""
  records: list[dict]
  dropped: int


def truncate_metrics(path: str, completed_epochs: int, *, write: bool = True) -> MetricsLog:
  """Keeps the lines of ``path`` (``metrics.jsonl``) whose ``epoch`` is at most
  ``completed_epochs`` (a run killed after writing an epoch's line but before its checkpoint
  reruns that epoch) and drops lines that are not JSON objects with an ``epoch`` (a line cut
  mid-write); rewrites the file atomically when ``write`` and anything changed."""
  if not os.path.exists(path):
    return MetricsLog([], 0)
  with open(path) as f:
    lines = f.read().splitlines()
  records, dropped = [], 0
  for line in lines:
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      epoch = int(rec["epoch"])
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    if epoch <= completed_epochs:
      records.append(rec)
  text = "".join(json.dumps(r) + "\n" for r in records)
  if write:
    with open(path) as f:
      changed = f.read() != text
    if changed:
      atomic_write_text(path, text)
  return MetricsLog(records, dropped)


# ---------------------------------------------------------------------------------------------
# 4. Command line: one-line errors, Ctrl-C


_PROGRESS: dict[str, Any] = {}


class Terminated(KeyboardInterrupt):
  """SIGTERM (what a cluster scheduler sends before it kills), raised in the main thread by the
  handler :func:`run_cli` installs, so that the run stops as on Ctrl-C: ``pipeline.train``
  finishes the save in flight, the lock is released, one line says where the run stopped."""


def note_progress(completed_epochs: int, method: str | None = None, *,
                  flush: Callable[[], Any] | None = None, workdir: str | None = None) -> None:
  """Records how far this process's training has come (``completed_epochs`` saved, of
  ``method``, in ``workdir``) for :func:`run_cli`'s Ctrl-C / SIGTERM / full-disk line. Call
  after restoring and after each save.

  Args:
    flush: called by :func:`run_cli` on Ctrl-C before it prints and exits, to finish the save
      in flight so that the epoch it names is on disk (``mngr.wait_until_finished``: orbax saves
      in a background thread, which interpreter shutdown would otherwise cut off with a
      traceback). Pass ``None`` once the manager is closed.
    workdir: the single-method workdir being trained: the line names the newest checkpoint
      finished there (:func:`finished_epoch`), never an epoch whose save did not complete.
  """
  _PROGRESS.update(epoch=int(completed_epochs), method=method, flush=flush)
  if workdir is not None:
    _PROGRESS["workdir"] = workdir


def reset_progress() -> None:
  _PROGRESS.clear()


def finished_epoch() -> int | None:
  """The newest checkpoint finished on disk in the workdir of the last :func:`note_progress`
  (a step folder orbax has renamed into place, with a recorded checksum when
  ``checksums.json`` exists), 0 when none; the noted epoch when no workdir was noted; ``None``
  before any note."""
  if "epoch" not in _PROGRESS:
    return None
  workdir = _PROGRESS.get("workdir")
  if workdir is None:
    return _PROGRESS["epoch"]
  sums = read_checksums(workdir)
  steps = [s for s in saved_steps(workdir) if sums is None or s in sums]
  return max(steps, default=0)


def interrupted_message(what: str = "interrupted") -> str:
  """``interrupted after epoch 12 (pgd); rerun the same command to resume``: the epoch is
  :func:`finished_epoch` (``what`` is ``terminated (SIGTERM)`` for SIGTERM)."""
  epoch = finished_epoch()
  if epoch is None:
    return what
  method = f" ({_PROGRESS['method']})" if _PROGRESS.get("method") else ""
  if epoch == 0:
    return f"{what} before the first epoch{method} completed; rerun the same command"
  return f"{what} after epoch {epoch}{method}; rerun the same command to resume"


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def disk_error(error: BaseException | None) -> BaseException | None:
  """The exception in ``error``'s chain (itself, its ``__cause__`` / ``__context__``) that says
  the disk (or quota) is full: an ``OSError`` with ``errno`` ENOSPC or EDQUOT, or an error whose
  message says so (tensorstore reports a full disk as ``ValueError: RESOURCE_EXHAUSTED: ...
  No space left on device``, which orbax re-raises from its writer threads); ``None``
  otherwise."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return error
    if any(t in str(error) for t in _DISK_FULL_TEXT):
      return error
    error = error.__cause__ or error.__context__
  return None


def _flag_value(argv: list[str], name: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _load_message(name: str, path: str, error: BaseException) -> str:
  """One line for a config file that ml_collections could not load."""
  cause = error
  while cause.__cause__ is not None:
    cause = cause.__cause__
  text = str(cause)
  if isinstance(cause, OSError) and "No such file" in text:
    return f"--{name}: config file not found: {path.split(':', 1)[0]}"
  if text.startswith("Error whilst parsing config file"):
    text = text.strip().splitlines()[-1]  # the last line of the traceback it embeds
  return f"--{name}: cannot load config file {path}: {_one_line(text)}"


def _override_message(error: BaseException, argv: list[str], config_flags: tuple[str, ...]
                      ) -> str:
  """One line for an exception ml_collections raises while parsing ``--config FILE`` and the
  ``--config.a.b=v`` overrides (it wraps a KeyError with a "Did you mean" hint in an
  AttributeError whose message is the KeyError's repr)."""
  inner = error
  while inner.args and isinstance(inner.args[0], BaseException):
    inner = inner.args[0]
  text = str(inner.args[0]) if inner.args else str(inner)
  for name in config_flags:
    if "earlier failure to load" in text or "has no attribute 'get_config'" in text or (
        text.startswith("Error whilst parsing config file")):
      return _load_message(name, _flag_value(argv, name), error)
  overrides = [a for a in argv if any(a.startswith(f"--{n}.") for n in config_flags)]
  key = re.match(r"\W*(\w+)", text)
  culprit = next((a for a in overrides if key and re.search(
      rf"\.{re.escape(key.group(1))}(=|\.|$)", a)), None)
  suggestion = re.search(r'Did you mean "(\w+)"', text)
  if culprit is not None and isinstance(inner, (KeyError, AttributeError)):
    hint = f" (did you mean {suggestion.group(1)}?)" if suggestion else ""
    return f"unknown config field {key.group(1)!r} in {culprit}{hint}"
  where = f" {culprit}" if culprit else ""
  return f"bad command line{where}: {type(inner).__name__}: {_one_line(text)}"


def parse_flags(argv: list[str], *, config_flags: tuple[str, ...] = ("config",)) -> list[str]:
  """An absl ``flags_parser`` (``app.run(main, flags_parser=parse_flags)``): parses ``argv``
  into ``absl.flags.FLAGS`` and loads the config files now, raising :class:`ConfigError` with
  one line for a flag error (missing ``--workdir``), an unknown or ill-typed override
  (``--config.train.epochz=3``: ml_collections raises a bare ``AttributeError`` during parsing)
  and a config file that is missing or fails to load (ml_collections defers that error to the
  first use of the config)."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Error whilst parsing config file" in text:  # get_config raised: keep its last line
      name = re.match(r"flag --(\w+)", text)
      name = name.group(1) if name else config_flags[0]
      raise ConfigError(f"--{name}: cannot load config file {_flag_value(argv, name)}: "
                        f"{_one_line(text.strip().splitlines()[-1])}") from None
    raise ConfigError(_one_line(e)) from None
  except SyntaxError as e:
    raise ConfigError(f"--{config_flags[0]}: cannot load config file "
                      f"{_flag_value(argv, config_flags[0])}: SyntaxError: {e}") from None
  except (AttributeError, KeyError, TypeError, ValueError, IndexError, OSError) as e:
    raise ConfigError(_override_message(e, argv, config_flags)) from None
  for name in config_flags:
    if name not in flags.FLAGS:
      continue
    value = flags.FLAGS[name].value
    try:
      getattr(value, "keys", None)  # a config that failed to load raises on any attribute
    except Exception as e:  # noqa: BLE001 - whatever the config file raised
      raise ConfigError(_load_message(name, _flag_value(argv, name), e)) from None
  return rest


# The exceptions run_cli prints as one line (everything else keeps its traceback: a bug).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, CheckpointError)


class _DiskErrorLogFilter:
  """Drops log records that carry a full-disk exception (:func:`disk_error`) or an interrupt:
  orbax logs its writer threads' errors with a traceback (several, one per thread) before
  re-raising them in the main thread, where :func:`run_cli` turns them into one line."""

  def filter(self, record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or not (isinstance(exc, KeyboardInterrupt) or disk_error(exc))


_DISK_FILTER = _DiskErrorLogFilter()


def _after_live_progress_bar() -> str:
  """``"\n"`` when a tqdm progress bar is still alive (the signal landed while it was drawn, or in
  its constructor, so it was never closed and its line has no newline yet), else ``""``: the
  line saying where the run stopped then starts on a line of its own."""
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    return "\n" if len(getattr(tqdm, "_instances", ())) else ""
  except Exception:  # noqa: BLE001 - a newline too many is harmless
    return "\n"


def _end(code: int, hard: bool) -> None:
  """Exits with ``code``; ``hard``: ``os._exit`` after flushing stdout and stderr, so that no
  thread left behind (orbax's savers and their loggers) prints after the last line."""
  if hard:
    for stream in (sys.stdout, sys.stderr):
      with contextlib.suppress(Exception):
        stream.flush()
    os._exit(code)
  sys.exit(code)


def run_cli(main: Callable[[], Any], *, prog: str | None = None, hard_exit: bool = False) -> Any:
  """Runs ``main()`` (e.g. ``lambda: app.run(_main, flags_parser=parse_flags)``) as a command
  line, each way of stopping ending in exactly one stderr line:

  - a :data:`USER_ERRORS` exception: ``<prog>: error: <message>``, exit 2;
  - Ctrl-C: ``<prog>: interrupted after epoch N (method); rerun the same command to resume``,
    exit 130; SIGTERM (handled like Ctrl-C, :class:`Terminated`): ``<prog>: terminated
    (SIGTERM) after epoch N ...``, exit 143. ``N`` is the newest checkpoint finished on disk
    (:func:`finished_epoch`) after the save in flight is finished (``flush``); a second
    signal during that wait abandons it;
  - a full disk (:func:`disk_error`): ``<prog>: error: no space left on device in PATH; stopped
    after epoch N (method): free space, then rerun the same command to resume``, exit 1
    (PATH: the file named by the error, else the workdir being trained).

  Other exceptions propagate with their traceback (a bug). ``hard_exit`` (the command lines of
  ``experiments.cli``): leave with ``os._exit`` after an interrupt or a full disk, so that
  nothing (orbax's background threads, destructors) prints after the line."""
  if prog is None:  # python -m experiments.soat: argv[0] is .../experiments/soat.py
    prog = os.path.splitext(os.path.basename(sys.argv[0] or ""))[0] or "krylov_adv"

  def on_sigterm(signum, frame):
    raise Terminated()

  import logging
  import signal
  import threading
  logging.getLogger("absl").addFilter(_DISK_FILTER)  # (a set: added once)
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
  previous_int = signal.getsignal(signal.SIGINT) if main_thread else None
  try:
    return main()
  except USER_ERRORS as e:
    print(f"{prog}: error: {_one_line(e, 10_000)}", file=sys.stderr, flush=True)
    sys.exit(2)
  except KeyboardInterrupt as e:
    terminated = isinstance(e, Terminated)
    if main_thread:  # a second signal must not interrupt the wait and this line
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      signal.signal(signal.SIGINT, signal.SIG_IGN)
    flush, note = _PROGRESS.get("flush"), ""
    if flush is not None:
      try:
        flush()
      except Exception as err:  # noqa: BLE001 - still say where the run stopped
        note = f" (the last save did not finish: {type(err).__name__})"
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    print(f"{_after_live_progress_bar()}{prog}: {interrupted_message(what)}{note}",
          file=sys.stderr, flush=True)
    # Objects the interrupt left half-built (a progress bar cut in its constructor) would print
    # "Exception ignored in ... __del__" tracebacks at shutdown: the line above says it all.
    sys.unraisablehook = lambda unraisable: None
    _end(143 if terminated else 130, hard_exit)
  except Exception as e:  # noqa: BLE001 - only a full disk is handled here
    full = disk_error(e)
    if full is None:
      raise
    filename = getattr(full, "filename", None) or _PROGRESS.get("workdir")
    where = f" in {filename}" if filename else ""
    epoch = finished_epoch()
    method = f" ({_PROGRESS['method']})" if _PROGRESS.get("method") else ""
    stopped = (f"; stopped after epoch {epoch}{method}: free space, then rerun the same "
               f"command to resume" if epoch else "; free space, then rerun the same command")
    print(f"{prog}: error: no space left on device{where}{stopped}", file=sys.stderr,
          flush=True)
    sys.unraisablehook = lambda unraisable: None
    _end(1, hard_exit)
  finally:
    if main_thread:
      with contextlib.suppress(Exception):
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def config_errors(prefix: str = "") -> Iterator[None]:
  """Turns a ``ValueError`` / ``FileNotFoundError`` raised in the block into a
  :class:`ConfigError` (``prefix`` + its first line): wrap the up-front checks whose errors are
  the user's (``validate_config``, loading the data), and only those."""
  try:
    yield
  except ConfigError:
    raise
  except (ValueError, FileNotFoundError, NotADirectoryError) as e:
    raise ConfigError(prefix + _one_line(e, 10_000)) from e


def check_data_root(data_cfg) -> None:
  """``data.root`` must name an existing folder for the sources that read one (``idx``,
  ``cifar10_python``); raises :class:`ConfigError` naming the field otherwise."""
  source = data_cfg.get("source", "") if hasattr(data_cfg, "get") else ""
  if source not in ("idx", "cifar10_python"):
    return
  root = str(data_cfg.get("root", "") or "")
  if not root:
    raise ConfigError(f"data.root must name the folder of the {source} files")
  if not os.path.isdir(root):
    raise ConfigError(f"data.root={root}: no such folder")


# ---------------------------------------------------------------------------------------------
# 5. Readers of a workdir


def require_writable(folder: str, what: str) -> None:
  """Raises :class:`ConfigError` (one line) unless a file can be created in ``folder``: probes
  by creating and removing a temporary file, so that a reader that writes ``what`` at the end
  (``evaluate``'s ``evaluation.json``) fails before it spends its attack time, not after."""
  try:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.")
    os.close(fd)
    os.unlink(tmp)
  except OSError as e:
    raise ConfigError(f"workdir {folder} is not writable ({e.strerror}); {what} is written "
                      f"there: make it writable or evaluate a copy") from None


def require_trained_workdir(path: str, train_workdir: str | None = None) -> str:
  """``path`` when it holds finished checkpoints (``path/checkpoints/<step>``); otherwise raises
  :class:`ConfigError` with one line. Touches nothing (``evaluate`` must not create folders in a
  mistyped workdir). ``train_workdir`` (default ``path``) is the ``--workdir`` the message tells
  the user to train in: the top workdir when ``path`` is one method's ``workdir/<method>``."""
  train_workdir = path if train_workdir is None else train_workdir
  if not os.path.isdir(path):
    raise ConfigError(f"workdir {path} does not exist; train first with "
                      f"python -m experiments.soat --workdir {train_workdir}")
  if not saved_steps(path):
    raise ConfigError(f"no checkpoint in {os.path.join(path, CHECKPOINT_DIR)}; train first with "
                      f"python -m experiments.soat --workdir {train_workdir}")
  return path
