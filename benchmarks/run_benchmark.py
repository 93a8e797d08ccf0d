"""The tf_bnfuse benchmark: conversion time and memory against the TFLite converter, inference
latency before and after folding, and pass time on synthetic graphs up to 100k nodes.

    scripts/benchmark.sh                 # everything, as in docs/performance.md (about 10 minutes)
    scripts/benchmark.sh --quick         # one small model, graphs up to 10k nodes

Each conversion runs in a fresh process, so its wall time includes importing
TensorFlow and its peak RSS (from wait4) is the whole process's, for
tf_bnfuse (the CLI, verification on CPU included), a plain tf.saved_model.load +
tf.saved_model.save of the same model (the round trip, the floor for SavedModel in,
SavedModel out) and the TFLite converter alike, side by side, each after reading the
model's files once (the same page cache for all three). Phases come from the CLI's --report_json. Figures go to
build/bench/results.json and, when matplotlib is installed, a PNG plot.
Models are built once into build/bench/models (weights=None, random batch
norm statistics) and reused.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import big_models  # noqa: E402  (benchmarks/ is not a package)

MODELS = ["ResNet50", "MobileNetV2", "EfficientNetB0"]
FLAVOURS = ["keras3", "tf_keras"]
GRAPH_SIZES = [1000, 3000, 10000, 30000, 100000]
TFLITE_CONVERT = """
import sys, tensorflow as tf
open(sys.argv[2], "wb").write(tf.lite.TFLiteConverter.from_saved_model(sys.argv[1]).convert())
"""


def measured_run_rss(argv, env=None, cwd=ROOT):
    """(wall seconds, peak RSS MB, stdout) of a child process, its rusage read with os.wait4."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (" ".join(argv[:4]), process.returncode, stderr[-2000:]))
    return wall, usage.ru_maxrss / 1024, stdout


def build_models(models_dir, flavours, models, input_size):
    for flavour in flavours:
        missing = [m for m in models if not os.path.isfile(os.path.join(models_dir, "%s_%s" % (flavour, m),
                                                                          "saved_model.pb"))]
        if missing:
            subprocess.run([sys.executable, os.path.join(HERE, "build_models.py"), "--keras", flavour,
                            "--out", models_dir, "--input_size", str(input_size)] + missing, check=True, cwd=ROOT)


def bench_model(path, work_dir, rounds, config=None):
    name = os.path.basename(path)
    folded = os.path.join(work_dir, name + "_folded")
    report_json = os.path.join(work_dir, name + "_report.json")
    round_trip = os.path.join(work_dir, name + "_round_trip")
    big_models.read_into_page_cache(path)
    round_trip_wall, round_trip_rss, _ = measured_run_rss([sys.executable, "-c", big_models.ROUND_TRIP, path,
                                                           round_trip])
    shutil.rmtree(round_trip)
    big_models.read_into_page_cache(path)
    wall, rss, _ = measured_run_rss([sys.executable, "-m", "tf_bnfuse", "--saved_model_dir", path,
                                     "--output_dir", folded, "--overwrite", "--report_json", report_json]
                                    + (["--config", config] if config else []))
    with open(report_json) as f:
        report = json.load(f)
    phases = {}
    for record in report["phases"]:
        kind = record["name"].split(" ")[0]  # "freeze serving_default" -> "freeze"
        phases[kind] = phases.get(kind, 0.0) + record["seconds"]
    phases["startup"] = wall - sum(phases.values())  # Python, TensorFlow import, flags
    graphs = [g for g in report["signatures"].values() if not g.get("same_as")]
    serving = report["signatures"]["serving_default"]
    big_models.read_into_page_cache(path)
    tflite_wall, tflite_rss, _ = measured_run_rss([sys.executable, "-c", TFLITE_CONVERT, path,
                                                   os.path.join(work_dir, name + ".tflite")])
    _, _, latency_json = measured_run_rss([sys.executable, os.path.join(HERE, "latency.py"), path, folded,
                                    "--rounds", str(rounds)])
    passes_s = phases.get("passes", 0.0)
    return {
        "model": name,
        "tf_bnfuse": {"wall_s": wall, "peak_rss_mb": rss, "phases_s": phases,
                      "passes_share": passes_s / wall},
        "round_trip": {"wall_s": round_trip_wall, "peak_rss_mb": round_trip_rss},
        "tflite_converter": {"wall_s": tflite_wall, "peak_rss_mb": tflite_rss},
        "wall_ratio": wall / tflite_wall,
        "rss_ratio": rss / tflite_rss,
        "round_trip_wall_ratio": wall / round_trip_wall,
        "round_trip_rss_ratio": rss / round_trip_rss,
        "nodes_before": serving["nodes_before"],
        "nodes_after": serving["nodes_after"],
        "folds": sum(len(p["folds"]) for g in graphs[:1] for p in g["passes"]),
        "signatures": len(report["signatures"]),
        "max_rel_error": max(c["max_rel_error"] for c in report["verification"]["checks"]),
        "latency": json.loads(latency_json.strip().splitlines()[-1]),
    }


