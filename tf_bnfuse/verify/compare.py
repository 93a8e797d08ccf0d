"""Proves a folded SavedModel computes what the original does, on every visible device.

Both models get the same inputs (verification_inputs.py). An output passes when

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

A deep model's own float32 rounding can exceed that bound: two honest evaluations of the input
already differ by more. Where an output still fails, it is judged by the models' own spread:
the original's frozen graph is evaluated again, in float64 (graph/float64.py: its float32
arithmetic widened, batch norms written out), as near the exact answer as the test inputs
allow, and as written in float32 through the import the folded model uses; the folded model
runs once more as written (Grappler's fusions of the folded graph, a conv + bias + swish say,
round otherwise than the original's unfused ops). The spread is the larger of the original's
distance from its two evaluations and the folded output's from itself as written; the output
passes within spread_multiple (config, 8) times it, and the check says the spread set its bound.
A chaotic model's float32 error is a random variable that one evaluation measures loosely:
docs/verification.md has the measured ratios behind the multiple. The cost falls only on the
outputs that need it (the input is loaded again, OriginalAgain). A wrong fold cannot hide
behind this: every fold is checked by itself first (fold_check.py), at a bound of its own
layer's rounding; and a wrong fold moves the folded output, not either model's spread. The
spread is measured on the first device (the folded one on each) and used on every device.

The original runs twice on the same inputs. An output that differs between
those runs is random (a random op, Dropout in training mode), unless the
folded model reproduces both runs (a counter's state): a random output is
reported as such and not compared.
"""

import dataclasses
from typing import Dict, List

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse.verify import execution
from tf_bnfuse.verify import records
from tf_bnfuse.verify import tolerance as tolerance_lib


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
    expected = Expected(list(devices or execution.visible_devices()))
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


def verify(expected, folded, inputs, output_specs, verify_config, precisions=None, original_again=None,
           evaluated_again=None):
    """Runs every signature of the folded model on every device and compares its outputs with the
    original's (Expected); returns a VerificationReport.

    folded: {signature key: callable(**inputs) -> dict of tensors}.
    inputs: {signature: {input: array}} (test_inputs.make_inputs).
    output_specs: {signature: {output: TensorSpecInfo}}, for the dtypes.
    precisions: {signature: {output: half precision computing it}} (output_precisions).
    original_again(): {signature: the original's callable}, called only where the folded model
    does not match: the original runs again as written (module docstring).
    evaluated_again(signature): [(the original's {output: array} evaluated otherwise, how)];
    called only where an output still fails (module docstring).
    """
    precisions = precisions or {}
    report = records.VerificationReport(devices=list(expected.devices))
    report.not_run = {"%s on %s" % kd: line for kd, line in expected.not_run.items()}
    for key in sorted(folded):
        for device in expected.devices:
            if (key, device) not in expected.calls:
                continue
            judged = _Judged(key, device, expected.calls[(key, device)], folded[key], inputs[key], output_specs[key],
                             verify_config, precisions.get(key, {}))
            with tf.device(device):
                checks, difference = judged.checks(original_again)
            if difference is not None:
                report.grappler_differs["%s on %s" % (key, device)] = difference
            elif not all(c.ok for c in checks) and evaluated_again is not None:
                checks = judged.within_own_error(checks, evaluated_again(key))
            report.checks.extend(checks)
        if not any(c.signature == key for c in report.checks):
            raise errors.BadInputError(
                "the original signature %s fails on its test inputs on every device: %s; pass "
                "{--verify_inputs} or {--skip_verify}" % (key, report.not_run["%s on %s" % (key, expected.devices[0])]))
    return report


