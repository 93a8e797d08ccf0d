"""Big models for the benchmark (issues 17, 36): cost against the weights, beside the floor.

    scripts/benchmark.sh --big                      # 1 and 2.9 GB of weights
    scripts/benchmark.sh --big --big_sizes_gb 6 --big_without_converter   # by hand (the converter: 31 GB)

Each model is a tf.Module saved with tf.saved_model.save: five 3x3 convolutions of C -> C
channels, each followed by FusedBatchNormV3 and ReLU, C chosen for the size asked (3 GB:
C = 4096), on a 1x8x8xC input, random batch-norm statistics. For each size, each in a fresh
process and measured side by side: the floor for SavedModel in, SavedModel out (a plain
tf.saved_model.load + tf.saved_model.save), the TFLite converter, and the tf_bnfuse CLI
(verification included, every fold checked by itself), with tf_bnfuse's phases and its fold
checks from --report_json; the round trip and tf_bnfuse in turn `--big_rounds` times, each
side's median. Targets (issue 36): wall at most 1.5 and peak RSS at most 1.2 times
the round trip's.
"""

import json
import math
import os
import shutil
import sys

LAYERS = 5
BUILD = """
import sys, numpy as np, tensorflow as tf
path, channels, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)

class Big(tf.Module):
    def __init__(self):
        self.kernels, self.stats = [], []
        for _ in range(layers):
            kernel = rng.standard_normal((3, 3, channels, channels), dtype=np.float32)
            kernel /= np.float32(np.sqrt(9 * channels))
            self.kernels.append(tf.Variable(kernel))
            del kernel
            self.stats.append([tf.Variable(v.astype(np.float32)) for v in (
                rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels), rng.normal(0, 0.5, channels),
                rng.uniform(0.2, 2.0, channels))])

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, channels], tf.float32, name="x")])
    def serve(self, x):
        for kernel, (gamma, beta, mean, variance) in zip(self.kernels, self.stats):
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
            x = tf.nn.relu(tf.raw_ops.FusedBatchNormV3(x=y, scale=gamma, offset=beta, mean=mean, variance=variance,
                                                       epsilon=1e-3, is_training=False)[0])
        return {"y": x}

module = Big()
tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
"""
ROUND_TRIP = """
import sys, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
tf.saved_model.save(loaded, sys.argv[2], signatures={k: f for k, f in loaded.signatures.items()})
"""


def read_into_page_cache(path):
    """Reads every file of the model once, so that each run starts from the same page cache: the
    converter's 15 GB can push the checkpoint out, and the next run would pay the disk. Then
    waits for what earlier runs wrote to reach the disk: a run that writes gigabytes while the
    previous run's are still being flushed is slowed by the kernel's writeback, not by itself."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass
    os.sync()


def channels_for(size_gb):
    """The channel count whose five 3x3 C -> C kernels hold size_gb of float32 weights."""
    return int(round(math.sqrt(size_gb * (1 << 30) / (LAYERS * 9 * 4))))


def bench_big(size_gb, work_dir, measured_run_rss, tflite_convert=None, rounds=1):
    """One row: the round trip and tf_bnfuse `rounds` times each, in turn (the round trip's own
    wall varies by half from one run to the next on a shared machine: its save waits for the
    disk), each side's median wall and peak RSS, and the converter once."""
    channels = channels_for(size_gb)
    path = os.path.join(work_dir, "big_%gGB" % size_gb)
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        measured_run_rss([sys.executable, "-c", BUILD, path + ".partial", str(channels),
                          str(LAYERS)])
        os.replace(path + ".partial", path)
    out = os.path.join(work_dir, "big_out")
    runs = {"round_trip": [], "tflite_converter": [], "tf_bnfuse": []}
    order = [("round_trip", [sys.executable, "-c", ROUND_TRIP, path, out]),
             ("tflite_converter", [sys.executable, "-c", tflite_convert, path, out + ".tflite"]),
             ("tf_bnfuse", [sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", path, "--output_dir", out,
                            "--overwrite", "--report_json", out + ".json"])]
    for round_ in range(rounds):
        for name, argv in order:
            if name == "tflite_converter" and (tflite_convert is None or round_ > 0):
                continue
            read_into_page_cache(path)
            wall, rss, _ = measured_run_rss(argv)
            runs[name].append({"wall_s": wall, "peak_rss_mb": rss})
            if name == "tf_bnfuse":
                with open(out + ".json") as f:
                    report = json.load(f)
                runs[name][-1]["phases"] = {p["name"].split(" ")[0]: (p["seconds"], p["peak_rss_mb"])
                                            for p in report["phases"]}
                folds = report["verification"]["folds"]
                runs[name][-1]["folds_checked"] = "%d of %d" % (folds["checked"], folds["total"])
            shutil.rmtree(out, ignore_errors=True)
            if os.path.exists(out + ".tflite"):
                os.remove(out + ".tflite")
    row = {"size_gb": size_gb, "channels": channels, "rounds": rounds}
    for name, measured in runs.items():
        if measured:
            row[name] = _median_run(measured)
    row["wall_ratios"] = [ours["wall_s"] / floor["wall_s"] for floor, ours in zip(runs["round_trip"],
                                                                                  runs["tf_bnfuse"])]
    return row


def _median_run(measured):
    """The run of median wall time (its phases with it), its peak RSS the median of the runs', and
    every run's figures."""
    by_wall = sorted(measured, key=lambda run: run["wall_s"])
    median = dict(by_wall[(len(by_wall) - 1) // 2])
    median["peak_rss_mb"] = sorted(run["peak_rss_mb"] for run in measured)[(len(measured) - 1) // 2]
    median["runs"] = [{k: run[k] for k in ("wall_s", "peak_rss_mb")} for run in measured]
    return median


def markdown(rows):
    lines = ["| weights | round trip (load + save) | TFLite converter | tf_bnfuse | tf_bnfuse / round trip "
             "(wall, RSS; each round's wall) | tf_bnfuse / converter (wall, RSS) | folds checked by themselves "
             "| tf_bnfuse phases: s (peak GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor, conv, ours = r["round_trip"], r.get("tflite_converter"), r["tf_bnfuse"]
        phases = ", ".join("%s %.1f (%.1f)" % (k, s, peak / 1024) for k, (s, peak) in ours["phases"].items())
        converter, against_converter = "not run", "-"
        if conv is not None:
            converter = "%.1f s, %.2f GB" % (conv["wall_s"], conv["peak_rss_mb"] / 1024)
            against_converter = "%.2f, %.2f" % (ours["wall_s"] / conv["wall_s"], ours["peak_rss_mb"] / conv["peak_rss_mb"])
        rounds = "; " + ", ".join("%.2f" % w for w in r["wall_ratios"]) if len(r.get("wall_ratios", [])) > 1 else ""
        lines.append("| %g GB (C=%d) | %s | %s | %s | %.2f, %.2f%s | %s | %s | %s |" % (
            r["size_gb"], r["channels"], _figures(floor), converter, _figures(ours),
            ours["wall_s"] / floor["wall_s"], ours["peak_rss_mb"] / floor["peak_rss_mb"], rounds,
            against_converter, ours.get("folds_checked", "?"), phases))
    return "\n".join(lines)


def _figures(side):
    text = "%.1f s, %.2f GB" % (side["wall_s"], side["peak_rss_mb"] / 1024)
    if len(side.get("runs", [])) > 1:
        text += " (median of %s s)" % ", ".join("%.1f" % run["wall_s"] for run in side["runs"])
    return text
