"""Test set-up shared by every test module.

The CPU is split into two logical devices before TensorFlow starts, so the
verification's per-device loop runs twice on a machine without a GPU.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns oneDNN on by default only on some x86 CPUs (not on the AMD EPYC
# machines CI runs on), and without it the CPU has no NCHW Conv2D kernel: the
# channels-first cases could not run at all. Subprocesses inherit this.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 2
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(NUM_LOGICAL_CPUS)])

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # keras_flavour: one batch-norm randomizer for all


@contextlib.contextmanager
def environment_of_a_killed_process(extra=None):
    """os.environ (and `extra`) for a process a test kills, with a TMPDIR of its own, removed
    afterwards: TensorFlow's autograph writes the modules it generates there and removes them at
    exit, which a killed process never reaches."""
    with tempfile.TemporaryDirectory(prefix="tf_bnfuse_test_killed_") as tmp:
        yield dict(os.environ, TMPDIR=tmp, **(extra or {}))


def tree_digest(path):
    """A digest of every file's relative path and bytes under `path`."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def example_model(tmp_path_factory):
    import build_example_model
    return build_example_model.build(str(tmp_path_factory.mktemp("example") / "model"))

from hypothesis import HealthCheck, settings  # noqa: E402

# Modest in CI; `pytest --hypothesis-profile=thorough` for a long run.
settings.register_profile("ci", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="module")
def _every_weight_outside_the_proto(request):
    """A module that sets STORE_EVERY_WEIGHT = True builds graphs of tiny constants: run_pipeline
    then holds every one of them in its WeightStore (graph/weights.py), not only the big ones a real
    model has, so that the graph-level tests exercise that path on every pattern."""
    if not getattr(request.module, "STORE_EVERY_WEIGHT", False):
        yield
        return
    from tf_bnfuse.graph import weights as weights_lib
    saved, weights_lib.STORED_MIN_BYTES = weights_lib.STORED_MIN_BYTES, 1
    try:
        yield
    finally:
        weights_lib.STORED_MIN_BYTES = saved
