"""Proves a folded SavedModel computes what the original does, on every visible device.

Both models get the same inputs (test_inputs.py). An output passes when

    max |folded - original| <= atol + rtol * max |original|

with rtol/atol from the config for the lowest float precision that computes
the output: its dtype, or a float16/bfloat16 op or Cast on its path (mixed
precision computes in float16 and returns float32). The bound is on the
whole tensor's scale, not element by element, so outputs that cross zero do
not need an absolute tolerance tuned per model.

The original runs as users run it, with Grappler. Where the folded model
does not match it, the original runs again as written (Grappler off,
as_written): a TensorFlow bug can make Grappler compute a graph otherwise
than its ops say (oneDNN's Conv2D + BiasAdd + Add + LeakyRelu fusion takes
alpha 0.2 whatever the model's), and a fold can change whether the bug
applies. A folded model that matches the input as written passes, and the
signature is reported (grappler_differs) with how far the output is from
the input as TensorFlow runs it.

The original runs twice on the same inputs. An output that differs between
those runs is random (a random op, Dropout in training mode), unless the
folded model reproduces both runs (a counter's state): a random output is
reported as such and not compared.
"""

import contextlib
import dataclasses
from typing import Dict, List

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib

HALF_PRECISIONS = ("float16", "bfloat16")  # loosest first


@dataclasses.dataclass
class OutputCheck:
    signature: str
    output: str
    device: str
    dtype: str
    max_abs_error: float
    max_rel_error: float  # max abs error / max |original|
    rtol: float
    atol: float
    ok: bool
    precision: str = ""  # what set the tolerance: "float32 output", "float16 compute", ...
    random: bool = False  # the original gives other values on a second call: not compared


@dataclasses.dataclass
class VerificationReport:
    devices: List[str]
    checks: List[OutputCheck] = dataclasses.field(default_factory=list)
    # "signature on device" -> why the ORIGINAL cannot run there (nothing to compare with)
    not_run: Dict[str, str] = dataclasses.field(default_factory=dict)
    # "signature/input" -> how integer test values were chosen
    inputs: Dict[str, str] = dataclasses.field(default_factory=dict)
    # "signature on device" -> max abs difference between the folded model and the original as
    # TensorFlow runs it, where the folded model matched only the original as written (a
    # TensorFlow bug in Grappler; module docstring)
    grappler_differs: Dict[str, float] = dataclasses.field(default_factory=dict)
    # The fold that explains the first failed check (verify/culprit.Culprit), when one failed
    culprit: object = None

    @property
    def ok(self):
        return all(c.ok for c in self.checks)

    @property
    def compared(self):
        return [c for c in self.checks if not c.random]

    def random_outputs(self):
        return sorted({"%s/%s" % (c.signature, c.output) for c in self.checks if c.random})

    def failures(self):
        return [c for c in self.checks if not c.ok]

    def to_dict(self):
        result = dataclasses.asdict(self)
        result["random_outputs"] = self.random_outputs()
        return result


@contextlib.contextmanager
def as_written():
    """Functions first called inside run their graphs without Grappler (a function called under
    another optimizer config than before is instantiated again).

    The setting is the process's: a function another thread first calls meanwhile is built
    without Grappler too. The caller's own setting comes back on exit."""
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


def unless_accepted_as_written(first, attempt, accepted):
    """(result, as_written): first, with False, when accepted(first); else attempt() run again
    under as_written(), with True, when accepted(that); else first, with False.

    first is attempt()'s result as TensorFlow runs the original (with Grappler). The one
    fallback every comparison with the original makes (module docstring).
    """
    if accepted(first):
        return first, False
    with as_written():
        again = attempt()
    return (again, True) if accepted(again) else (first, False)


def visible_devices():
    """Every logical CPU and GPU device TensorFlow can see, CPU first."""
    return [d.name for d in tf.config.list_logical_devices("CPU") + tf.config.list_logical_devices("GPU")]


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
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = max_abs <= tolerance["atol"] + tolerance["rtol"] * scale
    return max_abs, max_rel, ok


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


