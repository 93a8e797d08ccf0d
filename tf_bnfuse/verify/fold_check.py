"""Checks every fold where it happens, each by itself: runs what verify/fold_plan.py plans and
judges it.

The plan puts, beside the folded graph, each fold's original chain reading the folded graph's
own values at the chain's inputs, so that the chain and the fold start from the very same
tensor: what reaches a fold from upstream, already rounded otherwise by the folds above it,
cannot hide or fake an error in it, at any depth and whatever the model does after it (a
softmax). One probe of the folded graph (savedmodel/probe.py) compares the two results over
every element, in the graph, and returns a few numbers a fold: reading the tensors out would
cost more than the check. The probe runs as written (Grappler off) on the first device:
Grappler's fusions and a GPU's TF32 convolutions round otherwise, which the output comparison
covers on every device.

A fold passes when max |folded - original| <= bound * max |original| over its output (bound),
and, computing in half precision, when the slope of the difference on the original is within
its bound or within its own noise (slope_bound, fitted_slope). A fold that is not checked
fails the run unless the configuration accepts it (raise_if_failed).
"""

import dataclasses
import math
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse.savedmodel import probe as probe_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.verify import execution
from tf_bnfuse.verify import tolerance as tolerance_lib
from tf_bnfuse.verify import fold_plan

# Machine epsilon of the dtypes a linear op computes in (np.finfo has no bfloat16).
_EPSILON = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}


@dataclasses.dataclass
class FoldCheck:
    signature: str
    node: str  # the fold's (report.Fold.node)
    linear_node: str
    output: str  # the tensor compared
    max_rel_error: float  # max |folded - original chain| / scale at output, on the same input
    bound: float  # on max_rel_error
    ok: bool
    scale: float  # max |original| at output
    # |least-squares slope of (original - folded) on original|: a scale error shows there below
    # rounding; judged (slope_bound) where the linear op computes in half precision
    slope: float = 0.0
    slope_bound: Optional[float] = None
    slope_significance: float = 0.0  # |slope| / its standard error: a slope over its bound fails only above
    # verify.slope_significance (10), where rounding noise cannot have made it (slope_significant)
    slope_significant: bool = False
    # Its chain holds another fold's nodes (a later pass cut it there): a fold that fails its own
    # chain alone is named first
    shared: bool = False
    # Its chain computed on the first rows of its input (verify/cropped_chains.py): the output rows compared
    compared_rows: Optional[int] = None

    @property
    def excess(self):
        """How far the check is along to its bounds (1: at one): the larger of its two ratios."""
        return max(self.max_rel_error / self.bound,
                   self.slope / self.slope_bound if self.slope_bound and self.slope_significant else 0.0)


@dataclasses.dataclass
class FoldChecks:
    """Every fold of a MetaGraph's signatures, checked by itself, or why not."""
    device: str
    checks: List[FoldCheck] = dataclasses.field(default_factory=list)
    not_checked: Dict[str, str] = dataclasses.field(default_factory=dict)  # "signature: fold node" -> why

    @property
    def ok(self):
        """No checked fold failed (folds not checked: raise_if_failed decides)."""
        return all(c.ok for c in self.checks)

    @property
    def total(self):
        return len(self.checks) + len(self.not_checked)

    def failures(self):
        return sorted((c for c in self.checks if not c.ok), key=lambda c: (c.shared, -c.excess))

    @property
    def worst(self):
        """The check nearest its bound (or furthest past it)."""
        return max(self.checks, key=lambda c: c.excess, default=None)

    def to_dict(self):
        result = dataclasses.asdict(self)
        result.update(checked=len(self.checks), total=self.total, ok=self.ok,
                      worst=dataclasses.asdict(self.worst) if self.worst else None)
        return result

    def describe_failure(self):
        failed = self.failures()
        first = failed[0]
        more = " (and %d more: %s)" % (len(failed) - 1, ", ".join(c.node for c in failed[1:])) if len(failed) > 1 else ""
        slope = ("" if first.slope_bound is None else
                 ", slope of the difference on the original %.3g, bound %.3g" % (first.slope, first.slope_bound))
        return ("fold of %s into %s (signature %s) fails its own check: at %s, beside its original chain on the "
                "same input, max rel error %.3g, bound %.3g%s%s" % (
                    first.node, first.linear_node, first.signature, first.output, first.max_rel_error, first.bound,
                    slope, more))


HALF_PRECISION = fold_plan.HALF_PRECISION


