"""Where tf_bnfuse goes beyond the TFLite converter: prints docs/tflite.md's Markdown table.

    .venv/bin/python scripts/compare_with_tflite.py

For each case, a small model is built the way a user builds it (Keras 3
model.export, tf-keras model.save, or raw ops for graph-only cases;
weights=None-style random weights and random batch-norm statistics), then:
the TFLite converter on the original SavedModel; tf_bnfuse on it with
--tflite_output (fold_saved_model(..., tflite_output=...)), which converts the
folded SavedModel (float16 compute promoted to float32 first, if any). "BN ops left" counts the MUL/ADD a batch
norm leaves next to a linear op in the .tflite model (tf_bnfuse.verify.tflite's
count, also given for the original); MUL total counts every MUL in the
.tflite model. The error is the folded .tflite model's outputs against the
original SavedModel's (not the original .tflite), relative to the output's
largest value. Each Keras flavour runs in a process of its own.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FLAVOURS = ["keras3", "tf_keras", "raw"]


def build_cases(flavour, root):
    """{case name: SavedModel path} for one flavour, built in this process."""
    import numpy as np
    rng = np.random.default_rng(0)
    paths = {}
    if flavour == "raw":
        import tensorflow as tf

        def save(name, build):
            graph = tf.Graph()
            with graph.as_default():
                x, y = build()
                with tf.compat.v1.Session(graph=graph) as session:
                    signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def(
                        {"x": x}, {"y": y})
                    builder = tf.compat.v1.saved_model.Builder(os.path.join(root, name))
                    builder.add_meta_graph_and_variables(session, ["serve"],
                                                         signature_def_map={"serving_default": signature})
                    builder.save()
            paths[name] = os.path.join(root, name)

        def bn_consts(c):
            return [tf.constant(v.astype(np.float32)) for v in (
                rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c), rng.normal(0, 0.5, c), rng.uniform(0.2, 2, c))]

        def fbn_v2():
            x = tf.compat.v1.placeholder(tf.float32, [None, 12, 12, 3])
            y = tf.nn.conv2d(x, tf.constant(rng.standard_normal((3, 3, 3, 8)).astype(np.float32)), 1, "SAME")
            g, b, m, v = bn_consts(8)
            y = tf.raw_ops.FusedBatchNormV2(x=y, scale=g, offset=b, mean=m, variance=v, is_training=False)[0]
            return x, tf.nn.relu(y)

        def matmul_reshape_bn():
            x = tf.compat.v1.placeholder(tf.float32, [None, 16])
            y = tf.matmul(x, tf.constant(rng.standard_normal((16, 8)).astype(np.float32)))
            y = tf.reshape(y, [-1, 1, 1, 8])
            g, b, m, v = bn_consts(8)
            y = tf.raw_ops.FusedBatchNormV3(x=y, scale=g, offset=b, mean=m, variance=v, is_training=False)[0]
            return x, tf.reshape(y, [-1, 8])

        def relu_fbn_v2():
            x = tf.compat.v1.placeholder(tf.float32, [None, 12, 12, 3])
            y = tf.nn.relu(tf.nn.conv2d(x, tf.constant(rng.standard_normal((3, 3, 3, 8)).astype(np.float32)), 1,
                                        "SAME"))
            g, b, m, v = bn_consts(8)
            return x, tf.raw_ops.FusedBatchNormV2(x=y, scale=g, offset=b, mean=m, variance=v, is_training=False)[0]

        save("FusedBatchNormV2 after Conv2D (raw ops)", fbn_v2)
        save("Conv2D -> Relu -> FusedBatchNormV2 (raw ops; cannot fold, rewritten as V3)", relu_fbn_v2)
        save("MatMul -> Reshape to rank 4 -> FusedBatchNormV3 -> Reshape back (raw ops)", matmul_reshape_bn)
        return paths

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    from keras_flavour import import_keras, randomize_batch_norms
    keras = import_keras(flavour)
    L = keras.layers
    models = {
        "Conv3D -> BatchNormalization": lambda: [keras.Input((6, 8, 8, 3)), L.Conv3D(8, 3, padding="same"),
                                                 L.BatchNormalization()],
        "Conv2D(dilation_rate=2) -> BatchNormalization": lambda: [
            keras.Input((16, 16, 3)), L.Conv2D(8, 3, dilation_rate=2, padding="same"), L.BatchNormalization()],
        "Dense on a rank-3 input -> BatchNormalization": lambda: [
            keras.Input((6, 16)), L.Dense(8), L.BatchNormalization()],
        "MaxPooling2D -> BatchNormalization -> Conv2D(padding=\"valid\")": lambda: [
            keras.Input((16, 16, 3)), L.MaxPooling2D(), L.BatchNormalization(), L.Conv2D(8, 3)],
    }
    if flavour == "keras3":
        models["Conv2D -> BatchNormalization under mixed_float16"] = "mixed"
    for name, layers in models.items():
        if layers == "mixed":
            keras.mixed_precision.set_global_policy("mixed_float16")
            model = keras.Sequential([keras.Input((16, 16, 3)), L.Conv2D(8, 3, padding="same"),
                                      L.BatchNormalization(), L.ReLU()])
            keras.mixed_precision.set_global_policy("float32")
        else:
            model = keras.Sequential(layers())
        randomize_batch_norms(keras, model, rng)
        path = os.path.join(root, "%d" % len(paths))
        if flavour == "tf_keras":
            model.save(path, save_format="tf")
        else:
            model.export(path, verbose=False)
        paths[name] = path
    return paths


def max_rel_error(content, saved_model):
    import numpy as np
    import tensorflow as tf
    function = tf.saved_model.load(saved_model).signatures["serving_default"]
    runner = tf.lite.Interpreter(model_content=content).get_signature_runner("serving_default")
    rng = np.random.default_rng(1)
    inputs = {k: rng.standard_normal([2 if d is None else d for d in s.shape.as_list()]).astype(np.float32)
              for k, s in function.structured_input_signature[1].items()}
    expected = function(**inputs)
    actual = runner(**inputs)
    return max(float(np.abs(actual[k] - expected[k].numpy()).max() / np.abs(expected[k].numpy()).max())
               for k in expected)


def run_flavour(flavour):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tf_bnfuse import errors
    from tf_bnfuse import fold_saved_model
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for case, path in build_cases(flavour, root).items():
            row = {"case": case, "flavour": flavour}
            tflite_path = path + ".tflite"
            try:  # what a user gets from --tflite_output
                report = fold_saved_model(path, path + "_folded", tflite_output=tflite_path)
            except errors.BnFuseError as e:
                row["fold_error"] = str(e)
                rows.append(row)
                continue
            graph, tflite = report.signatures["serving_default"], report.tflite
            row.update(folded=len(graph.folds), left=len(graph.left_alone), lowered=len(graph.lowered), before_ops=tflite.converter_alone_ops,
                       before_bn_left=tflite.converter_alone_batch_norm_ops, converter_alone_error=tflite.converter_alone_error,
                       after_ops=tflite.ops, after_bn_left=tflite.batch_norm_ops,
                       promoted=tflite.promoted_float16)
            with open(tflite_path, "rb") as f:
                row["error"] = max_rel_error(f.read(), path)
            rows.append(row)
    print("ROWS " + json.dumps(rows))


def describe(ops, bn_left, error):
    if ops is None:
        return "conversion fails: %s" % error
    listed = ", ".join("%s %d" % kv for kv in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return "%s (BN ops left: %d)" % (listed, bn_left)


def rows_of_flavours(script, flavours):
    """The rows `script --flavour F` prints ("ROWS [...]"), each flavour in a process of its own."""
    rows = []
    for flavour in flavours:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        if flavour == "tf_keras":
            env["TF_USE_LEGACY_KERAS"] = "1"
        result = subprocess.run([sys.executable, os.path.abspath(script), "--flavour", flavour],
                                capture_output=True, text=True, env=env)
        lines = [line for line in result.stdout.splitlines() if line.startswith("ROWS ")]
        if result.returncode != 0 or not lines:
            sys.exit("%s failed:\n%s" % (flavour, result.stderr[-3000:]))
        rows += json.loads(lines[-1][5:])
    return rows


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--flavour":
        return run_flavour(sys.argv[2])
    rows = rows_of_flavours(__file__, FLAVOURS)
    names = {"keras3": "Keras 3", "tf_keras": "tf-keras", "raw": "raw ops"}
    print("| case | model | TFLite converter on the original | tf_bnfuse | TFLite converter on the folded model "
          "| .tflite vs original, max rel error |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        folded = ("fails: %s" % row["fold_error"]) if "fold_error" in row else "%d folded, %d left alone" % (
            row["folded"], row["left"])
        if row.get("lowered"):
            folded += " (%d rewritten as FusedBatchNormV3)" % row["lowered"]
        after = describe(row.get("after_ops"), row.get("after_bn_left"), None) if "fold_error" not in row else "-"
        if row.get("promoted"):
            after += ", float16 compute promoted to float32"
        print("| %s | %s | %s | %s | %s | %s |" % (
            row["case"], names[row["flavour"]], describe(row["before_ops"], row["before_bn_left"],
                                                         row["converter_alone_error"]),
            folded, after, "%.1e" % row["error"] if "error" in row else "-"))


if __name__ == "__main__":
    main()
