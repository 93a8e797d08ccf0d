"""What each fold's check compares: its original chain, read from the original's frozen graph as
before the passes, beside the folded graph (verify/fold_check.py runs and judges it).

A fold knows which tensors must agree (report.CheckPoint): the tensors its chain starts from
(the linear op's data input; a forward chain's x) and the tensor that holds its result (the
batch norm's output, which keeps its name; a forward fold's linear op). plan() copies each
chain (the nodes that compute the result from those tensors and constants:
graph.computed_from), renamed, reading the folded graph's own values of its inputs, so that
the chain and the fold start from the very same tensor. Where a fold's tensors are not in the
folded graph as they were, it finds where they are:

- a fold inside a called function (a While body, an If branch): the folded function is
  inlined on its one caller's inputs, and the chain is read from the original's function;
- an input another fold changed or removed: the nearest tensors above it that the folded
  graph holds as they were (the chain then spans both folds: Plan.shared);
- an output a pass bypassed: what the output was an Identity of; an output another fold
  changed, or took away folding into the same linear op (a scale after the batch norm): the
  nearest tensor below it the folded graph holds as it was, the chain running down to it;
- an output a later fold took away (its bias moved into the next linear op): where its bias
  was added, against the chain on the same input less the chain on zeros;
- a dtype a later pass changed: read cast back to the original's.

A chain that is one stride-1 convolution and per-channel steps is computed on the first rows
of its input only (verify/cropped_chains.py).
"""

import dataclasses
from typing import Dict, List

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.graph import function_def as function_def_lib
from tf_bnfuse.graph import tf_internal
from tf_bnfuse.verify import cropped_chains

CHAIN_PREFIX = "tf_bnfuse_original_chain_%d/"  # a checked fold's original chain, in the folded probe
# A chain is a few nodes a branch; the limit bounds the walk where a chain would reach the model's input.
CHAIN_MAX_NODES = 1024
HALF_PRECISION = ("float16", "bfloat16")  # the dtypes whose folds are judged by their slope too


@dataclasses.dataclass
class Plan:
    """What the folded graph's probe of one signature adds and reads."""
    chains: object  # GraphDef: each checked fold's original chain, its nodes renamed (CHAIN_PREFIX), and
    # each called function with a checked fold inlined on its caller's inputs (BODY_PREFIX)
    references: Dict[str, str]  # a checked fold's output in the folded probe -> its original chain's output
    folds: list  # the report.Folds to check
    not_checked: Dict[str, str]
    # fold_key -> the probe's tensor it is compared at (candidates), and that tensor in the folded graph (at)
    candidates: Dict[tuple, str] = dataclasses.field(default_factory=dict)
    at: Dict[tuple, str] = dataclasses.field(default_factory=dict)
    shared: set = dataclasses.field(default_factory=set)  # folds whose chains hold other folds' nodes
    cropped: Dict[tuple, int] = dataclasses.field(default_factory=dict)  # fold_key -> rows compared (cropped_chains)

    def candidate(self, fold):
        return self.candidates.get(fold_key(fold), fold.check.output)

    @property
    def compared(self):
        """[(original chain's output, fold's output)]: what the probe compares."""
        return [(self.references[output], output) for output in sorted(self.references)]

    @property
    def sloped(self):
        """The pairs of `compared` whose folds are judged by their slope too (slope_bound)."""
        return [(self.references[self.candidate(f)], self.candidate(f)) for f in self.folds
                if f.check.dtype in HALF_PRECISION]


def fold_key(fold):
    """What tells a signature's folds apart: a batch norm that folds backward into one linear op
    and forward into the next is two folds of one node."""
    return fold.node, fold.linear_node