class _Judged:
    """One signature on one device: the folded model's calls, compared with the original's."""

    def __init__(self, key, device, first, function, inputs, output_specs, verify_config, precisions):
        self.key, self.device, self.first, self.function = key, device, first, function
        self.inputs, self.output_specs, self.verify_config, self.precisions = inputs, output_specs, verify_config, precisions
        self.calls = []

    def folded_outputs(self, count):
        tensors = {k: tf.constant(v) for k, v in self.inputs.items()}
        while len(self.calls) < count:
            self.calls.append(_call(self.function, tensors))
        return self.calls

    def against(self, reference):
        return _compare_calls(self.key, self.device, reference, self.folded_outputs, self.output_specs,
                              self.verify_config, self.precisions)

    def checks(self, original_again):
        """(OutputChecks, None), or, where the folded model matches only the original as written
        (a Grappler bug), (those checks, max abs difference from the original as TF runs it)."""
        try:
            checks = self.against(self.first)
        except tf.errors.OpError as e:
            raise errors.VerificationError(
                "verification failed: the folded signature %s fails on %s where the original runs: "
                "%s; nothing written" % (self.key, self.device, errors.most_specific_line(e)))

        def against_original_again():
            tensors = {k: tf.constant(v) for k, v in self.inputs.items()}
            try:
                function = original_again()[self.key]
                again = [_call(function, tensors), _call(function, tensors)]
            except tf.errors.OpError:
                return None
            return self.against(again)
        checks, as_written_only = execution.unless_accepted_as_written(
            checks, against_original_again if original_again else lambda: None,
            lambda found: found is not None and all(c.ok for c in found))
        if not as_written_only:
            return checks, None
        return checks, max(tolerance_lib.compare(self.first[0][k], self.calls[0].get(k), {"rtol": 0.0, "atol": 0.0})[0]
                           for k in self.first[0])

    def within_own_error(self, checks, references):
        """The failed checks judged by the two models' own spreads (_within_own_error): the
        folded model's is its distance from itself run as written (one more call, here)."""
        multiple = float(self.verify_config.get("spread_multiple", 8.0))
        tensors = {k: tf.constant(v) for k, v in self.inputs.items()}
        # a function called under another config is instantiated anew
        with execution.as_written(), tf.device(self.device):
            folded_as_written = _call(self.function, tensors)
        return [_within_own_error(c, self.first[0][c.output], self.calls[0][c.output], references,
                                  folded_as_written.get(c.output), multiple)
                if not c.ok and not c.random and c.output in self.calls[0] else c
                for c in checks]


def _remember_if_repeatable(seen, key, expected):
    if all(np.array_equal(v, expected[1].get(k)) for k, v in expected[0].items()):
        seen[key] = expected[0]


def _compare_calls(key, device, expected, folded_outputs, output_specs, verify_config, precisions):
    """The OutputChecks of one signature on one device.

    expected: the original's two calls; folded_outputs(n): the folded model's first n calls
    (a second only where the original's output changed between its two).
    """
    dtypes = {k: _dtype(k, expected[0], output_specs) for k in expected[0]}
    tolerances = {k: tolerance_lib.tolerance_for(dtypes[k], verify_config, precisions.get(k)) for k in expected[0]}
    repeatable = {k: tolerance_lib.compare(expected[0][k], expected[1].get(k), tolerances[k][0])[2]
                  for k in expected[0]}
    actual = folded_outputs(1 if all(repeatable.values()) else 2)  # state or randomness: does it repeat?
    return [_check(key, output_key, device, dtypes[output_key].name, expected, actual, tolerances[output_key],
                   repeatable[output_key]) for output_key in sorted(expected[0])]


def spread_bounds(verification, expected):
    """{signature: {output: the max abs error its check accepted}} for the outputs whose bound the
    models' own spread set, on the first device: what a kept root function computing that output
    is held to (root_functions.check)."""
    bounds = {}
    for c in verification.checks:
        calls = expected.calls.get((c.signature, c.device))
        if c.own_spread is None or c.bound is None or c.device != expected.devices[0] or calls is None:
            continue
        bounds.setdefault(c.signature, {})[c.output] = c.bound * tolerance_lib.scale_of(calls[0][c.output])
    return bounds