def _setting(verify_config, key):
    """A number of the verify config, which config.validate_config completes with the defaults."""
    return float(verify_config[key])


def bound(check_point, verify_config):
    """The bound on a fold's max rel error. A float32 or float64 linear op rounds as it sums its
    `terms` products: fold_rounding_multiple * eps * sqrt(terms). A float16 or bfloat16 one sums
    in float32 (TensorFlow's CPU kernels, measured; cuDNN and cuBLAS as TensorFlow calls them
    by default) and rounds its output, the folded kernel and the bias to half precision:
    half_rounding_multiple * eps(half) on top of float32's bound."""
    multiple = _setting(verify_config, "fold_rounding_multiple")
    summed = math.sqrt(max(check_point.terms or 1, 1))
    if check_point.dtype in HALF_PRECISION:
        return (multiple * _EPSILON["float32"] * summed
                + _setting(verify_config, "half_rounding_multiple") * _EPSILON[check_point.dtype])
    return multiple * _EPSILON.get(check_point.dtype, _EPSILON["float32"]) * summed


def slope_bound(check_point, verify_config):
    """The bound on |slope| (FoldCheck.slope) of a half-precision fold: slope_multiple * eps(half),
    judged only where the slope stands slope_significance standard errors out of its noise
    (check): rounding, unbiased, hardly correlates with the output, where a kernel off by a
    factor 1 + e gives a slope near e (docs/verification.md has the measured margins). None for
    other dtypes, whose max rel error bound is tight enough alone."""
    if check_point.dtype not in HALF_PRECISION:
        return None
    return _setting(verify_config, "slope_multiple") * _EPSILON[check_point.dtype]


NOTHING_PROBED = {"full": {}, "compared": {}}  # the values of a plan with no fold to check


def run_as_written(probe, input_specs, inputs, state=()):
    """run_probe on the first device, as written (Grappler off: execution.as_written), the
    variables in `state` (those the signatures write) given back their values afterwards, as
    after the original's own calls. Raises what TensorFlow raises."""
    with execution.as_written(), tf.device(execution.visible_devices()[0]), resources.values_restored(state):
        return run_probe(probe, input_specs, inputs)


def probe_inputs(input_specs, inputs):
    """The test inputs the fold checks run on: the first element of each batch where every input
    has a batch dimension of unknown size (the checks cost half), else all of them."""
    batched = all(spec.shape and spec.shape[0] is None for spec in input_specs.values())
    return {k: (v[:1] if batched and np.ndim(v) and len(v) else v) for k, v in inputs.items()}


def run_probe(probe, input_specs, inputs):
    """{"full": {tensor: tensor}, "compared": {(reference, candidate): (max abs difference,
    scale, and for a pair with moments the centred sums its slope is fitted from: fitted_slope)
    as floats}}: one call of a savedmodel/probe.probe_function on a signature's inputs."""
    result = probe(*[tf.constant(inputs[k]) for k in sorted(input_specs)])
    return {"full": dict(result["full"]),
            "compared": {pair: tuple(float(v) for v in maxima.numpy()) for pair, maxima in result["compared"].items()}}


def check_signatures(graphs, originals, signatures, folds, test_inputs, state, verify_config):
    """The FoldChecks of one MetaGraph's signatures: for each, the Plan of its folds
    (fold_plan.plan), one probe of its folded graph as built (graphs: {key: (GraphDef without
    weights, weights)}) with the plan's chains beside it, run on the first device as written
    (run_as_written; `state`: the variables the signatures write, given back their values), and
    each fold judged (check). originals: {key: the original's frozen graph as before the
    passes}; signatures: {key: the folded signature, whose store lets go of the original's
    pinned weights once its check ran}; folds: {key: [report.Fold]}. An error building or
    running a probe is tf_bnfuse's (BnFuseError, exit 3): never a fold silently unchecked."""
    checks = FoldChecks(execution.visible_devices()[0])
    for key, original in originals.items():
        signature = signatures[key]
        plan_ = fold_plan.plan(key, folds[key], original, graphs[key][0])
        values = NOTHING_PROBED
        if plan_.folds:
            specs = test_inputs.input_specs[key]
            try:
                values = run_as_written(probe(signature, graphs[key], plan_, verify_config), specs,
                                        probe_inputs(specs, test_inputs.arrays[key]), state)
            except (tf.errors.OpError, ValueError) as e:
                raise errors.BnFuseError("the folds of signature %s cannot be checked by themselves, a tf_bnfuse "
                                         "bug (nothing written): %s" % (key, errors.most_specific_line(e))) from e
        signature.weights.unpin(signature.graph_def)
        found, not_checked = check(key, plan_, values, verify_config)
        checks.checks += found
        checks.not_checked.update(not_checked)
    return checks


