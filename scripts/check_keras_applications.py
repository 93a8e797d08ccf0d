"""Folds keras.applications models and checks the result; prints a Markdown table.

    .venv/bin/python scripts/check_keras_applications.py --keras keras3 EfficientNetB0 DenseNet121
    .venv/bin/python scripts/check_keras_applications.py --keras tf_keras EfficientNetB0 DenseNet121

For each model (weights=None, random batch-norm statistics): the number of
BatchNormalization layers, how many directly follow a Conv/Dense layer (read
from the Keras layer graph, not from tf_bnfuse), how many tf_bnfuse folded,
what it left alone and why, and the max error of the folded SavedModel
against the original on random inputs, relative to the output's scale.
"""

import argparse
import collections
import os
import sys
import tempfile

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--keras", choices=["keras3", "tf_keras"], default="keras3")
parser.add_argument("--input_size", type=int, default=96)
parser.add_argument("models", nargs="+", help="keras.applications names, e.g. EfficientNetB0 DenseNet121")
args = parser.parse_args()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from keras_flavour import batch_norm_layers, import_keras, randomize_batch_norms  # noqa: E402

keras = import_keras(args.keras)  # before TensorFlow loads

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_bnfuse import fold_saved_model  # noqa: E402

LINEAR_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense,
                 keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D, keras.layers.Conv2DTranspose)


def follows_linear(bn):
    producer = bn.input._keras_history[0]
    return isinstance(producer, LINEAR_LAYERS)


def reason_kind(skip):
    """A skip reason without node names, so that equal reasons count together."""
    if "not from a supported linear op" in skip.reason:
        return "%s after %s" % (skip.op, skip.reason.split(", not from")[0].split(" ")[-1].strip("()"))
    if "consumers" in skip.reason:
        return "%s after a tensor with several consumers" % skip.op
    return "%s: %s" % (skip.op, skip.reason)


def max_relative_error(src, out, rng):
    o = tf.saved_model.load(src).signatures["serving_default"]
    f = tf.saved_model.load(out).signatures["serving_default"]
    inputs = {k: rng.standard_normal([2 if d is None else d for d in s.shape.as_list()]).astype(np.float32)
              for k, s in o.structured_input_signature[1].items()}
    expected, actual = o(**inputs), f(**inputs)
    return max(float(np.abs(actual[k].numpy() - expected[k].numpy()).max() / np.abs(expected[k].numpy()).max())
               for k in expected)


def main():
    rng = np.random.default_rng(0)
    print("| Keras | model | batch norms | after conv/dense | folded | left alone (reason) | max rel error | nodes |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        size = args.input_size
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10,
                                                  classifier_activation=None)
        bns = batch_norm_layers(keras, model)
        randomize_batch_norms(keras, model, rng)
        after_linear = sum(follows_linear(bn) for bn in bns)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
            if args.keras == "tf_keras":
                model.save(src, save_format="tf")
            else:
                model.export(src, verbose=False)
            report = fold_saved_model(src, out)
            graph = report.signatures["serving_default"]
            folded = sum(len(p.folds) for p in graph.passes if p.pass_name in ("fold_batch_norm", "fold_affine"))
            reasons = collections.Counter(
                reason_kind(s) for p in graph.passes if p.pass_name in ("fold_batch_norm", "fold_affine")
                for s in p.skips)
            left = "; ".join("%d %s" % (n, r) for r, n in sorted(reasons.items())) or "none"
            error = max_relative_error(src, out, rng)
        print("| %s | %s %dx%d | %d | %d | %d | %s | %.2g | %d -> %d |" % (
            args.keras, name, size, size, len(bns), after_linear, folded, left, error,
            graph.nodes_before, graph.nodes_after))
        sys.stdout.flush()
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