def _own_spread(original, references, output_key):
    """(max abs, max rel) distance of the original's output from its other evaluations; (None,
    None) where none is finite."""
    found = [tolerance_lib.compare(r[output_key], original, {"rtol": 0.0, "atol": 0.0})[:2] for r, _ in references
             if output_key in r]
    found = [f for f in found if np.isfinite(f[0])]
    return max(found) if found else (None, None)


def _within_own_error(check, original, folded, references, folded_as_written, multiple):
    """The check judged by the models' own spread: the larger of how far the original is from
    itself evaluated otherwise (references: in float64, as written in float32) and how far the
    folded output is from itself as written. The folded output passes within `multiple` times
    that of the original: a fold error moves the folded output, not the spreads."""
    own, own_rel = _own_spread(original, references, check.output)
    if folded_as_written is not None:
        folded_own = tolerance_lib.compare(folded, folded_as_written, {"rtol": 0.0, "atol": 0.0})[0]
        scale = tolerance_lib.scale_of(original)
        if np.isfinite(folded_own) and scale > 0 and (own is None or folded_own > own):
            own, own_rel = folded_own, folded_own / scale
    if own is None:
        return check
    if check.bound is not None and multiple * own_rel <= check.bound:
        return dataclasses.replace(check, own_spread=own_rel)  # the tolerance is the looser bound
    return dataclasses.replace(check, own_spread=own_rel, bound=multiple * own_rel,
                               bound_source="%gx the models' own spread" % multiple,
                               ok=bool(check.max_abs_error <= multiple * own))


def _dtype(output_key, outputs, specs):
    return specs[output_key].dtype if output_key in specs else tf.as_dtype(outputs[output_key].dtype)


def _check(key, output_key, device, dtype, expected, actual, tolerance, repeatable):
    """One OutputCheck: the folded model's first call against the original's, or, for an output the
    original changes between calls, both calls, or neither when it is random."""
    tol, source = tolerance

    def made(max_abs, max_rel, ok, random=False):
        scale = tolerance_lib.scale_of(expected[0].get(output_key))
        bound = None if random else (tol["atol"] + tol["rtol"] * scale) / scale if scale > 0 else float("inf")
        return records.OutputCheck(key, output_key, device, dtype, max_abs, max_rel, tol["rtol"], tol["atol"], ok,
                                   source, random=random, bound=bound, bound_source="" if random else source)
    if any(output_key not in a for a in actual):
        return made(float("inf"), float("inf"), False)
    max_abs, max_rel, ok = tolerance_lib.compare(expected[0][output_key], actual[0][output_key], tol)
    if not repeatable:
        # The original changed between two calls on the same input: state the folded model
        # reproduces call for call (a counter), or randomness nothing can be compared on.
        again_abs, again_rel, again_ok = tolerance_lib.compare(expected[1][output_key], actual[1][output_key], tol)
        if ok and again_ok:
            return made(max(max_abs, again_abs), max(max_rel, again_rel), True)
        return made(float("nan"), float("nan"), True, random=True)
    return made(max_abs, max_rel, ok)


# What a user can do about a failed check (docs/verification.md#when-verification-fails).
WHAT_TO_DO = ("to loosen the bound, raise verify.tolerance or verify.spread_multiple in a {--config}; to judge on real "
              "data, pass {--verify_inputs}")


def raise_if_failed(verification):
    """VerificationError for the first failed check (with its culprit), if one failed."""
    if verification is None or verification.ok:
        return
    bad = verification.failures()[0]
    cause = "; %s" % verification.culprit.describe() if verification.culprit is not None else ""
    raise errors.VerificationError(
        "verification failed: signature %s output %s on %s: max abs error %.3g, max rel error %.3g "
        "(%s)%s; %s; nothing written" % (bad.signature, bad.output, bad.device, bad.max_abs_error, bad.max_rel_error,
                                        bad.describe_bound(), cause, WHAT_TO_DO))
