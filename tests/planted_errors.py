"""Planting errors in chosen folds: what the verification must catch and name (issue 26).

planted(...) patches the fold passes' fold_weights in this process: each fold into a linear op
of one of the given layers gets its new kernel scaled by 1 + 1e-3, or its new bias shifted by
1e-3 of that fold's output scale (FoldCheck.scale, from an honest run's report).
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

RELATIVE_ERROR = 1e-3


def is_of_layer(node_name, layer):
    """A node path component that is the layer's name, or (Keras 3) its name with a _1 suffix."""
    return re.search(r"/%s(_\d+)?/" % re.escape(layer), "/%s/" % node_name) is not None


def _field(check, name):  # a FoldCheck, or one read back from --report_json
    return check[name] if isinstance(check, dict) else getattr(check, name)


def layers_of(fold_checks, layers):
    """{layer: the FoldChecks (or their report dicts) whose linear op is of that layer} for the given layers."""
    return {layer: [c for c in fold_checks if is_of_layer(_field(c, "linear_node"), layer)] for layer in layers}


@contextlib.contextmanager
def planted(monkeypatch, kernel_layers=(), bias_layers=(), honest_checks=()):
    """Within, the folds into kernel_layers get a kernel error and those into bias_layers a bias
    error; honest_checks (FoldChecks of an honest run) give the bias layers' output scales.
    Yields the list of layers planted in, filled as the passes run."""
    scales = {layer: max(_field(c, "scale") for c in checks)
              for layer, checks in layers_of(honest_checks, bias_layers).items() if checks}
    assert set(scales) == set(bias_layers), "no honest fold check for %s" % (set(bias_layers) - set(scales))
    real = drivers.fold_weights
    hit = []

    def fold_weights(chain):
        folded = real(chain)
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
                folded = dataclasses.replace(folded, bias=(bias + RELATIVE_ERROR * scales[layer]).astype(bias.dtype))
        return folded
    with monkeypatch.context() as patch:
        patch.setattr(drivers, "fold_weights", fold_weights)
        yield hit


def assert_caught_and_named(src, kernel_layers, bias_layers, honest_checks, out, monkeypatch):
    """Folding src with those errors planted fails, naming exactly the planted folds, and writes nothing."""
    with planted(monkeypatch, kernel_layers, bias_layers, honest_checks) as hit:
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