def bench_pass_scaling(sizes):
    """Pass time of the default pipeline on synthetic chains, in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import synthetic_graphs
    from tf_bnfuse import fold_graph_def
    results = []
    for size in sizes:
        graph_def, outputs, blocks = synthetic_graphs.chain_graph(size)
        best = None
        for _ in range(2 if size <= 30000 else 1):
            started = time.perf_counter()
            _, report = fold_graph_def(graph_def, outputs)
            seconds = time.perf_counter() - started
            best = seconds if best is None else min(best, seconds)
        if len(report.folds) != blocks:  # the figure is only meaningful if every block folded
            raise RuntimeError("synthetic graph of %d nodes: %d of %d batch norms folded" % (
                size, len(report.folds), blocks))
        results.append({"nodes": len(graph_def.node), "batch_norms": blocks, "seconds": best,
                        "us_per_node": 1e6 * best / len(graph_def.node)})
        print("  passes on %6d nodes: %.2f s (%.1f us/node)" % (
            len(graph_def.node), best, 1e6 * best / len(graph_def.node)), flush=True)
    return results


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = subprocess.run([sys.executable, "-c", "import tensorflow as tf, keras, numpy; "
                               "print(tf.__version__, keras.__version__, numpy.__version__)"],
                              capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    tf_version, keras_version, numpy_version = (versions.stdout.split() + ["?"] * 3)[:3]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1), "commit": commit.stdout.strip(),
            "python": platform.python_version(), "tensorflow": tf_version, "keras": keras_version,
            "numpy": numpy_version, "gpu": "none"}


def markdown(results):
    lines = [
        "| model | tf_bnfuse wall (load / freeze / reference / passes / write / verify / startup) "
        "| round trip wall | TFLite converter wall | wall ratio to round trip, converter | tf_bnfuse peak RSS "
        "| round trip peak RSS | TFLite peak RSS | RSS ratio to round trip, converter | passes share "
        "| latency b1 orig -> folded (ratio) | latency b8 orig -> folded (ratio) | nodes | max rel error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["models"]:
        t, p = r["tf_bnfuse"], r["tf_bnfuse"]["phases_s"]
        floor, lat = r["round_trip"], r["latency"]
        lines.append(
            "| %s | %.1f s (%.1f / %.1f / %.1f / %.2f / %.1f / %.1f / %.1f) | %.1f s | %.1f s | %.2f, %.2f "
            "| %.2f GB | %.2f GB | %.2f GB | %.2f, %.2f "
            "| %.1f%% | %.1f -> %.1f ms (%.2f) | %.1f -> %.1f ms (%.2f) | %d -> %d | %.1e |" % (
                r["model"], t["wall_s"], p.get("load", 0), p.get("freeze", 0), p.get("reference", 0),
                p.get("passes", 0), p.get("write", 0), p.get("verify", 0), p.get("startup", 0),
                floor["wall_s"], r["tflite_converter"]["wall_s"], r["round_trip_wall_ratio"], r["wall_ratio"],
                t["peak_rss_mb"] / 1024, floor["peak_rss_mb"] / 1024, r["tflite_converter"]["peak_rss_mb"] / 1024,
                r["round_trip_rss_ratio"], r["rss_ratio"], 100 * t["passes_share"],
                lat["1"]["original_ms"], lat["1"]["folded_ms"], lat["1"]["ratio"],
                lat["8"]["original_ms"], lat["8"]["folded_ms"], lat["8"]["ratio"],
                r["nodes_before"], r["nodes_after"], r["max_rel_error"]))
    lines += ["", "| synthetic graph nodes | batch norms | pass time | per node |", "|---|---|---|---|"]
    for s in results["pass_scaling"]:
        lines.append("| %d | %d | %.2f s | %.1f us |" % (s["nodes"], s["batch_norms"], s["seconds"],
                                                          s["us_per_node"]))
    lines += [""] + targets(results)
    return "\n".join(lines)


def targets(results):
    """The speed targets of issues 10 and 36, as this run measured them."""
    lines = []
    for r in results["models"]:
        lines.append("%s: %.2f times the round trip's wall, %.2f its peak RSS (target: at most 1.0 each)" % (
            r["model"], r["round_trip_wall_ratio"], r["round_trip_rss_ratio"]))
    for r in results["models"]:
        if r["model"].endswith("ResNet50"):
            lines.append("%s: passes %.1f%% of the whole CLI (target: under 2%%)" % (
                r["model"], 100 * r["tf_bnfuse"]["passes_share"]))
    scaling = results["pass_scaling"]
    if len(scaling) >= 2:
        small, large = scaling[0], scaling[-1]
        lines.append("per-node pass time at %d nodes / at %d: %.2fx (target: within 1.5x)" % (
            large["nodes"], small["nodes"], large["us_per_node"] / small["us_per_node"]))
    return lines


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot drawn")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    scaling = results["pass_scaling"]
    nodes = [s["nodes"] for s in scaling]
    left.plot(nodes, [s["seconds"] for s in scaling], "o-", label="measured")
    # A line through the largest graph with slope 1: what linear time would look like.
    per_node = scaling[-1]["seconds"] / nodes[-1]
    left.plot(nodes, [n * per_node for n in nodes], "--", color="grey", label="linear through the largest")
    left.legend(fontsize=8)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("graph nodes")
    left.set_ylabel("pass time (s)")
    left.set_title("Default pipeline on synthetic conv+BN chains")
    left.grid(True, which="both", alpha=0.3)
    models = results["models"]
    names = [m["model"].replace("tf_keras_", "tf-keras\n").replace("keras3_", "Keras 3\n") for m in models]
    width = 0.2
    for i, (batch, kind) in enumerate([("1", "original_ms"), ("1", "folded_ms"), ("8", "original_ms"),
                                       ("8", "folded_ms")]):
        right.bar([x + (i - 1.5) * width for x in range(len(models))],
                  [m["latency"][batch][kind] / m["latency"][batch]["original_ms"] for m in models], width,
                  label="batch %s, %s" % (batch, kind.split("_")[0]))
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xticks(range(len(models)))
    right.set_xticklabels(names, fontsize=8)
    right.set_ylabel("latency / original latency (median)")
    right.set_title("Inference latency, original vs folded (CPU)")
    right.set_ylim(0, 1.25)
    right.legend(fontsize=7, ncol=2, loc="upper center")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    print("plot written to", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small model, graphs up to 10k nodes")
    parser.add_argument("--models", nargs="+", default=None, help="keras.applications names")
    parser.add_argument("--flavours", nargs="+", default=FLAVOURS, choices=FLAVOURS)
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "build", "bench"))
    parser.add_argument("--rounds", type=int, default=30, help="interleaved latency runs per batch size")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from results.json")
    parser.add_argument("--config", default=None, help="the tf_bnfuse CLI's --config for the small models")
    parser.add_argument("--big", action="store_true",
                        help="only the big-model rows (benchmarks/big_models.py): tf_bnfuse against a plain "
                             "load + save and the TFLite converter, per size of weights")
    parser.add_argument("--big_sizes_gb", nargs="+", type=float, default=[1, 2.9])
    parser.add_argument("--big_rounds", type=int, default=3,
                        help="big models: the round trip and tf_bnfuse this many times each, in turn (medians)")
    parser.add_argument("--big_without_converter", action="store_true",
                        help="big models: only the round trip and tf_bnfuse (a 6 GB model's conversion needs 31 GB)")
    parser.add_argument("--plot", default=None,
                        help="where the PNG goes (default docs/benchmark.png, which docs/performance.md shows; "
                             "build/bench/benchmark_quick.png with --quick)")
    args = parser.parse_args()

    if args.big:
        return main_big(args)
    default_plot = ("build/bench/benchmark_quick.png" if args.quick else "docs/benchmark.png")
    if args.replot:
        with open(os.path.join(args.work_dir, "results.json")) as f:
            plot(json.load(f), args.plot or os.path.join(ROOT, default_plot))
        return
    models = args.models or (["MobileNetV2"] if args.quick else MODELS)
    flavours = args.flavours if not args.quick else ["keras3"]
    input_size = 96 if args.quick else 224
    sizes = [s for s in GRAPH_SIZES if s <= 10000] if args.quick else GRAPH_SIZES
    rounds = 5 if args.quick else args.rounds
    models_dir = os.path.join(args.work_dir, "models" if not args.quick else "models_quick")
    runs_dir = os.path.join(args.work_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)

    results = {"machine": machine(), "models": [], "pass_scaling": []}
    print("machine:", json.dumps(results["machine"]), flush=True)
    build_models(models_dir, flavours, models, input_size)
    for flavour in flavours:
        for model in models:
            path = os.path.join(models_dir, "%s_%s" % (flavour, model))
            print("benchmarking", os.path.basename(path), "...", flush=True)
            results["models"].append(bench_model(path, runs_dir, rounds, args.config))
            r = results["models"][-1]
            print("  tf_bnfuse %.1f s %.2f GB, round trip %.1f s %.2f GB, TFLite converter %.1f s %.2f GB" % (
                r["tf_bnfuse"]["wall_s"], r["tf_bnfuse"]["peak_rss_mb"] / 1024,
                r["round_trip"]["wall_s"], r["round_trip"]["peak_rss_mb"] / 1024,
                r["tflite_converter"]["wall_s"], r["tflite_converter"]["peak_rss_mb"] / 1024), flush=True)
    print("pass scaling ...", flush=True)
    results["pass_scaling"] = bench_pass_scaling(sizes)

    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print()
    print("Machine: %(cpu)s, %(cores)d cores, %(memory_gb)s GB RAM, no GPU; Python %(python)s, "
          "TensorFlow %(tensorflow)s, Keras %(keras)s" % results["machine"])
    print()
    print(markdown(results))
    print()
    print("figures written to", os.path.join(args.work_dir, "results.json"))
    plot(results, args.plot or os.path.join(ROOT, default_plot))


def main_big(args):
    work_dir = os.path.join(args.work_dir, "big")
    os.makedirs(work_dir, exist_ok=True)
    rows = []
    for size in args.big_sizes_gb:
        print("big model, %g GB of weights ..." % size, flush=True)
        rows.append(big_models.bench_big(size, work_dir, measured_run_rss,
                                         None if args.big_without_converter else TFLITE_CONVERT, args.big_rounds))
        print(big_models.markdown(rows[-1:]).splitlines()[-1], flush=True)
    with open(os.path.join(args.work_dir, "results_big.json"), "w") as f:
        json.dump({"machine": machine(), "big": rows}, f, indent=2)
    print()
    print(big_models.markdown(rows))


if __name__ == "__main__":
    main()
