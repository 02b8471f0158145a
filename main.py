"""Trains a network alone or distils a student with ReviewKD.

  python main.py --config=configs/cifar100_r56_r20.py --workdir=/tmp/r56_r20
  python main.py --config=configs/demo_digits.py --workdir=/tmp/reviewkd_demo

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
import difflib
import importlib.util
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from reviewkd_jax import lazy_imports
from reviewkd_jax import platform
from reviewkd_jax.data.image_folder import register_from_config
from reviewkd_jax.models.registry import set_outputs_from_config
from reviewkd_jax.train import EXIT_STOPPED, SetupError, is_stopped, storage_fault
from reviewkd_jax.train import tasks, train_suite
from reviewkd_jax.train.progress import NonFiniteLossError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the exported models.')
flags.DEFINE_enum('multiprocess', 'auto', ['auto', 'yes', 'no'],
                  'Call jax.distributed.initialize(): "auto" when a cluster launcher (SLURM, '
                  'Open MPI, a TPU pod, JAX_COORDINATOR_ADDRESS) started several processes.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for processes started by hand on several hosts '
                    '(with --num_processes and --process_id).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (hand-started runs).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (hand-started runs).')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

_MULTIPROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                     'TPU_WORKER_HOSTNAMES', 'MEGASCALE_NUM_SLICES')


def _launched_as_several_processes() -> bool:
  """Returns True when the environment says this is one of several processes."""
  for name in _MULTIPROCESS_ENV:
    value = os.environ.get(name, '')
    if name == 'JAX_COORDINATOR_ADDRESS' and value:
      return True
    if name == 'TPU_WORKER_HOSTNAMES' and ',' in value:
      return True
    if value.isdigit() and int(value) > 1:
      return True
  return False


class _QuietCheckpointer(std_logging.Filter):
  """Drops orbax's per-save INFO chatter from the console; its warnings and errors still show,
  the errors as their one-line message (a failed write, e.g. a full disk, is logged by each
  of its threads with a traceback; main() reports the cause once)."""

  def filter(self, record):
    if record.name == 'asyncio' and 'orbax' in record.getMessage():
      return False  # 'Task exception was never retrieved': the same failed write again
    if '/orbax/' not in record.pathname:
      return True
    if record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  platform.skip_absent_tpu()  # before JAX's first computation
  logging.get_absl_handler().addFilter(_QuietCheckpointer())
  # tf.data only: keep TensorFlow, imported when a pipeline is built, off the GPUs JAX uses.
  lazy_imports.keep_tensorflow_off_gpus()
  if FLAGS.multiprocess == 'yes' or (FLAGS.multiprocess == 'auto' and (
      FLAGS.coordinator_address or _launched_as_several_processes())):
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    set_outputs_from_config(FLAGS.config)  # models of the user's named by import path
    register_from_config(FLAGS.config)  # a folder of the user's images as the dataset
  except ValueError as e:
    raise SystemExit(f'\n{e}') from None
  try:
    task = tasks.task_of(FLAGS.config)
  except ValueError as e:
    raise SystemExit(f'\n{e}') from None
  train = train_suite if task == tasks.SUITE else tasks.TASKS[task].train
  try:
    result = train(FLAGS.config, FLAGS.workdir)
  except SetupError as e:
    raise SystemExit(f'\n{e}') from None  # a setup step to do, not a bug: no traceback
  except NonFiniteLossError as e:
    raise SystemExit(f'\n{e}') from None  # the message says what was kept
  except Exception as e:  # pylint: disable=broad-except
    message = storage_fault(e, FLAGS.workdir)
    if message is None:
      raise
    raise SystemExit(f'\n{message}') from None
  if is_stopped(result):
    # Stopped before its end (SIGTERM, preemption, stop_after_step): a checkpoint was saved
    # and rerunning resumes; a distinct exit code so that `main.py ... && next` waits.
    sys.exit(EXIT_STOPPED)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a config file that cannot be loaded, a `get_config` argument it refuses and
  a `--config.FIELD` override naming no field each exit with one message.

  The config file and the overrides are checked here, before absl and ml_collections parse
  them, so that the messages do not depend on those libraries' error texts.
  """
  config = _load_config(argv)
  if config is not None:
    _check_overrides(config, argv)
  try:
    return FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = getattr(e, 'flagname', '') or ''
    raise SystemExit(
        f'Unknown flag --{name}: a --config.FIELD override needs --config=FILE (e.g. '
        '--config=configs/default.py).' if name.startswith('config.') and config is None
        else str(e)) from None
  except flags.Error as e:
    raise SystemExit(str(e)) from None


def _config_argument(argv: list[str]) -> str | None:
  """Returns the value of --config (`--config=FILE[:ARG]` or `--config FILE[:ARG]`), or None."""
  for i, arg in enumerate(argv[1:], start=1):
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(argv: list[str]):
  """Returns the --config file's `get_config(ARG)` (None without --config: absl says it is
  required), exiting with one line for a missing or unreadable file or a refused ARG."""
  given = _config_argument(argv)
  if given is None:
    return None
  path, colon, arg = given.partition(':')
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or '.'
    names = (sorted(n for n in os.listdir(folder) if n.endswith('.py'))
             if os.path.isdir(folder) else [])
    close = difflib.get_close_matches(os.path.basename(path), names, n=1)
    hint = f' Did you mean {os.path.join(os.path.dirname(path), close[0])}?' if close else ''
    raise SystemExit(f'The config file {path} does not exist.{hint} Config files are in '
                     'configs/ (README: Training).')
  try:
    spec = importlib.util.spec_from_file_location('_checked_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except OSError as e:
    raise SystemExit(f'The config file {path} cannot be read: {e.strerror or e}.') from None
  if not hasattr(module, 'get_config'):
    raise SystemExit(f'The config file {path} defines no get_config(): a config file returns '
                     'its ConfigDict from get_config() (see configs/default.py).')
  try:
    return module.get_config(*([arg] if colon else []))
  except (ValueError, TypeError) as e:
    raise SystemExit(str(e)) from None


def _check_overrides(config, argv: list[str]) -> None:
  """Exits with one line for a `--config.FIELD=...` naming no field of `config` (overrides
  cannot add fields: the config is locked)."""
  for arg in argv[1:]:
    for prefix in ('--config.', '--noconfig.', '-config.', '-noconfig.'):
      if arg.startswith(prefix):
        break
    else:
      continue
    field = arg[len(prefix):].split('=', 1)[0]
    node = config
    for part in field.split('.'):
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        break  # inside a value that is not a dict: ml_collections checks it
      if part not in node:
        close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
        hint = f' Did you mean {close[0]!r}?' if close else ''
        raise SystemExit(
            f'Unknown config field {field!r} (--config.{field}).{hint} Config fields are the '
            'names in configs/default.py and in the config file; overrides cannot add new '
            'ones (the config is locked).')
      node = node[part]


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