def reading_originals_in_turn(plan_, max_bytes, source_of):
    """plan_'s chains, each stored Const that source_of(node) finds in the input's checkpoint
    ((prefix, key), or None) read there instead by a RestoreV2 node of its name: in groups of
    chains that read at most max_bytes of them together (a chain that reads more is one alone),
    in the plan's order, each group's reads after the previous group's chains have run. One
    probe call then holds the original's released weights of one group at a time, and runs
    the folded graph once (verify/fold_check.py)."""
    nodes = {node.name: node for node in plan_.chains.node}
    groups = []  # [[reference node names, {stored Const read from the checkpoint: bytes}]]
    for candidate, reference in sorted(plan_.references.items()):
        read = {n: graph_lib.const_nbytes(nodes[n]) for n in graph_lib.cone(nodes.get, [candidate, reference])
                if graph_lib.WEIGHT_KEY_ATTR in nodes[n].attr and source_of(nodes[n]) is not None}
        read = {n: size for n, size in read.items() if not any(n in g[1] for g in groups)}  # read once
        if groups and sum({**groups[-1][1], **read}.values()) <= max_bytes:
            groups[-1][0].add(graph_lib.parse_input(reference)[0])
            groups[-1][1].update(read)
        else:
            groups.append([{graph_lib.parse_input(reference)[0]}, read])
    after = {}  # stored Const -> the chains its read waits for
    for previous, group in zip([None] + groups[:-1], groups):
        after.update((name, sorted(previous[0]) if previous else []) for name in group[1])
    chains = graph_lib.new_graph_def(plan_.chains)
    for node in plan_.chains.node:
        if node.name in after:
            chains.node.extend(_restore_nodes(node, source_of(node), after[node.name]))
        else:
            chains.node.add().CopyFrom(node)
    return chains


def _restore_nodes(const, source, after):
    """A RestoreV2 node named as the stored Const, reading its value from the checkpoint source
    (prefix, key) once the nodes `after` have run, and the string Consts it reads."""
    prefix, key = source
    inputs = [graph_lib.const_node_def("%s/tf_bnfuse_restore_%s" % (const.name, what), np.array(value))
              for what, value in (("prefix", prefix.encode()), ("key", [key.encode()]), ("slice", [b""]))]
    dtype = tf.compat.v1.AttrValue(list=tf.compat.v1.AttrValue.ListValue(type=[const.attr["dtype"].type]))
    restore = graph_lib.node_def(const.name, "RestoreV2", [n.name for n in inputs] + ["^" + a for a in after],
                                 {"dtypes": dtype})
    return inputs + [restore]


BODY_PREFIX = "tf_bnfuse_called_function_%d/"  # a called function inlined in the folded probe


@dataclasses.dataclass
class _Scope:
    """The graph a fold's CheckPoint names tensors of: the signature's, or a called function's
    body (the original's as before the passes, the folded one inlined beside the folded graph
    on its caller's inputs, BODY_PREFIX)."""
    original: object  # GraphDef the chain is read from
    folded: object  # GraphDef whose nodes the chain may read
    renamed: Dict[str, str]  # a folded node's name -> its name in the probe ({}: the same)
    arguments: List[str]  # tensors a chain may read besides its inputs: a body's arguments

    def __post_init__(self):
        self.nodes = {node.name: node for node in self.original.node}
        self.names = {node.name for node in self.folded.node}
        self.kept = set(self.names)  # less what folds changed (plan)
        self._consumers = None
        self.original_dtypes = function_def_lib.dtype_reader(self.original)  # {tensor: DataType} of tensors
        self.folded_dtypes = function_def_lib.dtype_reader(self.folded)

    def consumers(self):
        """{node: the nodes of the original that read it by a data edge}."""
        if self._consumers is None:
            self._consumers = {}
            for node in self.original.node:
                for source in {graph_lib.parse_input(i)[0] for i in graph_lib.data_inputs(node)}:
                    self._consumers.setdefault(source, []).append(node.name)
        return self._consumers


def plan(signature, folds, original, folded):
    """The Plan of one signature's folds, given the original's frozen graph as before the passes
    and the folded graph (the nodes' values are not read). A backward fold whose output a later
    fold removed (its bias, which a forward fold took into the next linear op) is checked where
    its bias was added (CheckPoint.unbiased), against its original chain at the same input less
    the chain at zeros."""
    planner = _Planner(signature, folds, original, folded)
    for fold in folds:
        planner.add(fold)
    for fold in planner.absorbed:
        planner.add_less_at_zero(fold)
    return planner.result()


