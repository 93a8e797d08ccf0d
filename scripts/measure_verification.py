"""The numbers behind docs/verification.md's bounds, measured on Keras 3 zoo models.

    .venv/bin/python scripts/measure_verification.py [TRIALS]

1. Every fold checked by itself, honest: for ResNet50, MobileNetV2 (1000-class softmax),
   EfficientNetB0 and EfficientNetV2B0 (tests/model_zoo.py, random batch-norm statistics), how
   many folds were checked and the worst one's error as a share of its bound.
2. The models' own spread: EfficientNetV2B0 built with TRIALS seeds (default 8), each folded;
   per output, the error against the original, the models' own spread (the original against itself in
   float64 and as written in float32, the folded output against itself as written) and their ratio.
Planted errors are the tests' (tests/verify/test_fold_check.py), not measured here.
"""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import keras  # noqa: E402
import model_zoo  # noqa: E402
from tf_bnfuse import errors, fold_saved_model  # noqa: E402


def _fold(name, seed, scratch):
    src, _ = model_zoo.build(keras, name, os.path.join(scratch, "%s_%d" % (name, seed)), seed=seed)
    # A spread_multiple this large accepts every honest output, so that each ratio is measured.
    config = {"pipeline": ["constant_folding", "simplify_arithmetic", "fold_in_functions", "fold_batch_norm",
                           "fold_affine", "fold_forward", "lower_batch_norm", "prune_identities", "cleanup"],
              "verify": {"spread_multiple": 1e9}}
    try:
        return fold_saved_model(src, os.path.join(scratch, "%s_%d_out" % (name, seed)), config=config,
                                overwrite=True).verification
    except errors.VerificationError as e:
        return e.run_report.verification


def main(trials):
    with tempfile.TemporaryDirectory() as scratch:
        print("| model | folds checked | not checked | worst fold error / its bound |")
        print("|---|---|---|---|")
        for name in ("resnet50_small", "mobilenet_v2_softmax", "efficientnet_b0", "efficientnet_v2_b0"):
            folds = _fold(name, 0, scratch).folds
            worst = folds.worst
            print("| %s | %d | %d | %.3f |" % (name, len(folds.checks), len(folds.not_checked),
                                              worst.max_rel_error / worst.bound))
        print()
        print("| seed | output | max rel error | the models' own spread | ratio |")
        print("|---|---|---|---|---|")
        ratios = []
        for seed in range(trials):
            for check in _fold("efficientnet_v2_b0", seed, scratch).checks:
                if check.own_spread:
                    ratios.append(check.max_rel_error / check.own_spread)
                print("| %d | %s/%s | %.3g | %s | %s |" % (
                    seed, check.signature, check.output, check.max_rel_error,
                    "-" if check.own_spread is None else "%.3g" % check.own_spread,
                    "-" if check.own_spread is None else "%.2f" % ratios[-1]))
        print("\nlargest ratio: %.2f of %d" % (max(ratios), len(ratios)))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
