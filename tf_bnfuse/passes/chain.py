"""The one walker of every fold pass: chains found along input edges.

walk_backward(index, root) finds the chain `linear op -> ... -> root` that ends at a step
(the node the fold replaces), walk_forward(index, linear) the chain `x -> ... -> linear op`
that feeds a linear op (the node it replaces). Both follow input edges through
grammar.STEPS and grammar.PASS_THROUGHS, check once that every tensor inside the chain has
exactly one consumer, and compose the chain's steps into one `x * scale + shift`.

What a chain becomes is emit.py's (fold_weights, emit); drivers.py runs both for the passes.
"""

import dataclasses
from typing import List, Optional

import numpy as np

from tf_bnfuse import fold_math
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import grammar
from tf_bnfuse.passes import linear_ops
from tf_bnfuse.passes.grammar import NoMatch


@dataclasses.dataclass
class Chain:
    forward: bool
    match: linear_ops.LinearMatch
    root: object  # NodeDef the fold replaces: the last step (backward) or the linear op (forward)
    nodes: List[object]  # NodeDefs of the chain in data-flow order, without the linear op
    steps: List[object]  # the steps among them, in data-flow order
    scale: np.ndarray
    shift: np.ndarray
    # backward: where the new bias goes: after nodes[bias_after] (-1: after the linear op),
    # and the Layout of the tensor it is added to.
    bias_after: int = -1
    bias_layout: Optional[grammar.Layout] = None
    # forward: the tensor the chain starts from, the linear op's output Layout, and the
    # BiasAdd after the linear op the added bias merges into (with its value), if any.
    x: Optional[str] = None
    out_layout: Optional[grammar.Layout] = None
    merge_into: Optional[object] = None
    merge_value: Optional[np.ndarray] = None
    step_scales: list = dataclasses.field(default_factory=list)  # forward: (position in nodes, scale)
    # backward through a ConcatV2 of branches: the concat, and one Chain per input (root None)
    concat: Optional[object] = None
    branches: List["Chain"] = dataclasses.field(default_factory=list)

    @property
    def key(self):
        """What nested chains share: their linear op, or their ConcatV2."""
        return (self.concat or self.match.linear).name

    @property
    def linear_description(self):
        """(linear node, linear op) for the report: "a + b" across a ConcatV2."""
        if self.concat is None:
            return self.match.linear.name, self.match.op_description
        return (" + ".join(b.match.linear.name for b in self.branches),
                " + ".join(b.match.op_description for b in self.branches))

    @property
    def near_linear(self):
        """The step nearest the linear op (what a report names for a forward fold)."""
        return self.steps[0] if not self.forward else self.steps[-1]

    @property
    def absorbed(self):
        """Names of the nodes the fold makes dead, besides the one it replaces."""
        named = self.near_linear if self.forward else self.root
        return ([n.name for b in self.branches for n in b.nodes if not is_kept(n)]
                + [n.name for n in self.nodes if n is not named and not is_kept(n)])


    def check_point(self):
        """The report.CheckPoint of this fold. Backward, the linear op's data input and the root,
        which keeps its name; forward, x and the linear op (or the BiasAdd after it the new bias
        merges into), whose name the node computing its value takes. The nodes that keep their
        names with other values (the linear op, the pass-throughs that stay) are named too."""
        branches = self.branches if self.concat is not None else [self]
        terms = [_terms(b.match) for b in branches]

        def above_identities(input_str):  # what prune_identities leaves the chain reading
            node, port = self.match.index.skip_identities(input_str)
            return graph_lib.tensor_name(node.name, port) if node is not None else input_str
        kept = [n.name for b in branches for n in b.nodes if is_kept(n)] + [n.name for n in self.nodes if is_kept(n)]
        if self.forward:
            inputs = [above_identities(self.x)]
            output = (self.merge_into or self.match.linear).name
            changed = kept + ([self.match.linear.name] if self.merge_into is not None else [])
        else:
            inputs = [above_identities(grammar.data_inputs(b.match.linear)[b.match.spec.data_input])
                      for b in branches]
            output = self.root.name
            changed = kept + [b.match.linear.name for b in branches] + ([self.concat.name] if self.concat else [])
        return report_lib.CheckPoint(inputs, graph_lib.tensor_name(output), None if None in terms else max(terms),
                                     branches[0].match.dtype.name, changed=sorted(set(changed) - {output}),
                                     output_alias=self._root_alias(),
                                     unbiased=None if self.forward or self.concat is not None else
                                     graph_lib.tensor_name(self.match.linear.name if self.bias_after < 0
                                                           else self.nodes[self.bias_after].name))

    def _root_alias(self):
        """The tensor that holds the root's value where emit makes the root an Identity of it (the
        last pass-through kept after the new bias, or a ConcatV2's trunk), which prune_identities
        may then bypass; None where the root computes it (emit._emit_backward)."""
        if self.forward:
            return None
        if self.concat is not None:
            kept = [n.name for n in self.nodes[:-1] if is_kept(n)]
            return graph_lib.tensor_name(kept[-1] if kept else self.concat.name)
        between = self.nodes[:-1]
        kept = [n.name for n in between[self.bias_after + 1:] if is_kept(n)]
        return graph_lib.tensor_name(kept[-1]) if kept else None


