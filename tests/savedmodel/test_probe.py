"""Probes (savedmodel/probe.py): the values of tensors inside a frozen signature, in full or as a
fixed sample, read where the shape is static and where only the run knows it. Against what
TensorFlow computes calling the original function, sampled in numpy at the documented positions."""

import numpy as np
import pytest
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.savedmodel import freeze as freeze_lib
from tf_bnfuse.savedmodel import objects as objects_lib
from tf_bnfuse.savedmodel import probe as probe_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.verify import fold_check

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

RNG = np.random.default_rng(11)


class Probed(tf.Module):
    def __init__(self):
        self.w = tf.Variable(RNG.standard_normal((64, 128)).astype(np.float32))  # 32 KB: a stored weight

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
    def f(self, x):
        y = tf.matmul(x, self.w)
        return {"y": y, "positive": tf.boolean_mask(y, y > 0)}  # a size only the run knows


def _sample(array):
    """PROBE_SAMPLE_SIZE elements at i * 1000003 modulo the size (the module's documented positions)."""
    flat = np.ravel(array)
    return flat[(np.arange(probe_lib.PROBE_SAMPLE_SIZE, dtype=np.int64) * 1000003) % max(flat.size, 1)]


def test_a_probe_reads_tensors_in_full_and_samples_them_with_static_or_run_time_sizes():
    module = Probed()
    _, functions = objects_lib.signatures_of(module)  # as a signature: keyword inputs, a dict of outputs
    frozen = freeze_lib.freeze("serving_default", functions["serving_default"], resources.resource_owners(module),
                               graph_lib.WeightStore(), set(), set())
    assert any(graph_lib.WEIGHT_KEY_ATTR in n.attr for n in frozen.graph_def.node)  # w is read from the store
    y, positive = (frozen.outputs[k].tensor for k in ("y", "positive"))
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    probe = probe_lib.probe_callable(frozen, [y], [y, positive, "no_such_node:0"])
    values = fold_check.run_as_written(probe, {"x": None}, {"x": x})
    expected = module.f(tf.constant(x))
    np.testing.assert_allclose(values["full"][y].numpy(), expected["y"].numpy(), rtol=1e-6, atol=1e-6)
    assert set(values["sampled"]) == {y, positive}  # a tensor of neither graph is left out
    for name, key in ((y, "y"), (positive, "positive")):
        np.testing.assert_allclose(values["sampled"][name], _sample(expected[key].numpy()), rtol=1e-6, atol=1e-6)
    assert np.asarray(module.w.numpy()).shape == (64, 128)  # the input's variable is read, not released
