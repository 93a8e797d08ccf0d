"""The numbers behind the half-precision fold bounds in docs/verification.md.

    .venv/bin/python scripts/measure_half_precision.py

1. How TensorFlow's CPU kernels sum float16 and bfloat16 products: a Conv2D and a MatMul of
   half-precision inputs against the same computed in float64, at 36 to 18,432 terms. An error
   that stays near half an eps whatever the terms says the products are summed in float32 and
   only the output is rounded.
2. Honest folds of Keras 3 models under mixed_float16 and mixed_bfloat16 (tests/model_zoo.py,
   random batch-norm statistics): per model, the worst fold's max rel error and |slope|, in eps
   of the half type, the largest slope significance (|slope| / its standard error), and the
   worst fold's share of its bounds (FoldCheck.excess: a slope counts where it is significant).
Planted errors are the tests' (tests/verify/test_fold_check_everywhere.py), not measured here.
"""

import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import keras  # noqa: E402
import model_zoo  # noqa: E402
import tensorflow as tf  # noqa: E402
from tf_bnfuse import fold_saved_model  # noqa: E402

EPSILON = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def accumulation():
    rng = np.random.default_rng(0)
    print("| dtype | terms | Conv2D max error / max output, in eps | MatMul, in eps |")
    print("|---|---|---|---|")
    for dtype in (tf.float16, tf.bfloat16):
        for channels in (4, 64, 512, 2048):
            terms = 9 * channels
            x = tf.cast(rng.standard_normal((1, 6, 6, channels)), dtype)
            w = tf.cast(rng.standard_normal((3, 3, channels, 8)) / np.sqrt(terms), dtype)
            a = tf.cast(rng.standard_normal((16, terms)), dtype)
            b = tf.cast(rng.standard_normal((terms, 8)) / np.sqrt(terms), dtype)
            found = []
            for op, inputs in ((lambda p, q: tf.nn.conv2d(p, q, 1, "SAME"), (x, w)), (tf.matmul, (a, b))):
                exact = op(*[tf.cast(t, tf.float64) for t in inputs]).numpy()
                rounded = tf.cast(op(*inputs), tf.float64).numpy()
                found.append(np.abs(rounded - exact).max() / np.abs(exact).max() / EPSILON[dtype.name])
            print("| %s | %d | %.2f | %.2f |" % (dtype.name, terms, *found))


def honest_folds():
    print("| model | folds checked | worst max rel error, in eps | worst slope, in eps | most significant slope, "
          "in standard errors | worst share of its bounds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for builder in model_zoo.HALF_PRECISION:
            src, _ = model_zoo.build(keras, builder.__name__, scratch)
            report = fold_saved_model(src, os.path.join(scratch, builder.__name__ + "_out"))
            checks = report.verification.folds.checks
            epsilon = EPSILON["bfloat16" if "bfloat16" in builder.__name__ else "float16"]
            print("| %s | %d of %d | %.2f | %.3f | %.1f | %.2f |" % (
                builder.__name__, len(checks), report.verification.folds.total,
                max(c.max_rel_error for c in checks) / epsilon, max(c.slope for c in checks) / epsilon,
                max(c.slope_significance for c in checks), max(c.excess for c in checks)))


if __name__ == "__main__":
    accumulation()
    print()
    honest_folds()