def smoke_test(folded, inputs):
    """Calls each signature once on its test inputs (--skip_verify: the output must at least run).

    inputs: {signature: {input: array}}. Raises VerificationError naming the signature that fails.
    """
    for key in sorted(folded):
        try:
            folded[key](**{k: tf.constant(v) for k, v in inputs[key].items()})
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise errors.VerificationError("the folded model cannot run: signature %s fails on test inputs: "
                                           "%s; nothing written" % (key, errors.most_specific_line(e)))


def _call(function, tensors):
    return {k: v.numpy() for k, v in function(**tensors).items()}


@dataclasses.dataclass
class Expected:
    """The original's outputs on the test inputs, computed before the passes run (they may release
    the original's folded kernels, WeightStore.releases): for each signature and device, two
    calls in turn, or why the original cannot run there."""
    devices: List[str]
    calls: Dict[tuple, list] = dataclasses.field(default_factory=dict)  # (signature, device) -> [outputs] * 2
    not_run: Dict[tuple, str] = dataclasses.field(default_factory=dict)  # (signature, device) -> error line
    # {signature: the outputs on the first device} where they repeat from call to call
    # (root_functions.expected_outputs calls a root function running it once)
    seen: Dict[str, dict] = dataclasses.field(default_factory=dict)


def expected_outputs(original, inputs, devices=None, deterministic=()):
    """Calls every signature of the original twice on every device: the Expected outputs.

    original: {signature key: callable(**inputs) -> dict of tensors}; inputs: {signature: {input: array}}.
    deterministic: the signatures whose graphs have no stateful op (graph.is_deterministic), called
    once: a second call could only repeat the first.
    """
    expected = Expected(list(devices or visible_devices()))
    for key in sorted(original):
        for device in expected.devices:
            with tf.device(device):
                tensors = {k: tf.constant(v) for k, v in inputs[key].items()}
                try:
                    calls = [_call(original[key], tensors)]
                    calls.append(calls[0] if key in deterministic else _call(original[key], tensors))
                except tf.errors.OpError as e:
                    # A TF1 lookup table is initialized on the device the model was loaded
                    # on only; the original cannot run elsewhere, so there is nothing to prove.
                    expected.not_run[(key, device)] = errors.most_specific_line(e)
                    continue
            expected.calls[(key, device)] = calls
            if device == expected.devices[0]:
                _remember_if_repeatable(expected.seen, key, calls)
    return expected


def verify(expected, folded, inputs, output_specs, verify_config, precisions=None, original_again=None):
    """Runs every signature of the folded model on every device and compares its outputs with the
    original's (Expected); returns a VerificationReport.

    folded: {signature key: callable(**inputs) -> dict of tensors}.
    inputs: {signature: {input: array}} (test_inputs.make_inputs).
    output_specs: {signature: {output: TensorSpecInfo}}, for the dtypes.
    precisions: {signature: {output: half precision computing it}} (output_precisions).
    original_again(): {signature: the original's callable}, called only where the folded model
    does not match: the original runs again as written (module docstring).
    """
    precisions = precisions or {}
    report = VerificationReport(devices=list(expected.devices))
    report.not_run = {"%s on %s" % kd: line for kd, line in expected.not_run.items()}
    for key in sorted(folded):
        for device in expected.devices:
            if (key, device) not in expected.calls:
                continue
            with tf.device(device):
                tensors = {k: tf.constant(v) for k, v in inputs[key].items()}
                calls = []

                def folded_outputs(count):
                    while len(calls) < count:
                        calls.append(_call(folded[key], tensors))
                    return calls

                def checks_against(reference):
                    return _compare_calls(key, device, reference, folded_outputs, output_specs[key], verify_config,
                                          precisions.get(key, {}))
                first = expected.calls[(key, device)]
                try:
                    checks = checks_against(first)
                except tf.errors.OpError as e:
                    raise errors.VerificationError(
                        "verification failed: the folded signature %s fails on %s where the original runs: "
                        "%s; nothing written" % (key, device, errors.most_specific_line(e)))

                def checks_against_original_again():
                    try:
                        function = original_again()[key]
                        again = [_call(function, tensors), _call(function, tensors)]
                    except tf.errors.OpError:
                        return None
                    return checks_against(again)
                checks, as_written_only = unless_accepted_as_written(
                    checks, checks_against_original_again if original_again else lambda: None,
                    lambda found: found is not None and all(c.ok for c in found))
                if as_written_only:
                    report.grappler_differs["%s on %s" % (key, device)] = max(
                        compare(first[0][k], calls[0].get(k), {"rtol": 0.0, "atol": 0.0})[0] for k in first[0])
            report.checks.extend(checks)
        if not any(c.signature == key for c in report.checks):
            raise errors.BadInputError(
                "the original signature %s fails on its test inputs on every device: %s; pass "
                "--verify_inputs or --skip_verify" % (key, report.not_run["%s on %s" % (key, expected.devices[0])]))
    return report


