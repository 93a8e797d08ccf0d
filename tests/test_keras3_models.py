"""fold_saved_model on Keras 3 models exported with model.export.

Keras 3 never emits FusedBatchNormV3: its batch norm is Mul/AddV2 on constants
computed from the statistics, which constant_folding and fold_affine fold.
The reference is the original SavedModel, run here.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

import conftest
import keras
import model_zoo
from savedmodel_checks import batch_norm_like_left, compare_in_fresh_process, compare_outputs, data_path_ops
from tf_bnfuse import fold_saved_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("keras3"))
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = model_zoo.build(keras, name, root)
        return cache[name]
    return get


@pytest.mark.parametrize("name", [pytest.param("conv_bn", marks=pytest.mark.quick), "dense_rank3_bn", "einsum_dense_bn", "dilated_conv_bn", "dilated_depthwise_bn", "depthwise_bn", "separable_bn", "conv_transpose_bn", "conv1d_bn",
                                  "dense_bn", "conv3d_no_bias_bn", "mobilenet_v2_small", "resnet50_small"])
def test_keras3_model_folds_every_batch_norm(exported, name, tmp_path):
    src, batch_norms = exported(name)
    out = str(tmp_path / "out")
    before = conftest.tree_digest(src)
    report = fold_saved_model(src, out)
    assert conftest.tree_digest(src) == before
    compare_outputs(src, out)
    graph = report.signatures["serving_default"]
    affine = next(p for p in graph.passes if p.pass_name == "fold_affine")
    assert len(affine.folds) == batch_norms, [s.reason for s in affine.skips]
    assert affine.skips == []
    assert batch_norm_like_left(out) == []
    assert len(data_path_ops(out)) < len(data_path_ops(src))
    if name.startswith("dilated"):  # the fold went through the BatchToSpaceND, which stays
        assert "BatchToSpaceND" in data_path_ops(out)
        assert not {"Mul", "AddV2", "Rsqrt"} & set(data_path_ops(out))


def fold_and_compare(exported, name, tmp_path):
    """(source, output, serving GraphReport, number of batch norms) after folding a model and
    checking its outputs against the original."""
    src, batch_norms = exported(name)
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    compare_outputs(src, out)
    return src, out, report.signatures["serving_default"], batch_norms


def test_keras3_swish_after_batch_norm_is_written_and_folded(exported, tmp_path):
    """swish is a tf.custom_gradient in Keras 3; the written model must still save and load."""
    src, out, graph, batch_norms = fold_and_compare(exported, "conv_bn_swish", tmp_path)
    assert len(graph.folds) == batch_norms == 1
    # swish's own beta * x, with beta = 1.0, is gone (simplify_arithmetic): nothing is left alone.
    assert graph.skips == []
    simplified = next(p for p in graph.passes if p.pass_name == "simplify_arithmetic")
    assert simplified.note.startswith("1 ")
    assert "Rsqrt" not in data_path_ops(out) and "Rsqrt" in data_path_ops(src)


def test_keras3_batch_norm_before_a_valid_conv_folds_forward(exported, tmp_path):
    src, out, graph, batch_norms = fold_and_compare(exported, "pool_bn_conv", tmp_path)
    forward = next(p for p in graph.passes if p.pass_name == "fold_forward")
    assert len(forward.folds) == batch_norms == 1 and graph.skips == []
    assert not {"Mul", "AddV2", "Rsqrt"} & set(data_path_ops(out))


def test_keras3_mixed_float16_folds_through_the_cast_and_keeps_dtypes(exported, tmp_path):
    src, batch_norms = exported("mixed_float16_conv_bn")
    assert "Cast" in data_path_ops(src)
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    graph = report.signatures["serving_default"]
    assert len(graph.folds) == batch_norms == 1 and graph.skips == []
    assert not {"Mul", "AddV2", "Rsqrt"} & set(data_path_ops(out))
    original, folded = tf.saved_model.load(src).signatures["serving_default"], \
        tf.saved_model.load(out).signatures["serving_default"]
    assert folded.structured_input_signature == original.structured_input_signature
    image = np.random.default_rng(4).standard_normal((2, 12, 12, 3)).astype(np.float32)
    [key] = original.structured_input_signature[1]
    expected, actual = original(**{key: image}), folded(**{key: image})
    for name in expected:  # float16 outputs: within float16 precision of the output's scale
        assert actual[name].dtype == expected[name].dtype == tf.float16
        e, a = expected[name].numpy().astype(np.float64), actual[name].numpy().astype(np.float64)
        assert np.abs(a - e).max() <= 1e-2 * np.abs(e).max()


def test_keras3_conv_feeding_batch_norm_and_relu(exported, tmp_path):
    src, _ = exported("branch_bn")
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    compare_outputs(src, out)
    affine = next(p for p in report.signatures["serving_default"].passes if p.pass_name == "fold_affine")
    assert affine.folds == []
    [skip] = affine.skips
    assert skip.op == "Mul" and "2 consumers" in skip.reason


@pytest.mark.parametrize("name", ["branch_bn", "preactivation_concat_bn"])
def test_keras3_a_batch_norm_that_cannot_fold_adds_no_op(exported, name, tmp_path):
    src, _ = exported(name)
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    compare_outputs(src, out)
    assert report.signatures["serving_default"].folds == []
    assert len(data_path_ops(out)) <= len(data_path_ops(src))


def _folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def test_keras3_export_signatures_are_folded_once_and_weights_stored_once(exported, tmp_path):
    """model.export writes "serve" and "serving_default" as one function: freeze and fold it once,
    and store the folded weights once, in variables/, not as constants in saved_model.pb."""
    src, _ = exported("resnet50_small")
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    assert sorted(report.signatures) == ["serve", "serving_default"]
    assert report.signatures["serving_default"].same_as == "serve"
    # the report lists the function's passes once, under the signature that names the others
    written = report.to_dict()["signatures"]
    assert written["serve"]["shared_by"] == ["serving_default"] and len(written["serve"]["passes"]) > 1
    assert "passes" not in written["serving_default"] and written["serving_default"]["same_as"] == "serve"
    assert [p["name"] for p in report.phases if p["name"].startswith("freeze")] == ["freeze serve"]
    weights = _folder_bytes(os.path.join(src, "variables"))
    assert _folder_bytes(os.path.join(out, "variables")) < 1.05 * weights
    assert os.path.getsize(os.path.join(out, "saved_model.pb")) < 0.05 * weights
    folded = tf.saved_model.load(out)
    image = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    [key] = folded.signatures["serve"].structured_input_signature[1]
    serve = folded.signatures["serve"](**{key: image})
    serving_default = folded.signatures["serving_default"](**{key: image})
    for name in serve:
        np.testing.assert_array_equal(serve[name].numpy(), serving_default[name].numpy())


def test_keras3_residual_leaky_relu_folds_and_tf_computes_it_right(exported, tmp_path):
    """TF 2.21's oneDNN remapper would fuse the folded Conv2D -> BiasAdd -> AddV2 -> LeakyRelu with
    alpha 0.2; the fold writes its bias as AddV2 there. oneDNN is on in the tests (conftest)."""
    src, out, graph, batch_norms = fold_and_compare(exported, "residual_leaky_relu", tmp_path)
    assert len(graph.folds) == batch_norms == 1 and graph.skips == []
    assert "BiasAdd" not in data_path_ops(out) and "Rsqrt" not in data_path_ops(out)


def test_keras3_serve_endpoint_is_kept_and_runs_the_folded_graph(exported, tmp_path):
    """model.export's `loaded.serve` is the function both signatures wrap: the output keeps it,
    folded, and it computes what the original's does (judged in a fresh process)."""
    src, _ = exported("conv_bn")
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    assert report.kept_functions == ["serve"] and report.dropped_functions == {}
    spec = tf.saved_model.load(src).signatures["serving_default"].structured_input_signature[1]
    (name, tensor_spec), = spec.items()
    feeds = {name: np.random.default_rng(5).standard_normal([2] + tensor_spec.shape.as_list()[1:]).astype(np.float32)}
    outputs = compare_in_fresh_process(src, out, {"serve": [feeds], "serving_default": [feeds], "root.serve": [feeds]})
    np.testing.assert_array_equal(outputs["root.serve"][0]["0"], outputs["serving_default"][0]["output_0"])

    def serve_ops(path):
        loaded = tf.saved_model.load(path)
        graph_def = loaded.serve.get_concrete_function(tf.TensorSpec(tensor_spec.shape, tf.float32)).graph.as_graph_def()
        return {n.op for n in graph_def.node} | {n.op for f in graph_def.library.function for n in f.node_def}
    assert "Rsqrt" in serve_ops(src)  # the batch norm's statistics, computed on every call
    assert "Conv2D" in serve_ops(out) and "Rsqrt" not in serve_ops(out)
