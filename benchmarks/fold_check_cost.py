"""Where the fold check's time goes (docs/performance.md, "What verification costs"): the
Python API folds one benchmark model in this process, and where it checks the folds of a signature,
the same probe is also made and called anew several times.

    .venv/bin/python benchmarks/fold_check_cost.py [--model tf_keras_MobileNetV2] [--repeats 15]

Prints, for the probe the run itself makes (the first in the process) and as medians over
the repeats: writing the probe (Python), its first call (TensorFlow instantiating the function,
oneDNN building its kernels for shapes not seen before, one run) and a second call (one run).
The first call of the first probe less a repeat's first call is what is built once a process.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import run_benchmark  # noqa: E402
import tf_bnfuse  # noqa: E402
from tf_bnfuse.phases import output  # noqa: E402
from tf_bnfuse.verify import fold_check  # noqa: E402


def timed_probe(key, signature, graph, plan, folded):
    """(seconds to write, to call first, to call again) of one new probe of the fold check."""
    specs = folded.test_inputs.input_specs[key]
    inputs = fold_check.probe_inputs(specs, folded.test_inputs.arrays[key])
    start = time.perf_counter()
    probe = output.fold_check_probe(signature, graph, plan)
    written = time.perf_counter()
    fold_check.run_as_written(probe, specs, inputs, folded.signatures.state)
    first = time.perf_counter()
    fold_check.run_as_written(probe, specs, inputs, folded.signatures.state)
    return written - start, first - written, time.perf_counter() - first


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tf_keras_MobileNetV2", help="a model of build/bench/models")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    models_dir = os.path.join(ROOT, "build", "bench", "models")
    flavour, model = args.model.split("_", 1) if args.model.startswith("keras3") else ("tf_keras", args.model[9:])
    run_benchmark.build_models(models_dir, [flavour], [model], 224)
    measured = []
    real_probe_folds = output._probe_folds

    def probe_folds(key, signature, graph, plan, folded):
        measured.append((len(plan.folds), [timed_probe(key, signature, graph, plan, folded)
                                           for _ in range(args.repeats + 1)]))
        return real_probe_folds(key, signature, graph, plan, folded)
    output._probe_folds = probe_folds
    out = os.path.join(ROOT, "build", "bench", "fold_check_cost_out")
    tf_bnfuse.fold_saved_model(os.path.join(models_dir, args.model), out, overwrite=True)
    print("| model | folds | probe | write | first call | second call |")
    print("|---|---|---|---|---|---|")
    for folds, times in measured:
        rows = [("first in the process", times[0])] + [
            ("median of %d more" % args.repeats, [statistics.median(t[i] for t in times[1:]) for i in range(3)])]
        for what, (write, first, second) in rows:
            print("| %s | %d | %s | %.3f s | %.3f s | %.3f s |" % (args.model, folds, what, write, first, second))


if __name__ == "__main__":
    main()
