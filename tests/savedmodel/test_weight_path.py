"""The weight path (issue 17): variables the graph only reads stay variables of the input until a
fold needs their value; the rest are written as they are. Each case against the original model
as users run it: a fresh process loads both and calls every signature in order."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from savedmodel_checks import compare_in_fresh_process
from tf_bnfuse import config as config_lib
from tf_bnfuse import fold_math
from tf_bnfuse import fold_saved_model
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.passes import runner
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.savedmodel import freeze as freeze_lib
from tf_bnfuse.savedmodel import load as load_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.savedmodel import write as write_lib

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

C = 32  # a 3x3 C -> C kernel is 36 KB: above the store's threshold, so it takes the stored path
RNG = np.random.default_rng(3)


def _bn(channels):
    return [tf.constant(v.astype(np.float32)) for v in (
        RNG.uniform(0.5, 1.5, channels), RNG.normal(0, 0.5, channels), RNG.normal(0, 0.5, channels),
        RNG.uniform(0.2, 2.0, channels))]


def _batch_norm(y, stats):
    gamma, beta, mean, variance = stats
    return tf.raw_ops.FusedBatchNormV3(x=y, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=1e-3,
                                       is_training=False)[0]


class Shared(tf.Module):
    """One kernel read by two signatures, by two convs (one with a batch norm) and by a
    non-linear op; a big state variable one signature writes and two others read."""

    def __init__(self):
        self.kernel = tf.Variable(RNG.standard_normal((3, 3, C, C)).astype(np.float32) / 10)
        self.other = tf.Variable(RNG.standard_normal((3, 3, C, C)).astype(np.float32) / 10)
        self.state = tf.Variable(RNG.standard_normal((64, 64)).astype(np.float32))  # 16 KB
        self.stats, self.stats_b = _bn(C), _bn(C)

    def _read(self, x):
        return {"y": tf.reduce_sum(x) * self.state[:2, :2]}

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, C], tf.float32)])
    def a_fold(self, x):
        folded = tf.nn.relu(_batch_norm(tf.nn.conv2d(x, self.kernel, 1, "SAME"), self.stats))
        plain = tf.nn.conv2d(x, self.kernel, 1, "SAME")  # the same kernel, no batch norm
        return {"folded": folded, "plain": plain, "tanh": tf.reduce_sum(tf.tanh(self.kernel)) + tf.zeros([1])}

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, C], tf.float32)])
    def b_fold_again(self, x):
        return {"y": _batch_norm(tf.nn.conv2d(x, self.kernel, 1, "SAME"), self.stats_b)
                + tf.nn.conv2d(x, self.other, 1, "SAME")}

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, C], tf.float32)])
    def c_read(self, x):
        return self._read(x)

    @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
    def d_write(self, step):
        self.state.assign_add(tf.fill([64, 64], step))
        return {"sum": tf.reduce_sum(self.state)}

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, C], tf.float32)])
    def e_read_again(self, x):
        return self._read(x)


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory):
    module = Shared()
    path = str(tmp_path_factory.mktemp("weights") / "shared")
    signatures = {name: getattr(module, name) for name in ("a_fold", "b_fold_again", "c_read", "d_write",
                                                         "e_read_again")}
    tf.saved_model.save(module, path, signatures=signatures)
    return path


def test_only_read_variables_are_not_copied_by_freezing(shared_model):
    loaded = load_lib.load(load_lib.read(shared_model), ("serve",))
    owners = resources.resource_owners(loaded)
    written = freeze_lib.written_handles(loaded.signatures.values())
    store = graph_lib.WeightStore()
    frozen = freeze_lib.freeze("a_fold", loaded.signatures["a_fold"], owners, store, written)
    stored = [n for n in frozen.graph_def.node if graph_lib.WEIGHT_KEY_ATTR in n.attr]
    assert stored and all(not n.attr["value"].tensor.tensor_content for n in stored)
    assert store.variables and not store.arrays  # nothing read yet
    assert {id(store.variable_of(n)) for n in stored} == {id(loaded.kernel)}
    # The state another signature writes stays a variable here (a placeholder fed its handle).
    reader = freeze_lib.freeze("c_read", loaded.signatures["c_read"], owners, graph_lib.WeightStore(), written)
    assert [r.owner for r in reader.resources.values()] == [loaded.state]


def test_shared_kernels_and_state_through_the_stored_path(shared_model, tmp_path):
    out = str(tmp_path / "out")
    report = fold_saved_model(shared_model, out)
    assert len(report.signatures["a_fold"].folds) == 1 and len(report.signatures["b_fold_again"].folds) == 1
    x = RNG.standard_normal((2, 6, 6, C)).astype(np.float32)
    # Sorted: the readers before and after the writer see the state as the original's readers do.
    compare_in_fresh_process(shared_model, out, {
        "a_fold": [{"x": x}], "b_fold_again": [{"x": x}], "c_read": [{"x": x}],
        "d_write": [{"step": np.float32(1.5)}, {"step": np.float32(-0.5)}], "e_read_again": [{"x": x}]})
    # Written once each: the kernel as it is (for the plain conv and the tanh), the other kernel,
    # and the two folded kernels; the state is a variable the signatures share, not a weight.
    reloaded = tf.saved_model.load(out)
    assert sorted(tuple(v.shape.as_list()) for v in reloaded.weights) == [(3, 3, C, C)] * 4
    assert [tuple(r.shape.as_list()) for r in reloaded.kept_resources] == [(64, 64)]


# 3x3 CR -> CR kernels are 1.3 MB: above WeightStore's VARIABLE_MIN_BYTES, so a releasing
# store holds their folds in variables
CR = 192


class Releasing(tf.Module):
    """Kernels that a fold may release (one reader) and kernels it must not: read by a plain conv
    too, or by several signatures, two of which fold it alike."""

    def __init__(self):
        def kernel():
            return tf.Variable(RNG.standard_normal((3, 3, CR, CR)).astype(np.float32) / 30)
        self.alone, self.also_plain, self.shared = kernel(), kernel(), kernel()
        self.stats = [_bn(CR) for _ in range(4)]

    def _conv(self, x, kernel):
        return tf.nn.conv2d(x, kernel, 1, "SAME")

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, CR], tf.float32)])
    def alone_fold(self, x):
        return {"y": tf.nn.relu(_batch_norm(self._conv(x, self.alone), self.stats[0]))}

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, CR], tf.float32)])
    def fold_and_plain(self, x):
        return {"y": _batch_norm(self._conv(x, self.also_plain), self.stats[1]) + self._conv(x, self.also_plain)}

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, CR], tf.float32)])
    def first_reader(self, x):
        return {"y": _batch_norm(self._conv(x, self.shared), self.stats[2])}

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, CR], tf.float32)])
    def second_reader(self, x):
        return {"y": _batch_norm(self._conv(x, self.shared), self.stats[3])}

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, CR], tf.float32)])
    def first_reader_again(self, x):  # another function, the same fold as first_reader's
        return {"y": _batch_norm(self._conv(x, self.shared), self.stats[2]), "x_sum": tf.reduce_sum(x)}


def test_a_releasing_store_frees_only_the_kernels_nothing_else_reads(tmp_path):
    """WeightStore.releases: a folded kernel's old value is shrunk where its fold replaced the only
    reader (control edges of the tf.function's read included); each signature, written, computes
    what TensorFlow computes with the original's kernels; equal folds are written once."""
    module = Releasing()
    path = str(tmp_path / "releasing")
    names = ["alone_fold", "fold_and_plain", "first_reader", "second_reader", "first_reader_again"]
    tf.saved_model.save(module, path, signatures={n: getattr(module, n) for n in names})
    loaded = load_lib.load(load_lib.read(path), ("serve",))
    before = {n: getattr(loaded, n).numpy() for n in ("alone", "also_plain", "shared")}
    x = RNG.standard_normal((2, 4, 4, CR)).astype(np.float32)
    expected = {n: loaded.signatures[n](x=tf.constant(x))["y"].numpy() for n in names}
    owners = resources.resource_owners(loaded)
    written = freeze_lib.written_handles(loaded.signatures.values())
    shared = freeze_lib.shared_variables(loaded.signatures.values())
    folded = {}
    for name in names:
        frozen = freeze_lib.freeze(name, loaded.signatures[name], owners, graph_lib.WeightStore(), written, shared)
        stored = {n.name for n in frozen.graph_def.node if graph_lib.WEIGHT_KEY_ATTR in n.attr}
        assert any(i[1:] in stored for n in frozen.graph_def.node for i in n.input if i.startswith("^")), \
            "the reads keep the tf.function's control edges"
        frozen.weights.releases = True
        graph_def, reports = runner.run_pipeline(frozen.release_graph_def(), frozen.output_tensors,
                                                 config_lib.load_config(None)["pipeline"], owns_input=True,
                                                 context=PassContext(frozen.weights), weights_out=True)
        assert sum(len(r.folds) for r in reports) == 1
        folded[name] = dataclasses.replace(frozen, graph_def=graph_def)
    assert loaded.alone.value().shape.as_list() == [0]  # released
    for name in ("also_plain", "shared"):  # read by something else: intact
        np.testing.assert_array_equal(getattr(loaded, name).numpy(), before[name])
    out = str(tmp_path / "out")
    write_lib.write([write_lib.MetaGraphToWrite(("serve",), folded)], out)
    del loaded, folded
    reloaded = tf.saved_model.load(out)
    for name in names:
        actual = reloaded.signatures[name](x=tf.constant(x))["y"].numpy()
        np.testing.assert_allclose(actual, expected[name], rtol=1e-4, atol=1e-4 * np.abs(expected[name]).max())
    # The folds of alone, also_plain, shared (twice alike, once otherwise), and also_plain as it is.
    assert sorted(v.shape.as_list() for v in reloaded.weights if v.shape.rank == 4) == [[3, 3, CR, CR]] * 5


def test_pinned_weights_outlive_the_passes_until_unpinned(tmp_path):
    """WeightStore.pin (what the fold checks keep of the original): a releasing store shrinks a
    pinned kernel neither when its fold replaces the only reader nor when the passes retain the
    folded graph; unpin against the folded graph shrinks it then."""
    module = Releasing()
    path = str(tmp_path / "releasing")
    tf.saved_model.save(module, path, signatures={"alone_fold": module.alone_fold})
    loaded = load_lib.load(load_lib.read(path), ("serve",))
    kernel = loaded.alone.numpy()
    frozen = freeze_lib.freeze("alone_fold", loaded.signatures["alone_fold"], resources.resource_owners(loaded),
                               graph_lib.WeightStore(), set(), set())
    original = graph_lib.copy_graph_def(frozen.graph_def)
    frozen.weights.pin(frozen.graph_def)
    assert frozen.weights.copy().pinned == frozen.weights.pinned != frozenset()  # a copy keeps them too
    frozen.weights.releases = True
    graph_def, _ = runner.run_pipeline(frozen.release_graph_def(), frozen.output_tensors,
                                       config_lib.load_config(None)["pipeline"], owns_input=True,
                                       context=PassContext(frozen.weights), weights_out=True)
    np.testing.assert_array_equal(loaded.alone.numpy(), kernel)  # pinned: not shrunk by the fold
    stored = {n.name: n for n in original.node if graph_lib.WEIGHT_KEY_ATTR in n.attr}
    assert stored and all(frozen.weights.variable_of(n) is loaded.alone for n in stored.values())
    frozen.weights.unpin(graph_def)
    assert loaded.alone.value().shape.as_list() == [0]  # released once unpinned
    assert all(frozen.weights.variable_of(n) is None for n in stored.values())


def test_a_releasing_store_holds_a_kernel_written_into_new_array_without_a_copy():
    """WeightStore.new_array: in a releasing store, an array big enough for a variable
    (VARIABLE_MIN_BYTES) is that variable's own buffer, which put() keeps as it is; the values
    written there are the variable's. An array put() did not get from new_array goes into a
    variable as before, and a store that does not release gives numpy's own."""
    shape = (3, 3, 128, 256)  # 1.2 MB of float32
    assert np.prod(shape) * 4 >= graph_lib.weights.VARIABLE_MIN_BYTES
    kernel = RNG.standard_normal(shape).astype(np.float32)
    scale = RNG.uniform(0.5, 2.0, shape[-1])
    store = graph_lib.WeightStore()
    store.releases = True
    out = store.new_array(shape, np.float32)
    fold_math.scale_kernel_as(kernel, scale, (3,), np.float32, out=out)
    key = store.put(out)
    held = np.asarray(store.variables[key].read_value())
    assert held.ctypes.data == out.ctypes.data, "the variable holds the array's buffer, not a copy"
    np.testing.assert_array_equal(held, (kernel.astype(np.float64) * scale).astype(np.float32))
    other = np.array(out)
    np.testing.assert_array_equal(store.variables[store.put(other)].numpy(), other)
    unused = store.new_array(shape, np.float32)
    assert store.new_array((4, 4), np.float32).base is None  # small: numpy's
    del unused  # a fold refused after its array was made: the store keeps nothing of it
    assert not store._writable  # pylint: disable=protected-access
    plain = graph_lib.WeightStore().new_array(shape, np.float32)
    assert plain.base is None and plain.shape == shape
