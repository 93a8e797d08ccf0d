"""From a live Keras model to a checked .tflite file: tf_bnfuse.fold + tf_bnfuse.export in the
same Python process, side by side with Keras' own LiteRT export (no fold, no check) and with
model.export() plus the CLI with --tflite_output.

    .venv/bin/python benchmarks/in_memory.py [--rounds 3] [--input_size 224] [ResNet50 MobileNetV2]

Each model is built once (keras.applications, weights=None, random batch-norm statistics) in a
fresh process per model; then, alternating, each way runs `rounds` times:

- disk: model.export(dir) in the live process, then `python -m tf_bnfuse --saved_model_dir dir
  --output_dir out --tflite_output model.tflite` (a new process, as a user runs it);
- in memory: folded = tf_bnfuse.fold(model); tf_bnfuse.export(folded, model.tflite,
  format="litert") in the live process;
- Keras: model.export(model.tflite, format="litert") in the live process.

Both tf_bnfuse ways check every fold and the folded model against the original (the
SavedModel, then the .tflite); the CLI also writes the folded SavedModel; Keras checks
nothing. Prints a markdown table of medians, in memory / disk (issue 27's target: at most
0.5) and in memory / Keras (issue 36's: at most 1.0).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(name, input_size, rounds):
    """{"disk": [seconds], "in_memory": [seconds]} of one model; runs in its own process."""
    sys.path.insert(0, HERE)
    from keras_flavour import import_keras, randomize_batch_norms
    keras = import_keras("keras3")
    import numpy as np
    import tf_bnfuse

    model = getattr(keras.applications, name)(weights=None, input_shape=(input_size, input_size, 3))
    randomize_batch_norms(keras, model, np.random.default_rng(0))
    times = {"disk": [], "in_memory": [], "keras": []}
    work = tempfile.mkdtemp(prefix="tf_bnfuse_in_memory_")
    try:
        for i in range(rounds):
            exported, out = os.path.join(work, "exported_%d" % i), os.path.join(work, "folded_%d" % i)
            started = time.perf_counter()
            model.export(exported, verbose=False)
            subprocess.run([sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", exported, "--output_dir", out,
                            "--tflite_output", os.path.join(work, "disk_%d.tflite" % i)], check=True,
                           capture_output=True, cwd=ROOT)
            times["disk"].append(time.perf_counter() - started)
            started = time.perf_counter()
            folded = tf_bnfuse.fold(model)
            tf_bnfuse.export(folded, os.path.join(work, "in_memory_%d.tflite" % i), format="litert", verbose=False)
            times["in_memory"].append(time.perf_counter() - started)
            del folded
            started = time.perf_counter()
            model.export(os.path.join(work, "keras_%d.tflite" % i), format="litert", verbose=False)
            times["keras"].append(time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the per-model child process
    parser.add_argument("models", nargs="*", default=["ResNet50", "MobileNetV2"])
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.input_size, args.rounds)))
        return
    rows = ["| model (Keras 3, %dx%d) | model.export() + CLI --tflite_output | fold() + export(format=\"litert\") "
            "| Keras' model.export(format=\"litert\") | in memory / disk | in memory / Keras |"
            % (args.input_size, args.input_size), "| --- | --- | --- | --- | --- | --- |"]
    for name in args.models:
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, "--rounds", str(args.rounds),
                                 "--input_size", str(args.input_size)], check=True, capture_output=True, text=True,
                                cwd=ROOT)
        times = json.loads(result.stdout.strip().splitlines()[-1])
        disk, in_memory = statistics.median(times["disk"]), statistics.median(times["in_memory"])
        keras_alone = statistics.median(times["keras"])
        rows.append("| %s | %.1f s | %.1f s | %.1f s | %.2f | %.2f |" % (name, disk, in_memory, keras_alone,
                                                                        in_memory / disk, in_memory / keras_alone))
    print("\n".join(rows))
    print("\nmedians of %d rounds each, alternating, on %d CPUs" % (args.rounds, os.cpu_count()))


if __name__ == "__main__":
    main()
