"""The comparison rule: how far an output may be from the original's, by its dtype and the
lowest float precision that computes it, and the one definition of relative error."""

import math

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib

HALF_PRECISIONS = ("float16", "bfloat16")  # loosest first

def compare(reference, candidate, tolerance):
    """(max abs error, max rel error, ok) of one output pair."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        return float("inf"), float("inf"), False
    if not np.issubdtype(reference.dtype, np.floating) and reference.dtype.name != "bfloat16":
        ok = bool(np.array_equal(reference, candidate))
        return (0.0, 0.0, ok) if ok else (float("inf"), float("inf"), False)
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    if reference.size == 0:
        return 0.0, 0.0, True
    if not np.array_equal(np.isfinite(reference), np.isfinite(candidate)):
        return float("inf"), float("inf"), False
    finite = np.isfinite(reference)
    max_abs = float(np.max(np.abs(reference - candidate)[finite], initial=0.0))
    scale = float(np.max(np.abs(reference[finite]), initial=0.0))
    ok = max_abs <= tolerance["atol"] + tolerance["rtol"] * scale
    return max_abs, relative_error(max_abs, scale), ok

def relative_error(error, scale):
    """max |candidate - reference| / max |reference| from those two maxima, the one definition
    of relative error (compare, and the fold checks' in-graph maxima): infinite where the error
    is not finite (a NaN where the reference is finite) or where the reference is all zero and
    the candidate is not; 0 over no element (Max over none: -inf)."""
    if error == -math.inf:
        return 0.0
    if not math.isfinite(error):
        return math.inf
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)

def _looser(a, b):
    return {"rtol": max(a["rtol"], b["rtol"]), "atol": max(a["atol"], b["atol"])}

def tolerance_for(dtype, verify_config, precision=None):
    """(tolerance, what set it) for an output of `dtype` computed at `precision` (or None)."""
    table = verify_config.get("tolerance", {})
    default = table.get("float32", {"rtol": 1e-4, "atol": 1e-6})
    name = tf.as_dtype(dtype).name
    tolerance, source = table.get(name, default), "%s output" % name
    if precision and precision in table:
        looser = _looser(tolerance, table[precision])
        if looser != tolerance:
            tolerance, source = looser, "%s compute" % precision
    return tolerance, source

def output_precisions(graph_def, outputs):
    """{output key: "float16" | "bfloat16"} for outputs some half-precision op or Cast computes.

    outputs: {key: TensorSpecInfo}. Looks at every node an output depends on,
    and into the functions those call (loop bodies, XLA clusters).
    """
    index = graph_lib.GraphIndex(graph_def)
    functions = graph_lib.functions_by_name(graph_def)
    half = {tf.as_dtype(p).as_datatype_enum: p for p in HALF_PRECISIONS}

    def precisions_of(node_defs):
        found = set()
        for node in node_defs:
            for attr in node.attr.values():
                if attr.type in half:
                    found.add(half[attr.type])
                found.update(half[t] for t in attr.list.type if t in half)
        return found

    result = {}
    for key, spec in outputs.items():
        ancestors = [index.node(n) for n in graph_lib.live_nodes(graph_def, [spec.tensor], keep_ops=())
                     if index.node(n) is not None]
        called = graph_lib.function_closure(
            functions, [f for n in ancestors for f in graph_lib.called_function_names(n)])
        found = precisions_of(ancestors + [n for name in called for n in functions[name].node_def])
        if found:
            result[key] = next(p for p in HALF_PRECISIONS if p in found)
    return result

def scale_of(array):
    """max |array| over its finite elements (1 where that is not a number: an integer output's
    bound is exact equality anyway)."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc" and array.dtype.name != "bfloat16":
        return 1.0
    values = np.abs(array.astype(np.float64))
    return float(np.max(values[np.isfinite(values)], initial=0.0))
