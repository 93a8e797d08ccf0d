"""Planting errors in chosen folds: what the verification must catch and name (issue 26).

planted(...) patches the fold passes' fold_weights in this process: each fold into a linear op
of one of the given layers gets its new kernel scaled by 1 + 1e-3, or its new bias shifted by
1e-3 of that fold's output scale.
"""

import contextlib
import dataclasses
import os
import re

import numpy as np
import pytest

from tf_bnfuse import errors
from tf_bnfuse import fold_saved_model

from tf_bnfuse.passes import drivers
from tf_bnfuse.passes import grammar
from tf_bnfuse.passes import linear_ops
from tf_bnfuse.phases import prepare
from tf_bnfuse.savedmodel import probe as probe_lib
from tf_bnfuse.verify import fold_check

RELATIVE_ERROR = 1e-3


def is_of_layer(node_name, layer):
    """A node path component that is the layer's name, or (Keras 3) its name with a _1 suffix."""
    return re.search(r"/%s(_\d+)?/" % re.escape(layer), "/%s/" % node_name) is not None


def _results(frozen, test_inputs):
    """The original's value of every tensor a fold's result may be (a step's, a linear op's, a
    BiasAdd's), read by a probe of its frozen graph before the passes."""
    ops = set(grammar.STEPS) | set(linear_ops.LINEAR_OPS) | {"BiasAdd"}
    specs = test_inputs.input_specs[frozen.key]
    inputs = fold_check.probe_inputs(specs, test_inputs.arrays[frozen.key])
    probe = probe_lib.probe_callable(frozen, [n.name for n in frozen.graph_def.node if n.op in ops])
    return fold_check.run_as_written(probe, specs, inputs)


@contextlib.contextmanager
def planted(monkeypatch, kernel_layers=(), bias_layers=()):
    """Within, the folds into kernel_layers get a kernel error and those into bias_layers a bias
    error of 1e-3 of the fold's output scale: max |original| at its result, read by a probe of
    the original's frozen graph before the passes (_results).
    Yields the list of layers planted in, filled as the passes run."""
    real_fold_weights, real_run_original = drivers.fold_weights, prepare.run_original
    kept, hit = [], []

    def run_original(loaded, graphs, signatures, roots, test_inputs, progress):
        kept.extend(_results(frozen, test_inputs) for frozen in graphs.values())
        return real_run_original(loaded, graphs, signatures, roots, test_inputs, progress)

    def output_scale(chain):
        output = chain.check_point().output
        values = [points["full"][output].numpy() for points in kept if output in points["full"]]
        assert values, "no value of %s was kept" % output
        return float(np.max(np.abs(values[0])))

    def fold_weights(chain, *new_array):
        folded = real_fold_weights(chain, *new_array)
        if isinstance(folded, list):  # a fold across a ConcatV2: not planted in
            return folded
        name = chain.match.linear.name
        for layer in kernel_layers:
            if is_of_layer(name, layer):
                assert folded.kernel is not None, "a shift-only fold has no new kernel to plant in"
                hit.append(layer)
                folded = dataclasses.replace(folded, kernel=(folded.kernel * (1 + RELATIVE_ERROR)).astype(
                    folded.kernel.dtype))
        for layer in bias_layers:
            if is_of_layer(name, layer):
                hit.append(layer)
                bias = np.asarray(folded.bias)
                folded = dataclasses.replace(folded, bias=(bias + RELATIVE_ERROR * output_scale(chain)).astype(
                    bias.dtype))
        return folded
    with monkeypatch.context() as patch:
        patch.setattr(drivers, "fold_weights", fold_weights)
        patch.setattr(prepare, "run_original", run_original)
        yield hit


@contextlib.contextmanager
def kernel_scaled(monkeypatch, linear_name_end, factor):
    """Within, the fold into the linear op whose name ends with linear_name_end (a body's folds:
    "while/Conv2D") gets its new kernel scaled by `factor`. Yields the linear ops planted in."""
    real_fold_weights, hit = drivers.fold_weights, []

    def fold_weights(chain, *new_array):
        folded = real_fold_weights(chain, *new_array)
        if not isinstance(folded, list) and chain.match.linear.name.endswith(linear_name_end):
            hit.append(chain.match.linear.name)
            folded = dataclasses.replace(folded, kernel=(folded.kernel * factor).astype(folded.kernel.dtype))
        return folded
    with monkeypatch.context() as patch:
        patch.setattr(drivers, "fold_weights", fold_weights)
        yield hit


def assert_caught_and_named(src, kernel_layers, bias_layers, out, monkeypatch):
    """Folding src with those errors planted fails, naming exactly the planted folds, and writes
    nothing; every other fold was checked and passed. Returns the FoldChecks."""
    with planted(monkeypatch, kernel_layers, bias_layers) as hit:
        with pytest.raises(errors.VerificationError, match="fails its own check") as raised:
            fold_saved_model(src, out)
    planted_layers = set(kernel_layers) | set(bias_layers)
    assert set(hit) == planted_layers
    failed = raised.value.run_report.verification.folds.failures()
    named = {layer for c in failed for layer in planted_layers if is_of_layer(c.linear_node, layer)}
    assert named == planted_layers and all(any(is_of_layer(c.linear_node, layer) for layer in planted_layers)
                                           for c in failed), [c.linear_node for c in failed]
    assert all(c.max_rel_error > 10 * c.bound for c in failed)
    message = str(raised.value)
    assert failed[0].node in message and failed[0].linear_node in message
    assert not os.path.exists(out)
    checks = raised.value.run_report.verification.folds
    folds = [f for g in raised.value.run_report.signatures.values() if not g.same_as for f in g.folds]
    assert checks.not_checked == {} and len(checks.checks) == len(folds)
    return checks
