"""fold_saved_model on Keras 3 models exported with model.export.

Keras 3 never emits FusedBatchNormV3: its batch norm is Mul/AddV2 on constants
computed from the statistics, which constant_folding and fold_affine fold.
The reference is the original SavedModel, run here.
"""

import pytest

import conftest
import keras3_models
from savedmodel_checks import batch_norm_like_left, compare_outputs, data_path_ops
from tf_bnfuse import fold_saved_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("keras3"))
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = keras3_models.build(name, root)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["conv_bn", "depthwise_bn", "separable_bn", "conv_transpose_bn", "conv1d_bn",
                                  "dense_bn", "conv3d_bn", "mobilenet_v2_small", "resnet50_small"])
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


def test_keras3_conv_feeding_batch_norm_and_relu(exported, tmp_path):
    src, _ = exported("branch_bn")
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    compare_outputs(src, out)
    affine = next(p for p in report.signatures["serving_default"].passes if p.pass_name == "fold_affine")
    assert affine.folds == []
    [skip] = affine.skips
    assert skip.op == "Mul" and "2 consumers" in skip.reason
