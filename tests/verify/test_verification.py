"""Verification a user can trust: tolerance from the computation, random outputs, valid ids.

Models are built the way users build them (Keras 3, model.export). Each fold
is also checked against the original run here, not only by the tool.
"""

import numpy as np
import pytest
import tensorflow as tf

import io_models
import keras
import model_zoo
from savedmodel_checks import assert_same_outputs
from tf_bnfuse import fold_saved_model

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("verification"))
    return lambda name: model_zoo.build(keras, name, root)


def test_mixed_precision_with_float32_output_verifies_at_float16_tolerance(exported, tmp_path):
    src, batch_norms = exported("mixed_float16_float32_output")
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    assert len(report.signatures["serve"].folds) == batch_norms == 2
    checks = report.verification.checks
    assert {c.dtype for c in checks} == {"float32"} and {c.precision for c in checks} == {"float16 compute"}
    assert {(c.rtol, c.atol) for c in checks} == {(1e-2, 1e-3)}
    assert report.verification.ok
    # Independent check: the output against the original, at float16's precision of the output's scale.
    x = np.random.default_rng(5).standard_normal((2, 12, 12, 3)).astype(np.float32)
    original = tf.saved_model.load(src).signatures["serving_default"]
    folded = tf.saved_model.load(out).signatures["serving_default"]
    [key] = original.structured_input_signature[1]
    assert_same_outputs({k: v.numpy() for k, v in original(**{key: x}).items()},
                        {k: v.numpy() for k, v in folded(**{key: x}).items()}, rtol=1e-2)


def test_random_outputs_are_reported_not_compared(tmp_path):
    src = str(tmp_path / "src")
    io_models.stateful_random(src)
    report = fold_saved_model(src, str(tmp_path / "out"))
    verification = report.verification
    assert verification.random_outputs() == ["serving_default/dropped"]
    clean = [c for c in verification.checks if c.output == "clean"]
    assert clean and all(c.ok and not c.random for c in clean), "the deterministic output is still compared"
    assert verification.ok and len(report.signatures["serving_default"].folds) == 1
    # Independently: the original really gives other values on a second call.
    original = tf.saved_model.load(src).signatures["serving_default"]
    x = np.ones((2, 8, 8, 2), np.float32)
    assert not np.array_equal(original(x=x)["dropped"].numpy(), original(x=x)["dropped"].numpy())


def test_keras3_dropout_in_training_mode_is_reproduced_call_for_call(exported, tmp_path):
    """Keras 3 draws dropout masks from a SeedGenerator variable, which the signature writes: it
    stays state in the output, so the folded model repeats the original's masks and is compared."""
    src, _ = exported("dropout_training")
    report = fold_saved_model(src, str(tmp_path / "out"))
    assert report.verification.ok and report.verification.random_outputs() == []
    assert len(report.signatures["serve"].folds) == 1
    original = tf.saved_model.load(src).signatures["serving_default"]
    [key] = original.structured_input_signature[1]
    x = np.ones((2, 12, 12, 3), np.float32)
    assert not np.array_equal(original(**{key: x})["output_0"].numpy(), original(**{key: x})["output_0"].numpy())


@pytest.mark.parametrize("name,rows", [("embedding4_conv_bn", 4), ("embedding1000_conv_bn", 1000)])
def test_integer_ids_are_drawn_below_the_embedding_rows(exported, tmp_path, name, rows):
    src, _ = exported(name)
    out = str(tmp_path / "out")
    report = fold_saved_model(src, out)
    assert report.verification.ok and len(report.signatures["serve"].folds) == 1
    [(where, how)] = [kv for kv in report.verification.inputs.items() if kv[0].startswith("serve/")]
    assert how.startswith("[0, %d) from the %d rows of" % (rows, rows)), how
    ids = np.random.default_rng(8).integers(0, rows, (3, 6)).astype(np.int32)
    original = tf.saved_model.load(src).signatures["serving_default"]
    folded = tf.saved_model.load(out).signatures["serving_default"]
    [key] = original.structured_input_signature[1]
    assert_same_outputs({k: v.numpy() for k, v in original(**{key: ids}).items()},
                        {k: v.numpy() for k, v in folded(**{key: ids}).items()})


@pytest.mark.parametrize("users_setting", [False, True])
def test_the_original_runs_without_grappler_and_the_users_setting_comes_back(users_setting):
    from tf_bnfuse.verify import execution as verify

    def meta_optimizer_disabled():
        return tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": users_setting})
    try:
        with verify.as_written():
            assert meta_optimizer_disabled()
        assert meta_optimizer_disabled() == users_setting
        with pytest.raises(ZeroDivisionError):
            with verify.as_written():
                1 / 0
        assert meta_optimizer_disabled() == users_setting
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
