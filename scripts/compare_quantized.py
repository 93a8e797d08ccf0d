"""int8 of the original against int8 of tf_bnfuse's output: prints docs/tflite.md's Markdown table.

    .venv/bin/python scripts/compare_quantized.py

Each case is built as compare_with_tflite.py builds it (Keras 3 model.export, tf-keras
model.save; random weights and batch-norm statistics), plus two Keras 3 applications
(weights=None). tf_bnfuse runs on it as a user would, with --tflite_quantize int8, the same
32 calibration samples (--calibration_inputs) and 16 held-out samples (--verify_inputs);
its report holds both sides: the converter quantizing the original alone, and the folded
model, each measured against the float original on the held-out samples. Relative L2
error, SNR and top-1 agreement (outputs of rank 2 only) are tf_bnfuse.verify.quantize's.
Each Keras flavour runs in a process of its own.
"""

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["Conv2D(dilation_rate=2) -> BatchNormalization", "Conv3D -> BatchNormalization",
         "MaxPooling2D -> BatchNormalization -> Conv2D(padding=\"valid\")"]
CALIBRATION, HELD_OUT = 32, 16


def applications(root):
    """{name: path} of two Keras 3 applications at a small input size, random batch-norm statistics."""
    import numpy as np
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    from keras_flavour import import_keras, randomize_batch_norms
    keras = import_keras("keras3")
    paths = {}
    for name, build in (("MobileNetV2 (96x96, 10 classes)", lambda: keras.applications.MobileNetV2(
            input_shape=(96, 96, 3), weights=None, classes=10)),
                        ("ResNet50 (64x64, 10 classes)", lambda: keras.applications.ResNet50(
                            input_shape=(64, 64, 3), weights=None, classes=10))):
        model = build()
        randomize_batch_norms(keras, model, np.random.default_rng(0))
        paths[name] = os.path.join(root, "app%d" % len(paths))
        model.export(paths[name], verbose=False)
    return paths


def samples(path, count, seed, out):
    import numpy as np
    import tensorflow as tf
    function = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(seed)
    np.savez(out, **{k: rng.standard_normal([count] + s.shape.as_list()[1:]).astype(np.float32)
                     for k, s in function.structured_input_signature[1].items()})
    return out


def run_flavour(flavour):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, HERE)
    from compare_with_tflite import build_cases
    from tf_bnfuse import fold_saved_model
    rows = []
    with tempfile.TemporaryDirectory() as root:
        cases = {k: v for k, v in build_cases(flavour, root).items() if k in CASES}
        if flavour == "keras3":
            cases.update(applications(root))
        for case, path in cases.items():
            report = fold_saved_model(
                path, path + "_folded", tflite_output=path + ".tflite", tflite_quantize="int8",
                calibration_inputs=samples(path, CALIBRATION, 1, path + "_calibration.npz"),
                verify_inputs=samples(path, HELD_OUT, 2, path + "_held_out.npz"))
            tflite = report.tflite
            rows.append({"case": case, "flavour": flavour, "folds": len(report.signatures["serving_default"].folds),
                         "before": _side(tflite.quantization.converter_alone_metrics, tflite.converter_alone_ops,
                                         tflite.converter_alone_batch_norm_ops),
                         "after": _side(tflite.quantization.metrics, tflite.ops, tflite.batch_norm_ops)})
    print("ROWS " + json.dumps(rows))


def _side(metrics, ops, bn_left):
    [metric] = [m for m in metrics if m.signature == "serving_default"]
    return {"error": metric.relative_l2_error, "snr": metric.snr_db, "top1": metric.top1_agreement,
            "ops": sum(ops.values()), "mul_add": ops.get("MUL", 0) + ops.get("ADD", 0), "bn_left": bn_left}


def _cell(side):
    top1 = "" if side["top1"] is None else ", top-1 agree %.2f" % side["top1"]
    return "%.3f (SNR %.1f dB%s); %d ops, MUL+ADD %d, BN ops left %d" % (
        side["error"], side["snr"], top1, side["ops"], side["mul_add"], side["bn_left"])


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--flavour":
        return run_flavour(sys.argv[2])
    sys.path.insert(0, HERE)
    from compare_with_tflite import rows_of_flavours
    rows = rows_of_flavours(__file__, ("keras3", "tf_keras"))
    names = {"keras3": "Keras 3", "tf_keras": "tf-keras"}
    print("| case | model | folds | int8 of the original (converter alone): rel L2 error | int8 of tf_bnfuse's "
          "output: rel L2 error |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| %s | %s | %d | %s | %s |" % (row["case"], names[row["flavour"]], row["folds"], _cell(row["before"]),
                                             _cell(row["after"])))


if __name__ == "__main__":
    main()