class _Planner:
    """A Plan as it is made: the chains GraphDef, and what each fold is compared at."""

    def __init__(self, signature, folds, original, folded):
        self.signature, self.original, self.folded = signature, original, folded
        self.chains = graph_lib.new_graph_def(original)
        self.references, self.candidates, self.at, self.checked, self.not_checked = {}, {}, {}, [], {}
        self.scopes, self.absorbed = {}, []
        self.compared_as = {}  # a tensor of the probe -> what is compared for it (a cast of it, or itself)
        self.rows_of = {}  # a tensor of the probe -> the output rows its cropped chain compares
        self.shared = set()  # folds whose check spans another fold's nodes (started above, or compared below)
        self.cropped = {}  # Plan.cropped
        # called function (None: the signature's graph) -> {node whose values folds changed: their fold_keys}
        self.changed_by = {}
        for fold in folds:
            if fold.check is not None:
                for node in fold.check.changed:
                    self.changed_by.setdefault(fold.check.function, {}).setdefault(node, set()).add(fold_key(fold))

    def _scope(self, function):
        """The _Scope of the signature's graph (None) or of a called function; a string: why none."""
        if function not in self.scopes:
            scope = (_Scope(self.original, self.folded, {}, []) if function is None else
                     _inline_function(function, self.original, self.folded, self.chains, len(self.scopes)))
            if not isinstance(scope, str):
                scope.kept -= set(self.changed_by.get(function, {}))
            self.scopes[function] = scope
        return self.scopes[function]

    def _not_checked(self, fold, why):
        self.not_checked["%s: %s" % (self.signature, fold.node)] = why

    def _checked(self, fold, candidate, at):
        self.checked.append(fold)
        self.candidates[fold_key(fold)], self.at[fold_key(fold)] = candidate, at

    def _compared(self, candidate, reference, present, wanted, number):
        """Adds the pair (reference, candidate), the candidate cast to the reference's dtype where
        a pass changed its precision (promote_float16); returns the candidate as compared."""
        if present != wanted:
            candidate = _cast(self.chains, CHAIN_PREFIX % number + "cast_folded", candidate, present, wanted)
        self.references[candidate] = reference
        return candidate

    def add(self, fold):
        point = fold.check
        scope = self._scope(point.function) if point is not None else \
            "the pass that made it says nothing of where to check it"
        if isinstance(scope, str):
            return self._not_checked(fold, scope)
        by_others = {node for node, keys in self.changed_by.get(point.function, {}).items() if keys - {fold_key(fold)}}
        output = _compared_output(point, scope, by_others)
        if output is None:
            return self.absorbed.append(fold)
        # Compared below its own output (another fold's result), the chain runs down to it too.
        found, why = _chain(point, scope, point.output if output in (point.output, point.output_alias) else output)
        if found is None:
            return self._not_checked(fold, why)
        if output not in (point.output, point.output_alias) or found[2]:
            self.shared.add(fold_key(fold))
        tensor = _probe_tensor(output, scope)
        if tensor not in self.compared_as:  # the branches of a concat share one
            number = len(self.references)
            reference = _add_chain(self.chains, found, scope, number)
            wanted = scope.original_dtypes([found[0]])[found[0]]
            present = scope.folded_dtypes([output])[output]
            crop = (cropped_chains.crop(found[1], scope.nodes, wanted)
                    if present == wanted and not found[2] and not scope.renamed else None)
            candidate = tensor
            if crop is not None:
                candidate, reference = cropped_chains.cropped(self.chains, CHAIN_PREFIX % number, crop, tensor,
                                                              reference, wanted)
                self.rows_of[tensor] = crop[-1]
            self.compared_as[tensor] = self._compared(candidate, reference, present, wanted, number)
        self._checked(fold, self.compared_as[tensor], output)
        if tensor in self.rows_of:
            self.cropped[fold_key(fold)] = self.rows_of[tensor]

    def add_less_at_zero(self, fold):
        """A fold compared where its bias was added: its original chain run on the same input and
        on zeros, the two subtracted (its result less its value at a zero input)."""
        point = fold.check
        scope, unbiased = self.scopes[point.function], point.unbiased
        found, why = _chain(point, scope, point.output) if unbiased is not None else (None, None)
        if unbiased is None or graph_lib.parse_input(unbiased)[0] not in scope.names or found is None:
            return self._not_checked(fold, why or "%s is not a tensor of the folded graph" % point.output)
        number = len(self.references)
        at_input = _add_chain(self.chains, found, scope, number)
        at_zero = _add_chain(self.chains, found, scope, number, zero_inputs=found[3])
        reference = CHAIN_PREFIX % number + "less_at_zero"
        dtype = scope.original_dtypes([found[0]])[found[0]]
        self.chains.node.extend([graph_lib.node_def(reference, "Sub", [at_input, at_zero],
                                                    {"T": tf.compat.v1.AttrValue(type=dtype)})])
        candidate = self._compared(_probe_tensor(unbiased, scope), reference + ":0",
                                   scope.folded_dtypes([unbiased])[unbiased], dtype, number)
        self._checked(fold, candidate, unbiased)

    def result(self):
        if self.chains.library.function and not any(graph_lib.called_function_names(n) for n in self.chains.node):
            self.chains.library.Clear()
        return Plan(self.chains, self.references, self.checked, self.not_checked, self.candidates, self.at,
                    self.shared, self.cropped)


