"""Folds a live zoo model in memory and writes what a user would write from it, for either Keras
flavour (tf-keras runs this file in a subprocess: it cannot share a process with Keras 3):

    python tests/live_models.py tf_keras NAME OUT_DIR [positional_calls]

fold_and_write returns (and the script pickles to OUT_DIR/facts.pkl) the facts the tests judge:
the model's own outputs on seeded inputs (before the fold), the folded object's, whether every
weight of the model is unchanged afterwards (array by array), whether it then trained one step,
whether the folded object's outputs stayed as they were through that step, and the paths of a
SavedModel written with tf.saved_model.save and a .tflite written with
TFLiteConverter.from_concrete_functions from the folded object. The tests load those files in
another fresh process.
"""

import os
import pickle
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import model_zoo  # noqa: E402


def _input_specs(function):
    """{name: TensorSpec} of a signature function (keyword inputs, or named positional ones)."""
    args, kwargs = function.structured_input_signature
    return dict(kwargs) if kwargs else {spec.name: spec for spec in args}


def fold_and_write(keras, name, out_dir):
    import numpy as np
    import tensorflow as tf
    import tf_bnfuse

    model, batch_norms = model_zoo.build_model(keras, name)
    weights_before = [np.array(w) for w in model.get_weights()]
    folded = tf_bnfuse.fold(model)
    specs = _input_specs(folded.signatures["serving_default"])
    [(input_name, spec)] = specs.items()
    rng = np.random.default_rng(7)
    x = rng.standard_normal([3] + spec.shape.as_list()[1:]).astype(np.float32)
    expected = np.asarray(model(x, training=False))
    in_memory = np.asarray(folded(x))
    saved_model, tflite = os.path.join(out_dir, "saved_model"), os.path.join(out_dir, "model.tflite")
    tf.saved_model.save(folded, saved_model, signatures=folded.signatures)
    with open(tflite, "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_concrete_functions(list(folded.signatures.values()), folded).convert())
    unchanged = all(np.array_equal(a, np.array(b)) for a, b in zip(weights_before, model.get_weights()))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.train_on_batch(x, expected + 1.0)
    trained = any(not np.array_equal(a, np.array(b)) for a, b in zip(weights_before, model.get_weights()))
    after_training = np.asarray(folded(x))
    folds = sum(len(p.folds) for p in folded.report.signatures["serving_default"].passes)
    return dict(batch_norms=batch_norms, folds=folds, signatures=sorted(folded.signatures), input_name=input_name,
                x=x, expected=expected, in_memory=in_memory, after_training=after_training,
                weights_unchanged=unchanged, trained=trained, saved_model=saved_model, tflite=tflite,
                verified=folded.report.verification.ok)


def positional_calls(keras, name, out_dir=None):
    """{how the folded object was called: max |folded - model|} of a multi-input zoo model, called
    as the Keras model is: by position, with a list, and with a dict by input name."""
    import numpy as np
    import tf_bnfuse

    model, _ = model_zoo.build_model(keras, name)
    folded = tf_bnfuse.fold(model)
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal([2] + list(t.shape[1:])).astype(np.float32) for t in model.inputs]
    expected = np.asarray(model(inputs, training=False))
    by_name = dict(zip([t.name.split(":")[0] for t in model.inputs], inputs))
    calls = {"positional": folded(*inputs), "list": folded(inputs), "dict": folded(by_name)}
    return {how: float(np.max(np.abs(np.asarray(value) - expected))) for how, value in calls.items()}


def _summary(report):
    """(folds, {batch norm or chain left alone: reason}, verified) of each signature of a RunReport or
    its to_dict(), keyed by signature: what the three ways of folding one model must agree on."""
    report = report if isinstance(report, dict) else report.to_dict()
    summary = {}
    for key, graph in report["signatures"].items():
        if graph.get("same_as"):
            summary[key] = "same as %s" % graph["same_as"]
            continue
        folds = sum(len(p["folds"]) for p in graph["passes"])
        # a scope's last part: the layer's name, which each way of tracing puts under other scopes
        left = {entry["name"].split("/")[-1]: entry["reason"] for entry in graph["left_alone"]}
        summary[key] = (folds, left)
    return summary, report["verification"]["ok"]


def three_ways(keras, names, out_dir):
    """{name: {way: _summary}} of zoo models (NAME,NAME,...) folded three ways: live (fold(model)),
    from the SavedModel the flavour writes, loaded in this process (fold(tf.saved_model.load(path))),
    and by the CLI on that SavedModel."""
    result = {}
    for name in names.split(","):
        os.makedirs(os.path.join(out_dir, name))
        result[name] = _three_ways(keras, name, os.path.join(out_dir, name))
    return result


def _three_ways(keras, name, out_dir):
    import json
    import subprocess
    import tensorflow as tf
    import tf_bnfuse

    model, _ = model_zoo.build_model(keras, name)
    live = tf_bnfuse.fold(model)
    path, _ = model_zoo.build(keras, name, out_dir)
    loaded = tf_bnfuse.fold(tf.saved_model.load(path))
    report_json = os.path.join(out_dir, "report.json")
    result = subprocess.run([sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", path, "--output_dir",
                             os.path.join(out_dir, "cli"), "--report_json", report_json],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    with open(report_json) as f:
        cli = json.load(f)
    return {"live": _summary(live.report), "loaded": _summary(loaded.report), "cli": _summary(cli)}


def main(flavour, name, out_dir, what="fold_and_write"):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    import keras_flavour
    keras = keras_flavour.import_keras(flavour)
    run = {"fold_and_write": fold_and_write, "positional_calls": positional_calls, "three_ways": three_ways}[what]
    facts = run(keras, name, out_dir)
    with open(os.path.join(out_dir, "facts.pkl"), "wb") as f:
        pickle.dump(facts, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