def _terms(match):
    if match.kernel_shape is None or match.out_channels is None:
        return None
    if match.spec.batched_kernel:
        return int(match.kernel_shape[match.in_channel_axis])
    return int(np.prod(match.kernel_shape)) // max(match.out_channels, 1)


def _channel(match):
    """The channel axis of a linear op's data for its Layout (-1: the last, of any rank)."""
    return -1 if match.spec.rank is None else match.channel_axis % match.spec.rank


def is_kept(node):
    """A pass-through that stays in the data path (not absorbed, not a step)."""
    rule = grammar.PASS_THROUGHS.get(node.op)
    return rule is not None and not rule.absorbed


def single_use(index, node, port=0):
    uses = index.use_count(node.name, port)
    if uses != 1:
        extra = " (one is a graph output)" if index.is_output(node.name, port) else ""
        raise NoMatch("%s has %d consumers%s; folding would change the others" % (
            graph_lib.tensor_name(node.name, port), uses, extra))


def detached(reason):
    """A NoMatch kept for the report, without its traceback and context: those hold the
    frames of the walk and of the pass (its GraphIndex, the whole input graph) in a
    reference cycle, which only the cyclic collector would free, and it is paused while
    the passes run (runner._cyclic_gc_paused)."""
    reason.__traceback__ = reason.__context__ = reason.__cause__ = None
    return reason


def reached(reason):
    reason.reached_linear = True
    return reason


def next_input(index, node):
    """The data input the chain continues through, or None when node is not on a chain."""
    step = grammar.STEPS.get(node.op)
    if step is not None:
        return step.data_input(index, node)
    if node.op in grammar.PASS_THROUGHS:
        return grammar.data_inputs(node)[0]
    return None


def _channels_from_steps(index, nodes):
    """The channel count the constants of a chain's steps give (for a non-constant kernel)."""
    for node in nodes:
        if node.op in grammar.BATCH_NORM_OPS:
            return int(np.size(index.const_value(grammar.data_inputs(node)[1])))
        if node.op in grammar.STEPS:
            constant = next(i for i in grammar.data_inputs(node) if i != grammar.STEPS[node.op].data_input(index, node))
            size = int(np.size(index.const_value(constant)))
            if size > 1:
                return size
    return None


