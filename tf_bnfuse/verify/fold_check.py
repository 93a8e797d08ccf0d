"""Checks every fold where it happens, each by itself.

A fold knows which tensors must agree (report.CheckPoint): the tensors its chain starts from
(the linear op's data input; a forward chain's x) and the tensor that holds its result (the
batch norm's output, which keeps its name; a forward fold's linear op), named the same in the
original and the folded graph. The original's frozen graph is kept as it was before the
passes, and its weights with it (WeightStore.pin). After the passes one probe of the folded
graph computes, beside it, each checked fold's original chain (the nodes that compute its
result from its inputs and constants: graph.computed_from) reading the folded graph's own
values at the chain's inputs. The chain and the fold then start from the very same tensor, so
what reaches a fold from upstream, already rounded otherwise by the folds above it, cannot
hide or fake an error in it, at any depth and whatever the model does after it (a softmax).
The probe compares the two results over every element, in the graph, and returns two
numbers a fold (savedmodel/probe.py): reading the tensors out would cost more than the check.

A fold passes when max |folded - original| <= bound * max |original| over its output, with
bound = fold_rounding_multiple * eps(the linear op's dtype) * sqrt(terms): float rounding of a
sum of `terms` products grows like its square root. The probe runs as written (Grappler off)
on the first device: Grappler's fusions and a GPU's TF32 convolutions round otherwise, which
the output comparison covers on every device.
"""

import dataclasses
import math
from typing import Dict, List

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.verify import compare

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


@dataclasses.dataclass
class FoldChecks:
    """Every fold of a MetaGraph's signatures, checked by itself, or why not."""
    device: str
    checks: List[FoldCheck] = dataclasses.field(default_factory=list)
    not_checked: Dict[str, str] = dataclasses.field(default_factory=dict)  # "signature: fold node" -> why

    @property
    def ok(self):
        return all(c.ok for c in self.checks)

    def failures(self):
        return sorted((c for c in self.checks if not c.ok), key=lambda c: -c.max_rel_error / c.bound)

    @property
    def worst(self):
        """The check nearest its bound (or furthest past it)."""
        return max(self.checks, key=lambda c: c.max_rel_error / c.bound, default=None)

    def to_dict(self):
        result = dataclasses.asdict(self)
        result.update(checked=len(self.checks), ok=self.ok,
                      worst=dataclasses.asdict(self.worst) if self.worst else None)
        return result

    def describe_failure(self):
        failed = self.failures()
        first = failed[0]
        more = " (and %d more: %s)" % (len(failed) - 1, ", ".join(c.node for c in failed[1:])) if len(failed) > 1 else ""
        return ("fold of %s into %s (signature %s) fails its own check: at %s, beside its original chain on the "
                "same input, max rel error %.3g, bound %.3g%s" % (
                    first.node, first.linear_node, first.signature, first.output, first.max_rel_error, first.bound,
                    more))


def bound(check_point, verify_config):
    """The bound on a fold's max rel error: fold_rounding_multiple * eps * sqrt(terms)."""
    multiple = float(verify_config.get("fold_rounding_multiple", 8.0))
    epsilon = _EPSILON.get(check_point.dtype, _EPSILON["float32"])
    return multiple * epsilon * math.sqrt(max(check_point.terms or 1, 1))


NOTHING_PROBED = {"full": {}, "compared": {}}  # the values of a plan with no fold to check
CHAIN_PREFIX = "tf_bnfuse_original_chain_%d/"  # a checked fold's original chain, in the folded probe
# A chain is a few nodes a branch; the limit bounds the walk where a chain would reach the model's input.
CHAIN_MAX_NODES = 1024


def run_as_written(probe, input_specs, inputs, state=()):
    """run_probe on the first device, as written (Grappler off: compare.as_written), the
    variables in `state` (those the signatures write) given back their values afterwards, as
    after the original's own calls. Raises what TensorFlow raises."""
    with compare.as_written(), tf.device(compare.visible_devices()[0]), resources.values_restored(state):
        return run_probe(probe, input_specs, inputs)


def probe_inputs(input_specs, inputs):
    """The test inputs the fold checks run on: the first element of each batch where every input
    has a batch dimension of unknown size (the checks cost half), else all of them."""
    batched = all(spec.shape and spec.shape[0] is None for spec in input_specs.values())
    return {k: (v[:1] if batched and np.ndim(v) and len(v) else v) for k, v in inputs.items()}


