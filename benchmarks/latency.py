"""Inference latency of two SavedModels side by side; prints JSON on stdout.

    python benchmarks/latency.py ORIGINAL FOLDED --batch_sizes 1 8 --rounds 30

Both run the serving_default signature on the same random input. Runs are
interleaved (original, folded, folded, original, ...) so that load from other
processes on a shared machine hits both alike; the figure is the median.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("original")
    parser.add_argument("folded")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    functions = [tf.saved_model.load(p).signatures["serving_default"] for p in (args.original, args.folded)]
    rng = np.random.default_rng(0)
    results = {}
    for batch in args.batch_sizes:
        inputs = {k: tf.constant(rng.standard_normal([batch if d is None else d for d in s.shape.as_list()])
                                 .astype(s.dtype.as_numpy_dtype))
                  for k, s in functions[0].structured_input_signature[1].items()}
        for function in functions:
            for _ in range(args.warmup):
                function(**inputs)
        times = [[], []]
        for r in range(args.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for which in order:
                started = time.perf_counter()
                outputs = functions[which](**inputs)
                for value in outputs.values():
                    value.numpy()  # wait for the result
                times[which].append(time.perf_counter() - started)
        original_ms, folded_ms = (1000 * statistics.median(t) for t in times)
        results[str(batch)] = {"original_ms": original_ms, "folded_ms": folded_ms,
                               "ratio": folded_ms / original_ms}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
