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
from tf_bnfuse.verify import fold_check  # noqa: E402


def timed_probe(signature, graph, plan, specs, inputs, state):
    """(seconds to write, to call first, to call again) of one new probe of the fold check."""
    start = time.perf_counter()
    probe = real_probe(signature, graph, plan)
    written = time.perf_counter()
    real_run(probe, specs, inputs, state)
    first = time.perf_counter()
    real_run(probe, specs, inputs, state)
    return written - start, first - written, time.perf_counter() - first


real_probe, real_run = fold_check.probe, fold_check.run_as_written


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tf_keras_MobileNetV2", help="a model of build/bench/models")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    models_dir = os.path.join(ROOT, "build", "bench", "models")
    flavour, model = args.model.split("_", 1) if args.model.startswith("keras3") else ("tf_keras", args.model[9:])
    run_benchmark.build_models(models_dir, [flavour], [model], 224)
    measured, pending = [], []

    def probe(signature, graph, plan):  # the run's own probe of a signature: called next
        pending.append((signature, graph, plan))
        return real_probe(signature, graph, plan)

    def run_as_written(made, specs, inputs, state=()):
        if pending:
            signature, graph, plan = pending.pop()
            measured.append((len(plan.folds), [timed_probe(signature, graph, plan, specs, inputs, state)
                                               for _ in range(args.repeats + 1)]))
        return real_run(made, specs, inputs, state)
    fold_check.probe, fold_check.run_as_written = probe, run_as_written
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
