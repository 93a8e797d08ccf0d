"""Loads SavedModels in this (fresh) process and calls their signatures in order.

    python run_signatures.py CALLS.pkl RESULTS.pkl

CALLS.pkl: a list of (SavedModel path, tags or None, signature key, {input: array}).
A key "root.NAME" calls the root object's function NAME instead, with the
arrays as positional arguments in key order; its outputs are numbered in
their flattened order. A path ending in .tflite is run on the LiteRT runtime (the key
"ops" gives {"ops": op names, "inputs"/"outputs": dtypes}). Calls run in list order, so a stateful signature sees
the calls before it. RESULTS.pkl: one {output: array} per call. Used by the tests to judge a
written model from outside the process that wrote it.
"""

import os
import pickle
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


GRAPPLER_OFF_ENV = "TF_BNFUSE_TEST_GRAPPLER_OFF"  # set: run every call as its graph is written


def _run_tflite(path, key, inputs):
    import numpy as np
    from ai_edge_litert import interpreter as litert
    interpreter = litert.Interpreter(model_path=path)
    if key == "ops":
        interpreter.allocate_tensors()
        ops = [op["op_name"] for op in interpreter._get_ops_details()]  # no public op list
        return {"ops": np.array(ops), "inputs": np.array([d["dtype"].__name__ for d in interpreter.get_input_details()]),
                "outputs": np.array([d["dtype"].__name__ for d in interpreter.get_output_details()])}
    signatures = interpreter.get_signature_list()
    runner = interpreter.get_signature_runner(key if key in signatures else next(iter(signatures)))
    return runner(**inputs)


def main(calls_path, results_path):
    if os.environ.get(GRAPPLER_OFF_ENV):
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    with open(calls_path, "rb") as f:
        calls = pickle.load(f)
    loaded, results = {}, []
    for path, tags, key, inputs in calls:
        if path.endswith(".tflite"):
            results.append(_run_tflite(path, key, inputs))
            continue
        if path not in loaded:
            loaded[path] = tf.saved_model.load(path, tags=tags)
        if key.startswith("root."):
            args = [tf.constant(inputs[k]) for k in sorted(inputs)]
            flat = tf.nest.flatten(getattr(loaded[path], key[len("root."):])(*args))
            results.append({str(i): v.numpy() for i, v in enumerate(flat)})
        else:
            outputs = loaded[path].signatures[key](**{k: tf.constant(v) for k, v in inputs.items()})
            results.append({k: v.numpy() for k, v in outputs.items()})
    with open(results_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