def _compared_output(point, scope, changed_by_others):
    """The folded graph's tensor that holds the fold's result: its output; where a pass bypassed
    that, the tensor the output was an Identity of; where another fold changed either (a forward
    fold's linear op, which a backward fold then scaled; a linear op a batch norm folded into,
    which then took the scale after it), the nearest tensor below it, through single consumers,
    that the folded graph holds as it was (the other fold's result), also where that fold, into
    the same linear op, took the output away with its own. None where there is none."""
    if graph_lib.parse_input(point.output)[0] in scope.kept:
        return point.output
    alias = point.output_alias
    alias_name = graph_lib.parse_input(alias)[0] if alias is not None else None
    if alias_name in scope.names and alias_name not in changed_by_others:
        return alias
    name = graph_lib.parse_input(point.output)[0]
    if name not in scope.names:
        if alias_name in scope.names:
            name = alias_name  # the other fold's result is below the output, which the alias stood for
        elif not changed_by_others & set(point.changed):
            return None  # taken away by a fold into another linear op (its bias moved into the next)
    for _ in range(CHAIN_MAX_NODES):
        consumers = scope.consumers().get(name, [])
        if len(consumers) != 1:
            return None
        name = consumers[0]
        if name in scope.kept:
            return graph_lib.tensor_name(name)
    return None


def _probe_tensor(tensor, scope):
    return graph_lib.renamed_input(graph_lib.tensor_name(*graph_lib.canonical_tensor(tensor)), scope.renamed)


def _chain(point, scope, output):
    """((computed_from's output, {node: inputs}, whether it starts above the fold's own inputs,
    the tensors it starts from) of the fold's original chain down to `output` (its own, or
    where it is compared below it), None), or (None, why not). A
    chain input that the folded graph lacks, or holds with another value (a linear op an
    earlier fold scaled, an affine op a forward fold removed), is replaced by the nearest
    tensors above it that it holds as they were, the chain growing by what lies between."""
    inputs = graph_lib.nearest_kept(scope.nodes.get, point.inputs, scope.kept, CHAIN_MAX_NODES)
    if inputs is None:
        return None, ("%s is not a tensor of the folded graph, and nor is what computes it" %
                      next(t for t in point.inputs if graph_lib.parse_input(t)[0] not in scope.kept))
    # What the folded graph holds as it was may be read from it (a Reshape's shape computed from
    # the input): the same value, and the chain stays the fold's own nodes.
    found = graph_lib.computed_from(scope.nodes.get, output, inputs + scope.arguments, CHAIN_MAX_NODES,
                                    readable=lambda name: name in scope.kept and scope.nodes[name].op != "Const")
    if found is None:
        return None, ("its chain in the original reads more than %s and constants, or is over %d nodes" %
                      (", ".join(inputs), CHAIN_MAX_NODES))
    return found + (inputs != point.inputs, inputs), None


