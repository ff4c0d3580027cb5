"""One job: the command line of every entry point (``soat``, ``evaluate`` and the analyses).

  python -m experiments.<name> --config configs/<name>.py[:arg] --workdir DIR [--config.x=...]
"""

from __future__ import annotations

from typing import Any, Callable

from experiments import pipeline
from krylov_adv import parallel


def main(run: Callable[..., Any],
         workdir_help: str = "output folder (results in workdir/<experiment>/)"):
  """Parses ``--config`` (ml_collections ``config_flags``, overridable field by field) and
  ``--workdir``, starts the multi-host runtime when ``config.parallel.distributed`` is set (it
  must precede every other JAX call), then calls ``run(config, workdir, progress=...)`` with
  progress output on process 0 only.
  """
  from absl import app, flags, logging
  from ml_collections import config_flags

  flags_ = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags_["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    pipeline.start_distributed(flags_.config)
    run(flags_.config, flags_.workdir, progress=parallel.is_primary())

  # experiments.workdir: config and workdir mistakes are one stderr line (exit 2); Ctrl-C
  # (exit 130), SIGTERM (exit 143) and a full disk (exit 1) one line naming the newest epoch
  # finished on disk, with nothing printed after it (hard_exit); bugs keep their traceback.
  from experiments import workdir as workdir_lib
  workdir_lib.run_cli(lambda: app.run(_main, flags_parser=workdir_lib.parse_flags),
                      hard_exit=True)
