"""A kept root function is shown by its graph to run what its signature runs, or it is called.

The verification calls every signature of the output; a root function that, by its graph and
its signature's, runs the same function with the same arguments, variables and outputs as
in the input is not called again (savedmodel/root_functions.signature_relation). These tests
read the relation off models saved and loaded as users do, and judge it by how the models
were written, not by the code under test.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf

import io_models
from savedmodel_checks import compare_in_fresh_process
from tf_bnfuse import fold_saved_model
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.savedmodel import root_functions

SPECS = [tf.TensorSpec([None, 8, 8, 2], tf.float32, name="z"), tf.TensorSpec([None, 8, 8, 4], tf.float32, name="a")]


class _Wrappers(tf.Module):
    """serve(z, a) and functions that call it: one only passes it on, the others change what goes in or out."""

    def __init__(self):
        rng = np.random.default_rng(5)
        self.kernel = tf.Variable(rng.standard_normal((3, 3, 2, 4)).astype(np.float32))
        self.stats = [tf.Variable(v.astype(np.float32)) for v in (
            rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.5, 4), rng.normal(0, 0.5, 4), rng.uniform(0.2, 2.0, 4))]

    @tf.function(input_signature=SPECS)
    def serve(self, z, a):
        gamma, beta, mean, variance = self.stats
        y = tf.raw_ops.FusedBatchNormV3(x=tf.nn.conv2d(z, self.kernel, 1, "SAME"), scale=gamma, offset=beta,
                                        mean=mean, variance=variance, epsilon=1e-3, is_training=False)[0]
        return {"y": y + a, "y_only": y}

    @tf.function(input_signature=SPECS)
    def passed_on(self, z, a):
        return self.serve(z, a)

    @tf.function(input_signature=SPECS)
    def outputs_swapped(self, z, a):
        result = self.serve(z, a)
        return {"y": result["y_only"], "y_only": result["y"]}

    @tf.function(input_signature=SPECS)
    def plus_one(self, z, a):
        return {k: v + 1.0 for k, v in self.serve(z, a).items()}

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 2], tf.float32, name="z")] * 2)
    def input_twice(self, z, other):
        return self.serve(z, tf.zeros_like(tf.concat([other, other], axis=-1)))


@pytest.fixture(scope="module")
def wrappers_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wrappers") / "model")
    module = _Wrappers()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


@pytest.fixture(scope="module")
def wrappers(wrappers_path):
    loaded = tf.saved_model.load(wrappers_path)
    return loaded, loaded.signatures["serving_default"]


def _relation(loaded, signature, name):
    return root_functions.signature_relation(getattr(loaded, name).get_concrete_function(*SPECS), signature)


@pytest.mark.quick
def test_the_relation_of_a_function_to_its_signature_is_read_off_both_graphs(wrappers, monkeypatch):
    loaded, signature = wrappers
    read = []  # the library functions whose bodies were read: not serve's (Conv2D) where both reach it
    real = tf_internal.library_function_def
    monkeypatch.setattr(tf_internal, "library_function_def",
                        lambda graph, name: read.append(real(graph, name)) or read[-1])
    # serve(z, a) -> {"y", "y_only"}: argument 0 is the signature's z, 1 its a; flat outputs y, y_only.
    expected = ({0: "z", 1: "a"}, [["y"], ["y_only"]])
    assert _relation(loaded, signature, "serve") == expected
    assert _relation(loaded, signature, "passed_on") == expected  # seen through the call it only passes on
    assert _relation(loaded, signature, "outputs_swapped") == ({0: "z", 1: "a"}, [["y_only"], ["y"]])
    assert read and not [f.signature.name for f in read if "Conv2D" in {n.op for n in f.node_def}]
    assert _relation(loaded, signature, "plus_one") is None  # computes more than the call
    twice = root_functions.signature_relation(
        loaded.input_twice.get_concrete_function(SPECS[0], SPECS[0]), signature)
    assert twice is None  # computes the call's argument a


@pytest.mark.quick
def test_a_kept_root_function_is_called_unless_its_graph_shows_it_runs_its_signature(tmp_path, caplog):
    """The output of io_models.two_input_functions keeps `serve(z, a)`: its graph shows it runs the
    signature's function, so the verification does not call it; its values still match the input's."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    inputs = io_models.two_input_functions(src)["serving_default"][0]
    with caplog.at_level(logging.INFO, logger="tf_bnfuse.verify.root_function_checks"):
        report = fold_saved_model(src, out)
    assert report.kept_functions == ["serve"]
    assert any("serve(tensor, tensor) runs signature serving_default's function, by its graph" in r.getMessage()
               for r in caplog.records)
    original, folded = tf.saved_model.load(src), tf.saved_model.load(out)
    expected, actual = original.serve(inputs["z"], inputs["a"]), folded.serve(inputs["z"], inputs["a"])
    for key in ("y", "y_only"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, atol=1e-4)


@pytest.mark.quick
def test_functions_that_only_pass_serve_on_are_kept_by_their_graphs(wrappers_path, tmp_path, caplog):
    """passed_on and outputs_swapped run serve's function with their own arguments: kept as
    serve is, by their graphs (not by their values), and not called again by the verification;
    each computes in the output what it computes in the input. plus_one computes more: matched
    by value, and not kept."""
    out = str(tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="tf_bnfuse.verify.root_function_checks"):
        report = fold_saved_model(wrappers_path, out)
    assert len(report.signatures["serving_default"].folds) == 1
    assert report.kept_functions == ["outputs_swapped", "passed_on", "serve"]
    assert "plus_one(tensor, tensor): no folded signature computes it" in report.dropped_functions["plus_one"]
    not_called = [r.getMessage().split("(")[0] for r in caplog.records if "by its graph: not called" in r.getMessage()]
    assert sorted(not_called) == ["outputs_swapped", "passed_on", "serve"]
    rng = np.random.default_rng(6)
    z, a = rng.standard_normal((2, 8, 8, 2)).astype(np.float32), rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    positional = {"0": z, "1": a}
    outputs = compare_in_fresh_process(wrappers_path, out, {
        "serving_default": [{"z": z, "a": a}], "root.passed_on": [positional], "root.outputs_swapped": [positional]})
    swapped, passed = outputs["root.outputs_swapped"][0], outputs["root.passed_on"][0]
    np.testing.assert_array_equal(swapped["0"], passed["1"])  # flat outputs y, y_only: swapped


@pytest.mark.quick
def test_a_kept_root_function_is_called_where_its_graph_cannot_be_read(tmp_path, caplog, monkeypatch):
    """Where TensorFlow does not show a library function's body (tf_internal.library_function_def
    gives None, as on a TensorFlow without the private lookup), the written `serve`, which reaches
    the signature's function through one, is called and compared: the run still passes."""
    monkeypatch.setattr(tf_internal, "library_function_def", lambda graph, name: None)
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    io_models.two_input_functions(src)
    with caplog.at_level(logging.INFO, logger="tf_bnfuse.verify.root_function_checks"):
        report = fold_saved_model(src, out)
    assert report.kept_functions == ["serve"] and report.verification.ok
    assert not [r for r in caplog.records if "by its graph: not called" in r.getMessage()]