def _add_chain(chains, found, scope, number, zero_inputs=None):
    """Adds a chain's nodes to `chains`, renamed, reading the folded graph's tensors (cast to the
    dtype the original read where a pass changed it); returns its output's name there.
    zero_inputs: the chain's inputs, to be read as zeros of their shape (a second copy)."""
    output, inputs = found[:2]
    prefix = CHAIN_PREFIX % number + ("at_zero/" if zero_inputs is not None else "")
    renamed = {name: prefix + name for name in inputs}
    boundary = sorted({graph_lib.canonical_tensor(i) for read in inputs.values() for i in read
                       if graph_lib.parse_input(i)[0] not in renamed})
    tensors = [graph_lib.tensor_name(*t) for t in boundary]
    wanted = scope.original_dtypes(tensors)
    present = scope.folded_dtypes(tensors)
    zeroed = {graph_lib.canonical_tensor(t) for t in zero_inputs or ()}
    read_as = {}
    for k, tensor in enumerate(tensors):
        read_as[tensor] = _probe_tensor(tensor, scope)
        if present[tensor] != wanted[tensor]:  # a pass changed its precision: the chain reads it as before
            read_as[tensor] = _cast(chains, prefix + "cast_%d" % k, read_as[tensor], present[tensor], wanted[tensor])
        if graph_lib.canonical_tensor(tensor) in zeroed:
            chains.node.extend([graph_lib.node_def(prefix + "zeros_%d" % k, "ZerosLike", [read_as[tensor]],
                                                   {"T": tf.compat.v1.AttrValue(type=wanted[tensor])})])
            read_as[tensor] = prefix + "zeros_%d:0" % k

    def reading(input_str):
        if graph_lib.parse_input(input_str)[0] in renamed:
            return graph_lib.renamed_input(input_str, renamed)
        return read_as[graph_lib.tensor_name(*graph_lib.canonical_tensor(input_str))]
    for name, read in inputs.items():
        node = chains.node.add()
        node.CopyFrom(scope.nodes[name])
        node.name, node.device = renamed[name], ""
        graph_lib.set_inputs(node, [reading(i) for i in read])
        node.attr.pop("_class", None)  # colocation with nodes it does not hold
    return graph_lib.renamed_input(output, renamed)


def _cast(chains, name, tensor, source, destination):
    chains.node.extend([graph_lib.cast_node_def(name, tensor, source, destination)])
    return name + ":0"


def _inline_function(name, original, folded, chains, number):
    """The _Scope of a called function (a While body, an If branch) whose folds are checked: its
    folded body added to `chains`, renamed (BODY_PREFIX), its arguments reading its one
    caller's inputs in the folded graph. Run once on those inputs, a loop body computes its
    first iteration, a branch whether taken or not: a fold is checked on real tensors either
    way. A string, why not, where it cannot be."""
    callers = [node for node in folded.node if name in graph_lib.called_function_names(node)]
    functions = [graph_lib.functions_by_name(g).get(name) for g in (original, folded)]
    if len(callers) != 1 or callers[0].op not in graph_lib.CALL_ARGUMENTS or None in functions:
        return "%s is not called by exactly one node of the folded graph" % name
    caller = callers[0]
    arguments = graph_lib.data_inputs(caller)[graph_lib.CALL_ARGUMENTS[caller.op][1]:]
    body, _ = tf_internal.function_def_to_graph_def(functions[1])
    names = [arg.name for arg in functions[1].signature.input_arg]
    prefix = BODY_PREFIX % number
    renamed = {node.name: prefix + node.name for node in body.node}
    for node in body.node:
        if node.name in names:
            new = graph_lib.node_def(renamed[node.name], "Identity", [arguments[names.index(node.name)]],
                                     {"T": node.attr["dtype"]})
        else:
            new = tf.compat.v1.NodeDef()
            new.CopyFrom(node)
            new.name, new.device = renamed[node.name], ""
            graph_lib.set_inputs(new, [graph_lib.renamed_input(i, renamed) for i in node.input])
            new.attr.pop("_class", None)
        chains.node.extend([new])
    original_body, _ = tf_internal.function_def_to_graph_def(functions[0])
    return _Scope(original_body, body, renamed, [graph_lib.tensor_name(n) for n in names])
