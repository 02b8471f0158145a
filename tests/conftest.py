"""Test setup: 8 simulated CPU devices, no GPU, no network; shared fixtures.

The repository root is on `sys.path` through pytest's `pythonpath` setting (pyproject.toml),
so tests import `configs`, `tests.helpers` and `tests.torch_utils` directly.

Compiled programs are shared by every test of a run: JAX's persistent compilation cache
lives in one folder per run (made here, inherited by pytest-xdist's workers and by the
`main.py` subprocesses the end-to-end tests start, removed at the end), so a program that
several tests build (a tiny config's train step, a detector's predict step) compiles once.
Set JAX_COMPILATION_CACHE_DIR yourself to keep a cache across runs.
"""
import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# LLVM's optimisation of the generated CPU code is most of a program's compile time and buys
# nothing a test checks: tests compile at backend level 0, not the default (XLA's graph passes
# and fusion run as at any level; convolutions and matmuls run in the same libraries). The two
# files whose checks depend on how LLVM rounds compile their programs at level 1 themselves
# (`tests.helpers.LLVM_LEVEL_1`):
# test_train.py (its 8-device run within 1e-3 of the 1-device one) and the train-mode pass of
# test_models_cifar_shufflenet_mobilenetv2.py (features equal to the bit across two outputs).
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
# XLA:CPU's older loop-fusion code generator (elemental IR) instead of its MLIR fusion
# emitters: compiles faster (docs/performance.md, "Test suite"), and every float comparison
# of the suite holds with either generator.
if '--xla_cpu_use_fusion_emitters' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_cpu_use_fusion_emitters=false'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:   # the controlling process; workers and subprocesses inherit the folder
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='reviewkd_jax_tests_xla_')
  os.environ['REVIEWKD_TEST_CACHE_OWNER'] = str(os.getpid())
# Cache every program that took a quarter second or more to compile, whatever its size.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.25')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402


@pytest.fixture(scope='module')
def mock_cifar100():
  """tfds's mock data for the module's tests: every split has `NUM_MOCK_EXAMPLES` examples."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tests.helpers import NUM_MOCK_EXAMPLES  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
    yield


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """The process that made the run's compilation cache removes it."""
  if _OWN_CACHE and os.environ.get('REVIEWKD_TEST_CACHE_OWNER') == str(os.getpid()):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


# The files that take longest (measured wall time, `--durations`), run first: with -n N the
# last files to start are short ones, so no worker idles while another finishes a long file.
_LONGEST_FIRST = (
    'test_multiprocess.py', 'test_detection_train.py', 'test_tpu_compile.py',
    'test_imagenet_reviewkd.py', 'test_setup_errors.py', 'test_comparison_methods.py',
    'test_train.py', 'test_detection_roi_heads.py', 'test_detection_model.py', 'test_coco_json.py',
    'test_benchmark.py', 'test_models_cifar_resnet_wrn_vgg.py', 'test_imported_models.py',
    'test_checkpoint_recovery.py', 'test_models_cifar_shufflenet_mobilenetv2.py',
    'test_models_imagenet.py', 'test_image_folder.py', 'test_detection_distill.py',
    'test_detection_weights.py', 'test_detection_rpn.py', 'test_detection_backbone.py',
    'test_configs.py', 'test_ablations.py', 'test_custom_models.py', 'test_reviewkd.py',
    'test_detection_data.py', 'test_train_cli.py', 'test_losses.py', 'test_detection_padding.py',
    'test_platform.py', 'test_registry.py', 'test_readme.py', 'test_convert.py',
    'test_methods_modules.py', 'test_methods_losses.py', 'test_data.py', 'test_bad_inputs.py')


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


# ---- Where a test's time goes: REVIEWKD_TEST_COMPILE_LOG=FILE ------------------------------
# Appends one JSON line per test phase (setup/call/teardown) with its wall time, the seconds
# XLA spent compiling in this process (`backend_compile`, programs not found in the cache),
# the number of such compiles, and the trace/lowering seconds. Programs compiled by a test's
# `main.py` subprocesses are not counted (their time is in the wall time only).
_COMPILE_LOG = os.environ.get('REVIEWKD_TEST_COMPILE_LOG')
_compile_totals = {}


def _on_duration(event, duration, **kwargs):  # pylint: disable=unused-argument
  if event.startswith('/jax/core/compile/'):
    key = event.rsplit('/', 1)[-1]
    _compile_totals[key] = _compile_totals.get(key, 0.0) + duration
    if key == 'backend_compile_duration':
      _compile_totals['compiles'] = _compile_totals.get('compiles', 0) + 1


if _COMPILE_LOG:
  import json  # noqa: E402  pylint: disable=g-import-not-at-top
  import time  # noqa: E402  pylint: disable=g-import-not-at-top

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
    import jax  # pylint: disable=g-import-not-at-top
    if not getattr(pytest_runtest_protocol, 'registered', False):
      jax.monitoring.register_event_duration_secs_listener(_on_duration)
      pytest_runtest_protocol.registered = True
    yield

  def _log_phase(item, phase):
    start = time.perf_counter()
    _compile_totals.clear()
    outcome = yield
    del outcome
    record = {'test': item.nodeid, 'phase': phase, 'wall': time.perf_counter() - start,
              'pid': os.getpid(), **_compile_totals}
    with open(_COMPILE_LOG, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')

  pytest_runtest_setup = pytest.hookimpl(hookwrapper=True)(
      lambda item: (yield from _log_phase(item, 'setup')))
  pytest_runtest_call = pytest.hookimpl(hookwrapper=True)(
      lambda item: (yield from _log_phase(item, 'call')))
  pytest_runtest_teardown = pytest.hookimpl(hookwrapper=True)(
      lambda item, nextitem: (yield from _log_phase(item, 'teardown')))