def _remember_if_repeatable(seen, key, expected):
    if all(np.array_equal(v, expected[1].get(k)) for k, v in expected[0].items()):
        seen[key] = expected[0]


def _compare_calls(key, device, expected, folded_outputs, output_specs, verify_config, precisions):
    """The OutputChecks of one signature on one device.

    expected: the original's two calls; folded_outputs(n): the folded model's first n calls
    (a second only where the original's output changed between its two).
    """
    dtypes = {k: _dtype(k, expected[0], output_specs) for k in expected[0]}
    tolerances = {k: tolerance_for(dtypes[k], verify_config, precisions.get(k)) for k in expected[0]}
    repeatable = {k: compare(expected[0][k], expected[1].get(k), tolerances[k][0])[2] for k in expected[0]}
    actual = folded_outputs(1 if all(repeatable.values()) else 2)  # state or randomness: does it repeat?
    return [_check(key, output_key, device, dtypes[output_key].name, expected, actual, tolerances[output_key],
                   repeatable[output_key]) for output_key in sorted(expected[0])]


def _dtype(output_key, outputs, specs):
    return specs[output_key].dtype if output_key in specs else tf.as_dtype(outputs[output_key].dtype)


def _check(key, output_key, device, dtype, expected, actual, tolerance, repeatable):
    """One OutputCheck: the folded model's first call against the original's, or, for an output the
    original changes between calls, both calls, or neither when it is random."""
    tol, source = tolerance
    if any(output_key not in a for a in actual):
        return OutputCheck(key, output_key, device, dtype, float("inf"), float("inf"), tol["rtol"],
                           tol["atol"], False, source)
    max_abs, max_rel, ok = compare(expected[0][output_key], actual[0][output_key], tol)
    if not repeatable:
        # The original changed between two calls on the same input: state the folded model
        # reproduces call for call (a counter), or randomness nothing can be compared on.
        again_abs, again_rel, again_ok = compare(expected[1][output_key], actual[1][output_key], tol)
        if ok and again_ok:
            return OutputCheck(key, output_key, device, dtype, max(max_abs, again_abs), max(max_rel, again_rel),
                               tol["rtol"], tol["atol"], True, source)
        return OutputCheck(key, output_key, device, dtype, float("nan"), float("nan"), tol["rtol"], tol["atol"],
                           True, source, random=True)
    return OutputCheck(key, output_key, device, dtype, max_abs, max_rel, tol["rtol"], tol["atol"], ok, source)


def raise_if_failed(verification):
    """VerificationError for the first failed check (with its culprit), if one failed."""
    if verification is None or verification.ok:
        return
    bad = verification.failures()[0]
    cause = "; %s" % verification.culprit.describe() if verification.culprit is not None else ""
    raise errors.VerificationError(
        "verification failed: signature %s output %s on %s: max abs error %.3g, max rel error %.3g "
        "(rtol %g, atol %g, set by %s)%s; nothing written" % (
            bad.signature, bad.output, bad.device, bad.max_abs_error, bad.max_rel_error, bad.rtol, bad.atol,
            bad.precision, cause))