def check_positive_scales(nodes, scales, forward):
    """A MaxPool on the chain passes only a scale that is positive in every channel: the scale
    of the steps on its side away from the linear op."""
    for position, node in enumerate(nodes):
        rule = grammar.PASS_THROUGHS.get(node.op)
        if rule is None or not rule.positive_scale:
            continue
        crossing = [s for p, s in scales if (p < position if forward else p > position)]
        if crossing and np.any(np.prod(crossing, axis=0) <= 0):
            raise NoMatch("%s %s commutes only with a positive scale, and the scale is not positive in every "
                          "channel" % (node.op, node.name))


def walk_backward(index, root):
    """The Chain `linear op -> ... -> root` of a step, None when root is not a step on data
    (or is already the canonical bias after its linear op); raises NoMatch.

    The walk may also end at a ConcatV2 along the channels whose every input is such a
    chain from its own linear op: each of those gets its slice of the scale and shift.
    """
    if grammar.STEPS[root.op].data_input(index, root) is None:
        return None
    nodes, input_str = [root], next_input(index, root)  # walked upward
    while True:
        node, port = index.producer(input_str)
        if node is None:
            raise NoMatch("input %s has no producer in the graph" % input_str)
        if linear_ops.linear_op_of(index, node) is not None or (node.op == "ConcatV2" and port == 0):
            linear, linear_port = node, port
            break
        input_str = next_input(index, node)
        if input_str is None or port != 0:
            raise NoMatch("input comes from %s (%s), not from a supported linear op" % (node.name, node.op))
        nodes.append(node)
    nodes.reverse()
    if linear.op == "ConcatV2":
        return _evaluate_concat(index, linear, nodes)
    try:
        return _evaluate_backward(index, linear, linear_port, nodes)
    except NoMatch as reason:
        raise reached(reason)


@dataclasses.dataclass
class _Path:
    """A linear op and the nodes after it, evaluated down: the Layouts after each node."""
    match: linear_ops.LinearMatch
    nodes: list
    start: grammar.Layout  # the linear op's output
    layouts: list
    steps: list
    scales: list  # (position in nodes, scale vector) of each step
    affine: tuple

    @property
    def end(self):
        return self.layouts[-1] if self.layouts else self.start

    @property
    def bias_after(self):
        """The last node a bias does not commute with (a Cast); -1: none, right after the linear op."""
        return max([p for p, n in enumerate(self.nodes)
                    if n.op in grammar.PASS_THROUGHS and not grammar.PASS_THROUGHS[n.op].bias_commutes], default=-1)

    @property
    def bias_layout(self):
        """The Layout of the tensor the new bias is added to."""
        return self.start if self.bias_after < 0 else self.layouts[self.bias_after]


def _evaluate_path(index, linear, linear_port, nodes):
    """The _Path of `linear -> nodes`, each tensor before the last node single-use; None for
    an integer linear op (index arithmetic is not a batch norm)."""
    match = linear_ops.linear_match(index, linear)
    if match.dtype is None or not match.dtype.is_floating:
        return None
    single_use(index, linear, linear_port)
    for node in nodes[:-1]:
        single_use(index, node)
    channels = match.out_channels or _channels_from_steps(index, nodes)
    if channels is None:
        raise NoMatch("kernel %s of %s is not constant" % (match.kernel_input, linear.name))
    start = grammar.Layout(rank=match.spec.rank, channel=_channel(match), channels=channels, dtype=match.dtype)
    path = _Path(match, nodes, start, [], [], [], (np.ones(channels), np.zeros(channels)))
    _evaluate_nodes(index, path, start)
    return path


def _step_affine(index, node, layout):
    """(scale, shift) of a step whose data has `layout`; NoMatch if it computes in another dtype."""
    if graph_lib.node_dtype(node) != layout.dtype:
        raise NoMatch("%s %s computes in %s, the chain in %s" % (
            node.op, node.name, graph_lib.node_dtype(node).name, layout.dtype.name))
    return grammar.STEPS[node.op].affine(index, node, layout)


