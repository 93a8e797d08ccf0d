"""Probes (savedmodel/probe.py): the values of tensors inside a frozen signature, in full, and
how far pairs of them are apart over every element, computed in the graph, where the shape is
static and where only the run knows it. Against what TensorFlow computes calling the original
function, compared in numpy; and how the fold checks judge a fold from those numbers."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from tf_bnfuse import config as config_lib
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.savedmodel import freeze as freeze_lib
from tf_bnfuse.savedmodel import objects as objects_lib
from tf_bnfuse.savedmodel import probe as probe_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.verify import tolerance as tolerance_lib
from tf_bnfuse.verify import fold_check
from tf_bnfuse.verify import fold_plan

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

RNG = np.random.default_rng(11)


class Probed(tf.Module):
    def __init__(self):
        self.w = tf.Variable(RNG.standard_normal((64, 128)).astype(np.float32))  # 32 KB: a stored weight

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
    def f(self, x):
        y = tf.matmul(x, self.w)
        return {"y": y, "y_off": y * 1.001 + 0.01,
                "positive": tf.boolean_mask(y, y > 0),  # a size only the run knows
                "none": tf.boolean_mask(y, y > 1e30),  # no element
                "log": tf.math.log(y)}  # NaN where y < 0


def test_a_probe_reads_tensors_in_full_and_compares_pairs_over_every_element():
    module = Probed()
    _, functions, _ = objects_lib.signatures_of(module)  # as a signature: keyword inputs, a dict of outputs
    frozen = freeze_lib.freeze("serving_default", functions["serving_default"], resources.resource_owners(module),
                               graph_lib.WeightStore(), set(), set())
    assert any(graph_lib.WEIGHT_KEY_ATTR in n.attr for n in frozen.graph_def.node)  # w is read from the store
    tensor = {k: frozen.outputs[k].tensor for k in frozen.outputs}
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    pairs = [(tensor["y"], tensor["y_off"]), (tensor["positive"], tensor["positive"]),
             (tensor["none"], tensor["none"]), (tensor["y"], tensor["log"]), (tensor["y"], "no_such_node:0")]
    probe = probe_lib.probe_callable(frozen, [tensor["y"], "no_such_node:0"], pairs)
    values = fold_check.run_as_written(probe, {"x": None}, {"x": x})
    expected = {k: v.numpy() for k, v in module.f(tf.constant(x)).items()}
    np.testing.assert_allclose(values["full"][tensor["y"]].numpy(), expected["y"], rtol=1e-6, atol=1e-6)
    assert set(values["full"]) == {tensor["y"]}  # a tensor of neither graph is left out, and a pair naming one
    assert set(values["compared"]) == set(pairs[:4])
    compared = {k: values["compared"][(tensor[a], tensor[b])]
                for k, (a, b) in {"off": ("y", "y_off"), "positive": ("positive", "positive"),
                                  "none": ("none", "none"), "nan": ("y", "log")}.items()}
    y, positive = expected["y"], expected["positive"]
    assert positive.size and expected["none"].size == 0 and np.isnan(expected["log"]).any()
    np.testing.assert_allclose(compared["off"], (np.max(np.abs(y - expected["y_off"])), np.max(np.abs(y))),
                               rtol=1e-5)
    assert compared["positive"] == (0.0, pytest.approx(float(np.max(positive)), rel=1e-6))
    assert compared["none"] == (-np.inf, -np.inf)  # Max over no element
    assert np.isnan(compared["nan"][0]) and np.isfinite(compared["nan"][1])
    assert np.asarray(module.w.numpy()).shape == (64, 128)  # the input's variable is read, not released


@pytest.mark.parametrize("error, scale, relative", [
    (0.5, 2.0, 0.25), (-np.inf, -np.inf, 0.0), (np.nan, 2.0, np.inf), (np.inf, 2.0, np.inf), (0.0, 0.0, 0.0),
    (1e-3, 0.0, np.inf)])
def test_the_relative_error_of_two_maxima_follows_the_output_comparison(error, scale, relative):
    """tolerance.relative_error of the probe's maxima gives what tolerance.compare gives on arrays
    with those maxima (NaN: the folded output has one where the original has none)."""
    assert tolerance_lib.relative_error(error, scale) == relative
    reference = np.array([scale, 0.0]) if np.isfinite(scale) else np.zeros(0)
    candidate = reference + np.array([error, 0.0]) if np.isfinite(scale) else reference
    assert tolerance_lib.compare(reference, candidate, {"rtol": 0.0, "atol": 0.0})[1] == relative


def test_a_fold_is_judged_by_the_probes_maxima_and_left_to_the_output_check_where_its_original_is_not_finite():
    """fold_check.check on the maxima a probe returns: over its bound fails, NaN where the
    original is finite fails, no element passes, an original with an inf is not checked."""
    point = report_lib.CheckPoint(["x"], "bn", terms=64, dtype="float32")
    folds = [report_lib.Fold("bn_%d" % i, "FusedBatchNormV3", "conv_%d" % i, "Conv2D", check=dataclasses.replace(
        point, output="bn_%d" % i)) for i in range(5)]
    plan = fold_plan.Plan(None, {"bn_%d" % i: "chain_%d/bn" % i for i in range(5)}, folds, {},
                           {("bn_%d" % i, "conv_%d" % i): "bn_%d" % i for i in range(5)})
    maxima = [(1e-6, 1.0), (1e-3, 1.0), (np.nan, 1.0), (-np.inf, -np.inf), (np.nan, np.inf)]
    values = {"compared": {("chain_%d/bn" % i, "bn_%d" % i): m for i, m in enumerate(maxima)}}
    checks, not_checked = fold_check.check("serve", plan, values, config_lib.load_config()["verify"])
    bound = 8.0 * 2.0 ** -23 * 8.0
    assert [(c.node, c.ok) for c in checks] == [("bn_0", True), ("bn_1", False), ("bn_2", False), ("bn_3", True)]
    assert all(c.bound == pytest.approx(bound) for c in checks) and checks[1].max_rel_error == pytest.approx(1e-3)
    assert list(not_checked) == ["serve: bn_4"] and "not finite" in not_checked["serve: bn_4"]


def test_a_half_precision_fold_is_judged_by_its_slope_where_rounding_noise_cannot_explain_it():
    """fold_check.check of a float16 fold from the probe's maxima and centred sums: a slope over
    its bound fails only when it stands far out of its own noise; the max rel error bound is
    float32's plus half_rounding_multiple float16 eps."""
    point = report_lib.CheckPoint(["x"], "bn", terms=64, dtype="float16")
    rng = np.random.default_rng(3)
    reference, few = rng.standard_normal(4096), rng.standard_normal(64)
    # (reference, difference): rounding-sized noise; a 1% scale error; over 64 elements, a slope
    # over its bound but within its noise (and a max rel error within its bound)
    cases = {"honest": (reference, rng.standard_normal(4096) * 1e-4),
             "scaled": (reference, 0.01 * reference + rng.standard_normal(4096) * 1e-4),
             "noisy_slope": (few, 0.001 * few + rng.standard_normal(64) * 2e-3)}
    folds, values = [], {"compared": {}}
    for name, (reference, difference) in cases.items():
        folds.append(report_lib.Fold(name, "FusedBatchNormV3", "conv_" + name, "Conv2D", check=dataclasses.replace(
            point, output=name)))
        values["compared"][("chain/" + name, name)] = (
            float(np.abs(difference).max()), float(np.abs(reference).max()), float(difference @ reference),
            float(reference @ reference), float(difference @ difference), float(reference.size))
    plan = fold_plan.Plan(None, {name: "chain/" + name for name in cases}, folds, {},
                           {(name, "conv_" + name): name for name in cases})
    checks, _ = fold_check.check("serve", plan, values, config_lib.load_config()["verify"])
    judged = {c.node: c for c in checks}
    assert judged["honest"].ok and judged["honest"].slope < judged["honest"].slope_bound
    assert not judged["scaled"].ok and judged["scaled"].slope == pytest.approx(0.01, rel=0.05)
    assert judged["scaled"].slope_significance > 100
    # A slope over its bound that its own residual noise explains is left to the max rel error bound.
    assert judged["noisy_slope"].slope > judged["noisy_slope"].slope_bound
    assert judged["noisy_slope"].slope_significance < 10 and judged["noisy_slope"].ok
    assert judged["honest"].bound == pytest.approx(8 * 2.0 ** -23 * 8 + 4 * 2.0 ** -10)
