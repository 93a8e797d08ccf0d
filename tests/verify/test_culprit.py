"""A failed verification names its fold: one fold is broken on purpose (its emitted kernel
scaled), in a model with several, and the run must point at exactly that one."""

import os

import numpy as np
import pytest

import keras
from keras_flavour import randomize_batch_norms
from tf_bnfuse import config as config_lib
from tf_bnfuse import errors
from tf_bnfuse import fold_saved_model
from tf_bnfuse.passes import drivers
from tf_bnfuse.verify import culprit as culprit_lib

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

CONVS = 5


@pytest.fixture(scope="module")
def conv_stack(tmp_path_factory):
    """Keras 3: five Conv2D -> BatchNormalization -> ReLU blocks, exported with model.export."""
    keras.backend.clear_session()
    image = keras.Input((8, 8, 3), name="image")
    x = image
    for k in range(CONVS):
        x = keras.layers.Conv2D(4, 3, padding="same", name="conv%d" % k)(x)
        x = keras.layers.BatchNormalization(name="bn%d" % k)(x)
        x = keras.layers.ReLU()(x)
    model = keras.Model(image, x)
    randomize_batch_norms(keras, model, np.random.default_rng(0))
    path = str(tmp_path_factory.mktemp("culprit") / "conv_stack")
    model.export(path, verbose=False)
    return path


@pytest.mark.parametrize("broken", [0, 3])
def test_the_error_and_the_report_name_the_broken_fold(conv_stack, broken, tmp_path, monkeypatch):
    folds_into = []
    original = drivers.fold_weights

    def fold_weights_breaking_one(chain, *new_array):
        folded = original(chain, *new_array)
        folds_into.append(chain.match.linear.name)
        if "/conv%d" % broken in chain.match.linear.name:
            folded.kernel = folded.kernel * 1.5  # a wrong kernel, as a fold-math bug would emit
        return folded

    monkeypatch.setattr(drivers, "fold_weights", fold_weights_breaking_one)
    out = str(tmp_path / "out")
    # The folds' own checks would name it first (tests/verify/test_fold_check.py); loosened out of
    # the way, the bisection is what finds it.
    config = {"pipeline": config_lib.load_config()["pipeline"], "verify": {"fold_rounding_multiple": 1e9}}
    with pytest.raises(errors.VerificationError) as raised:
        fold_saved_model(conv_stack, out, config=config)
    message = str(raised.value)
    culprit = raised.value.run_report.verification.culprit
    [fold] = culprit.folds
    assert "/conv%d" % broken in fold["linear_node"] and "/bn%d" % broken in fold["node"]
    assert "caused by the fold of %s" % fold["node"] in message and fold["linear_node"] in message
    assert sum("/conv%d" % k in message for k in range(CONVS)) == 1  # no other conv is named
    assert culprit.error_before > 1e-3 and culprit.error_without <= 1e-4
    assert culprit.checks <= culprit_lib.max_checks(CONVS)
    assert len({name for name in folds_into}) == CONVS  # the model had all five folds to suspect
    assert not os.path.exists(out)


def test_bisect_finds_one_culprit_within_its_bound_and_says_when_no_fold_is_to_blame():
    for count in (1, 2, 7, 64):
        for culprit in {0, count // 2, count - 1}:
            calls = []

            def check_without(left_out, culprit=culprit):
                calls.append(left_out)
                return culprit in left_out, 0.0 if culprit in left_out else 1.0

            found, (passes, _), checks = culprit_lib.bisect(list(range(count)), check_without)
            assert found == [culprit] and passes and checks == len(calls) <= culprit_lib.max_checks(count)
    found, (passes, error), checks = culprit_lib.bisect(list(range(8)), lambda left_out: (False, 0.5))
    assert found == [] and not passes and error == 0.5 and checks == 1