def _evaluate_nodes(index, path, layout):
    """Applies path.nodes' rules down from `layout`, filling in layouts, steps and the affine."""
    for position, node in enumerate(path.nodes):
        if node.op in grammar.STEPS:
            step = _step_affine(index, node, layout)
            path.affine = fold_math.compose_affine(path.affine, step)
            path.steps.append(node)
            path.scales.append((position, step[0]))
        else:
            layout = grammar.PASS_THROUGHS[node.op].down(index, node, layout)
        path.layouts.append(layout)


def _evaluate_backward(index, linear, linear_port, nodes):
    root = nodes[-1]
    path = _evaluate_path(index, linear, linear_port, nodes)
    if path is None:
        return None
    check_positive_scales(nodes, path.scales, forward=False)
    chain = Chain(forward=False, match=path.match, root=root, nodes=nodes, steps=path.steps, scale=path.affine[0],
                  shift=path.affine[1], bias_after=path.bias_after, bias_layout=path.bias_layout)
    moved_past = [n for n in nodes[chain.bias_after + 1:-1] if is_kept(n)]
    if path.steps == [root] and not moved_past and (
            root.op == "BiasAdd" or (root.op in ("Add", "AddV2") and linear_ops.misfused_by_remapper(
                index, root.name, chain.bias_layout.rank in (4, 5) and chain.bias_layout.channel == 1))):
        return None  # already the canonical bias after its linear op (or the remapper-safe Add)
    _check_kernel_for(chain)
    return chain


def _check_kernel_for(chain):
    match = chain.match
    if match.kernel_const is None and np.any(chain.scale != 1.0):
        raise NoMatch("kernel %s of %s is not constant" % (match.kernel_input, match.linear.name))


def _evaluate_concat(index, concat, trunk):
    """The Chain of `ConcatV2(branches along the channels) -> trunk`: one sub-Chain per concat
    input, each from its own linear op, with its slice of the trunk's scale and shift."""
    root = trunk[-1]
    inputs = grammar.data_inputs(concat)
    axis = index.const_value(inputs[-1])
    if axis is None:
        raise NoMatch("ConcatV2 %s has no constant axis" % concat.name)
    paths = []
    for input_str in inputs[:-1]:
        nodes, (node, port) = [], index.producer(input_str)
        while node is not None and linear_ops.linear_op_of(index, node) is None:
            if next_input(index, node) is None or port != 0:
                raise NoMatch("input comes from %s (%s), not from a supported linear op" % (node.name, node.op))
            nodes.append(node)
            node, port = index.producer(next_input(index, node))
        if node is None:
            raise NoMatch("input %s has no producer in the graph" % input_str)
        try:
            nodes.reverse()
            single_use(index, nodes[-1] if nodes else node, 0 if nodes else port)
            path = _evaluate_path(index, node, port, nodes)
        except NoMatch as reason:
            raise reached(NoMatch("input %s of ConcatV2 %s: %s" % (input_str, concat.name, reason)))
        if path is None:
            return None
        paths.append(path)
    try:
        return _split_concat(index, concat, trunk, root, int(np.reshape(axis, ())), paths)
    except NoMatch as reason:
        raise reached(reason)