def run_probe(probe, input_specs, inputs):
    """{"full": {tensor: tensor}, "compared": {(reference, candidate): (max abs difference,
    scale) as floats}}: one call of a savedmodel/probe.probe_function on a signature's inputs."""
    result = probe(*[tf.constant(inputs[k]) for k in sorted(input_specs)])
    return {"full": dict(result["full"]),
            "compared": {pair: tuple(float(v) for v in maxima.numpy()) for pair, maxima in result["compared"].items()}}


@dataclasses.dataclass
class Plan:
    """What the folded graph's probe of one signature adds and reads."""
    chains: object  # GraphDef: each checked fold's original chain, its nodes renamed (CHAIN_PREFIX)
    references: Dict[str, str]  # a checked fold's output -> its original chain's output in `chains`
    folds: list  # the report.Folds to check
    not_checked: Dict[str, str]

    @property
    def compared(self):
        """[(original chain's output, fold's output)]: what the probe compares."""
        return [(self.references[output], output) for output in sorted(self.references)]


def plan(signature, folds, original, folded_nodes):
    """The Plan of one signature's folds, given the original's frozen graph as before the passes
    and the names of the folded graph's nodes."""
    nodes = {node.name: node for node in original.node}
    chains = graph_lib.new_graph_def(original)
    references, checked, not_checked = {}, [], {}
    for fold in folds:
        where, point = "%s: %s" % (signature, fold.node), fold.check
        if point is None:
            not_checked[where] = "inside a called function (a loop body or branch): covered by the output check"
            continue
        missing = [t for t in point.inputs + [point.output] if graph_lib.parse_input(t)[0] not in folded_nodes]
        chain = graph_lib.computed_from(nodes.get, point.output, point.inputs, CHAIN_MAX_NODES)
        if missing or chain is None:
            not_checked[where] = ("%s is not a tensor of the folded graph" % missing[0] if missing else
                                  "its chain in the original reads more than %s and constants, or is over %d "
                                  "nodes" % (", ".join(point.inputs), CHAIN_MAX_NODES))
            continue
        checked.append(fold)
        if point.output not in references:  # the branches of a concat share one
            output, inputs = chain
            renamed = {name: CHAIN_PREFIX % len(references) + name for name in inputs}
            for name, read in inputs.items():
                node = chains.node.add()
                node.CopyFrom(nodes[name])
                node.name, node.device = renamed[name], ""
                graph_lib.set_inputs(node, [graph_lib.renamed_input(i, renamed) for i in read])
                node.attr.pop("_class", None)  # colocation with nodes it does not hold
            references[point.output] = graph_lib.renamed_input(output, renamed)
    if chains.library.function and not any(graph_lib.called_function_names(node) for node in chains.node):
        chains.library.Clear()
    return Plan(chains, references, checked, not_checked)


def check(signature, plan_, values, verify_config):
    """([FoldCheck], {not checked: why}) of the planned folds: each original chain's output
    against the folded graph's (run_probe of a probe with the plan's chains: Plan.compared)."""
    checks, not_checked = [], dict(plan_.not_checked)
    for fold in plan_.folds:  # plan kept only folds whose output and chain the probe holds
        output = fold.check.output
        error, scale = values["compared"][(plan_.references[output], output)]
        if not math.isfinite(scale) and scale != -math.inf:  # (-inf: Max over no element)
            not_checked["%s: %s" % (signature, fold.node)] = ("its original chain's output is not finite on the "
                                                              "test inputs: covered by the output check")
            continue
        limit, relative = bound(fold.check, verify_config), relative_error(error, scale)
        checks.append(FoldCheck(signature, fold.node, fold.linear_node, output, relative, limit,
                                bool(relative <= limit), max(scale, 0.0)))
    return checks, not_checked


def relative_error(error, scale):
    """max |folded - original| / max |original| from the probe's two maxima (compare.compare's
    rule): infinite where the folded output is not finite and the original is, or where the
    original is all zero and the folded output is not; 0 over no element."""
    if error == -math.inf:
        return 0.0
    if not math.isfinite(error):
        return math.inf
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)


def raise_if_failed(fold_checks):
    if fold_checks is not None and not fold_checks.ok:
        raise errors.VerificationError(
            "verification failed: %s; a fold error, not rounding: verify.fold_rounding_multiple in a --config loosens "
            "the bound; nothing written" % fold_checks.describe_failure())