def probe(signature, graph, plan_, verify_config):
    """The probe of one signature's folded graph as built (graph: (GraphDef, weights)) with the
    plan's original chains beside it, comparing each checked fold with its chain. The
    original's weights the passes released are read back from the input's checkpoint inside
    the probe, verify.fold_check_batch_bytes of them at a time (fold_plan.reading_originals_in_turn)."""
    store = signature.weights
    chains = fold_plan.reading_originals_in_turn(plan_, int(verify_config["fold_check_batch_bytes"]),
                                                 store.released_source)
    return probe_lib.probe_function(signature, *graph, [], plan_.compared,
                                    checks=(chains, probe_lib.stored_weights(chains, store)),
                                    moments=plan_.sloped)


def check(signature, plan_, values, verify_config):
    """([FoldCheck], {not checked: why}) of the planned folds: each original chain's output
    against the folded graph's (run_probe of a probe with the plan's chains: fold_plan.Plan.compared).
    Folds compared at one tensor (a concat's branches; a forward and a backward fold into one
    linear op) are judged by the largest of their bounds."""
    checks, not_checked = [], dict(plan_.not_checked)
    sharing = {}
    for fold in plan_.folds:
        sharing.setdefault(plan_.candidate(fold), []).append(fold)
    for fold in plan_.folds:  # plan kept only folds whose output and chain the probe holds
        output = plan_.candidate(fold)
        error, scale, *moments = values["compared"][(plan_.references[output], output)]
        if not math.isfinite(scale) and scale != -math.inf:  # (-inf: Max over no element)
            not_checked["%s: %s" % (signature, fold.node)] = ("its original chain's output is not finite on the "
                                                              "test inputs: covered by the output check")
            continue
        owners = sharing[output]
        limit = max(bound(f.check, verify_config) for f in owners)
        slope_limit = max((slope_bound(f.check, verify_config) or 0.0) for f in owners) or None
        relative = tolerance_lib.relative_error(error, scale)
        slope, significance = fitted_slope(*moments) if moments else (0.0, 0.0)
        significant = significance > _setting(verify_config, "slope_significance")
        ok = relative <= limit and (slope_limit is None or slope <= slope_limit or not significant)
        key = fold_plan.fold_key(fold)
        checks.append(FoldCheck(signature, fold.node, fold.linear_node, plan_.at.get(key, fold.check.output),
                                relative, limit, bool(ok), max(scale, 0.0), slope, slope_limit, significance,
                                significant, key in plan_.shared, plan_.cropped.get(key)))
    return checks, not_checked


def fitted_slope(dot, energy, spread, count):
    """(|slope|, |slope| / its standard error) of the least-squares line through the origin of
    the difference d on the reference r, from sum d * r, sum r * r, sum d * d and the number of
    elements (centred sums: probe._moment_nodes). Rounding noise gives a slope of a few standard
    errors; a fold's scale error a slope of hundreds."""
    if not energy > 0:
        return (0.0, 0.0) if dot == 0 else (math.inf, math.inf)
    slope = dot / energy
    residual = max(spread - slope * dot, 0.0) / max(count - 1.0, 1.0)
    error = math.sqrt(residual / energy)
    return abs(slope), (abs(slope) / error if error > 0 else (0.0 if slope == 0 else math.inf))


def raise_if_failed(fold_checks, verify_config):
    """Raises VerificationError where a fold failed its check, or where one was not checked by
    itself and verify_config does not accept that (accept_unchecked_folds)."""
    if fold_checks is None:
        return
    if not fold_checks.ok:
        raise errors.VerificationError(
            "verification failed: %s; a fold error, not rounding: verify.fold_rounding_multiple (half precision: "
            "half_rounding_multiple, slope_multiple) in a {--config} loosens the bound; nothing written" %
            fold_checks.describe_failure())
    if fold_checks.not_checked and not verify_config["accept_unchecked_folds"]:
        (where, why), more = sorted(fold_checks.not_checked.items())[0], len(fold_checks.not_checked) - 1
        raise errors.VerificationError(
            "verification failed: %s of %d folds not checked by themselves: fold %s: %s%s; "
            "verify.accept_unchecked_folds in a {--config} accepts them, the outputs deciding; nothing written" % (
                len(fold_checks.not_checked), fold_checks.total, where, why, " (and %d more)" % more if more else ""))