def _split_concat(index, concat, trunk, root, axis, paths):
    ends = {(p.end.rank, p.end.channel, p.end.dtype) for p in paths}
    rank, channel, dtype = next(iter(ends))
    if len(ends) != 1 or rank is None or axis % rank != channel:
        raise NoMatch("ConcatV2 %s does not join its inputs along their channels" % concat.name)
    single_use(index, concat)
    for node in trunk[:-1]:
        single_use(index, node)
    widths = [p.end.channels for p in paths]
    total = sum(widths)
    trunk_path = _Path(None, trunk, None, [], [], [], (np.ones(total), np.zeros(total)))
    if trunk_path.bias_after >= 0:
        raise NoMatch("a Cast after ConcatV2 %s would leave the new biases in the narrower type" % concat.name)
    _evaluate_nodes(index, trunk_path, grammar.Layout(rank=rank, channel=channel, channels=total, dtype=dtype))
    check_positive_scales(trunk, trunk_path.scales, forward=False)
    branches, offset = [], 0
    for path, width in zip(paths, widths):
        part = slice(offset, offset + width)
        offset += width
        scale, shift = fold_math.compose_affine(path.affine, (trunk_path.affine[0][part], trunk_path.affine[1][part]))
        crossing = path.scales + [(len(path.nodes) + p, s[part]) for p, s in trunk_path.scales]
        check_positive_scales(path.nodes, crossing, forward=False)
        branch = Chain(forward=False, match=path.match, root=None, nodes=path.nodes, steps=path.steps, scale=scale,
                       shift=shift, bias_after=path.bias_after, bias_layout=path.bias_layout)
        _check_kernel_for(branch)
        branches.append(branch)
    chain = Chain(forward=False, match=branches[0].match, root=root, nodes=trunk, steps=trunk_path.steps,
                  scale=trunk_path.affine[0], shift=trunk_path.affine[1])
    chain.concat, chain.branches = concat, branches
    return chain


def walk_forward(index, linear):
    """The Chain `x -> ... -> linear` feeding a linear op's data input, None when there is none
    (and the (node, reason) where the walk stopped, for the report); raises NoMatch for a chain
    that cannot fold."""
    spec = grammar.LINEAR_OPS[linear.op]
    match = linear_ops.linear_match(index, linear)
    if (match.kernel_const is None or not match.dtype or not match.dtype.is_floating
            or (spec.input_transpose_attr is not None and linear.attr[spec.input_transpose_attr].b)):
        return None, None
    layout = grammar.Layout(rank=spec.rank, channel=_channel(match), channels=match.in_channels, dtype=match.dtype)
    out_layout = layout.replace(channels=match.out_channels)
    nodes, steps_up, stop = [], [], None  # walked upward
    input_str = grammar.data_inputs(linear)[spec.data_input]
    while True:
        node, port = index.producer(input_str)
        if node is None or port != 0 or next_input(index, node) is None:
            break
        try:
            single_use(index, node)
            if node.op in grammar.STEPS:
                steps_up.append((len(nodes), _step_affine(index, node, layout)))
            else:
                rule = grammar.PASS_THROUGHS[node.op]
                if rule.up is None:
                    break
                layout = rule.up(index, node, layout)
        except NoMatch as reason:
            stop = (node, detached(reason))
            break
        nodes.append(node)
        input_str = next_input(index, node)
    while nodes and nodes[-1].op not in grammar.STEPS:  # pass-throughs above the first step stay as they are
        nodes.pop()
    if not steps_up:
        return None, stop
    x = next_input(index, nodes[-1])
    nodes.reverse()
    positions = {len(nodes) - 1 - p: step for p, step in steps_up}
    if not any(grammar.STEPS[nodes[p].op].scales for p in positions):
        # A bias alone belongs to the linear op before it, if there is one.
        above, _ = index.skip_identities(x)
        if above is None or linear_ops.linear_op_of(index, above) is not None:
            return None, None
    channels = match.in_channels
    affine = (np.ones(channels), np.zeros(channels))
    for p in sorted(positions):
        affine = fold_math.compose_affine(affine, positions[p])
    chain = Chain(forward=True, match=match, root=linear, nodes=nodes, steps=[nodes[p] for p in sorted(positions)],
                  scale=affine[0], shift=affine[1], x=x, out_layout=out_layout)
    chain.step_scales = [(p, positions[p][0]) for p in positions]
    consumers = index.data_consumers(linear.name)
    if len(consumers) == 1 and not index.is_output(linear.name):
        consumer = index.node(consumers[0][0])
        old = index.const_value(consumer.input[1]) if consumer.op == "BiasAdd" else None
        if old is not None and np.shape(old) == (match.out_channels,):
            chain.merge_into, chain.merge_value = consumer, np.asarray(old, np.float64)
    return chain, None
