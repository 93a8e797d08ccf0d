"""The one walker and the one fold-and-emit path of every fold pass.

walk_backward(index, root) finds the chain `linear op -> ... -> root` that ends at a step
(the node the fold replaces), walk_forward(index, linear) the chain `x -> ... -> linear op`
that feeds a linear op (the node it replaces). Both follow input edges through
grammar.STEPS and grammar.PASS_THROUGHS, check once that every tensor inside the chain has
exactly one consumer, and compose the chain's steps into one `x * scale + shift`.

fold_weights computes the new kernel and bias once, refusing (NoMatch) a fold whose numbers
are not finite or would overflow the dtype they are stored in; emit writes them: new Const
nodes (the old weights are left to any other user and to cleanup), and the replaced node
keeps its name, so its consumers and any signature output that names it are unchanged.
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
        return ([n.name for b in self.branches for n in b.nodes if not _is_kept(n)]
                + [n.name for n in self.nodes if n is not named and not _is_kept(n)])


def _is_kept(node):
    """A pass-through that stays in the data path (not absorbed, not a step)."""
    rule = grammar.PASS_THROUGHS.get(node.op)
    return rule is not None and not rule.absorbed


def single_use(index, node, port=0):
    uses = index.use_count(node.name, port)
    if uses != 1:
        extra = " (one is a graph output)" if index.is_output(node.name, port) else ""
        raise NoMatch("%s has %d consumers%s; folding would change the others" % (
            graph_lib.tensor_name(node.name, port), uses, extra))


def _detached(reason):
    """A NoMatch kept for the report, without its traceback and context: those hold the
    frames of the walk and of the pass (its GraphIndex, the whole input graph) in a
    reference cycle, which only the cyclic collector would free, and it is paused while
    the passes run (pipeline._cyclic_gc_paused)."""
    reason.__traceback__ = reason.__context__ = reason.__cause__ = None
    return reason


def _reached(reason):
    reason.reached_linear = True
    return reason


def _next_input(index, node):
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


def _check_positive_scales(nodes, scales, forward):
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
    nodes, input_str = [root], _next_input(index, root)  # walked upward
    while True:
        node, port = index.producer(input_str)
        if node is None:
            raise NoMatch("input %s has no producer in the graph" % input_str)
        if linear_ops.linear_op_of(index, node) is not None or (node.op == "ConcatV2" and port == 0):
            linear, linear_port = node, port
            break
        input_str = _next_input(index, node)
        if input_str is None or port != 0:
            raise NoMatch("input comes from %s (%s), not from a supported linear op" % (node.name, node.op))
        nodes.append(node)
    nodes.reverse()
    if linear.op == "ConcatV2":
        return _evaluate_concat(index, linear, nodes)
    try:
        return _evaluate_backward(index, linear, linear_port, nodes)
    except NoMatch as reason:
        raise _reached(reason)


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
    rank = match.spec.rank
    start = grammar.Layout(rank=rank, channel=match.channel_axis % rank, channels=channels, dtype=match.dtype)
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
    _check_positive_scales(nodes, path.scales, forward=False)
    chain = Chain(forward=False, match=path.match, root=root, nodes=nodes, steps=path.steps, scale=path.affine[0],
                  shift=path.affine[1], bias_after=path.bias_after, bias_layout=path.bias_layout)
    moved_past = [n for n in nodes[chain.bias_after + 1:-1] if _is_kept(n)]
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
            if _next_input(index, node) is None or port != 0:
                raise NoMatch("input comes from %s (%s), not from a supported linear op" % (node.name, node.op))
            nodes.append(node)
            node, port = index.producer(_next_input(index, node))
        if node is None:
            raise NoMatch("input %s has no producer in the graph" % input_str)
        try:
            nodes.reverse()
            single_use(index, nodes[-1] if nodes else node, 0 if nodes else port)
            path = _evaluate_path(index, node, port, nodes)
        except NoMatch as reason:
            raise _reached(NoMatch("input %s of ConcatV2 %s: %s" % (input_str, concat.name, reason)))
        if path is None:
            return None
        paths.append(path)
    try:
        return _split_concat(index, concat, trunk, root, int(np.reshape(axis, ())), paths)
    except NoMatch as reason:
        raise _reached(reason)


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
    _check_positive_scales(trunk, trunk_path.scales, forward=False)
    branches, offset = [], 0
    for path, width in zip(paths, widths):
        part = slice(offset, offset + width)
        offset += width
        scale, shift = fold_math.compose_affine(path.affine, (trunk_path.affine[0][part], trunk_path.affine[1][part]))
        crossing = path.scales + [(len(path.nodes) + p, s[part]) for p, s in trunk_path.scales]
        _check_positive_scales(path.nodes, crossing, forward=False)
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
            or (linear.op == "MatMul" and linear.attr["transpose_a"].b)):
        return None, None
    rank = spec.rank
    layout = grammar.Layout(rank=rank, channel=match.channel_axis % rank, channels=match.in_channels,
                            dtype=match.dtype)
    out_layout = layout.replace(channels=match.out_channels)
    nodes, steps_up, stop = [], [], None  # walked upward
    input_str = grammar.data_inputs(linear)[spec.data_input]
    while True:
        node, port = index.producer(input_str)
        if node is None or port != 0 or _next_input(index, node) is None:
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
            stop = (node, _detached(reason))
            break
        nodes.append(node)
        input_str = _next_input(index, node)
    while nodes and nodes[-1].op not in grammar.STEPS:  # pass-throughs above the first step stay as they are
        nodes.pop()
    if not steps_up:
        return None, stop
    x = _next_input(index, nodes[-1])
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


@dataclasses.dataclass
class FoldedWeights:
    """The new kernel (None when the scale is all ones: a shift leaves it as it is) and bias."""
    kernel: Optional[np.ndarray]
    bias: np.ndarray
    bias_dtype: object  # tf.DType of the new bias


def check_representable(values, dtype, what):
    values = np.asarray(values)
    if values.size:
        # max and min propagate NaN and show +-Inf, with no temporary array
        check_extremes(float(values.max()), float(values.min()), dtype, what)


def check_extremes(high, low, dtype, what):
    """NoMatch unless values whose max and min these are fit `dtype` (a tf.DType), finite."""
    if not (np.isfinite(high) and np.isfinite(low)):
        raise NoMatch("the folded %s would hold NaN or Inf" % what)
    limit = float(dtype.max) if dtype.is_floating else None  # tf.DType knows bfloat16; np.finfo does not
    if limit is not None and max(high, -low) > limit:
        raise NoMatch("the folded %s would overflow %s" % (what, dtype.name))


def fold_weights(chain):
    """The FoldedWeights of a Chain (a list of them, one per branch, across a ConcatV2),
    computed once for check and emit; NoMatch when a number is not finite or would overflow
    the dtype it is stored in (a float16 conv whose float32 batch norm scales past 65504)."""
    if chain.concat is not None:
        return [fold_weights(branch) for branch in chain.branches]
    match = chain.match
    if not (np.all(np.isfinite(chain.scale)) and np.all(np.isfinite(chain.shift))):
        raise NoMatch("NaN or Inf in its scale or shift")
    ones = bool(np.all(chain.scale == 1.0))
    kernel = None
    if chain.forward:
        new_kernel, bias = fold_math.fold_affine_into_next_linear(
            match.kernel, chain.scale, chain.shift, match.in_channel_axis, match.out_channel_axes)
        if chain.merge_value is not None:
            bias = bias + chain.merge_value
        bias_dtype = match.dtype
        if not ones:
            kernel = new_kernel
            check_representable(kernel, match.dtype, "kernel of " + match.linear.name)
    else:
        if not ones:  # rounded to the kernel's dtype as it is computed: kernels are big
            kernel, (high, low) = fold_math.scale_kernel_as(match.kernel, chain.scale, match.out_channel_axes,
                                                            match.dtype.as_numpy_dtype)
            check_extremes(high, low, match.dtype, "kernel of " + match.linear.name)
        bias, bias_dtype = chain.shift, chain.bias_layout.dtype
    check_representable(bias, bias_dtype, "bias of " + match.linear.name)
    return FoldedWeights(kernel, bias, bias_dtype)


def _set_data_input(editor, name, position, new_input):
    node = editor.node(name)
    data_positions = [i for i, s in enumerate(node.input) if not s.startswith("^")]
    node.input[data_positions[position]] = new_input


def emit(editor, index, chain, folded):
    """Writes a fold (what fold_weights returned for it) into `editor`."""
    if chain.concat is not None:
        _emit_concat(editor, index, chain, folded)
        return
    _emit_kernel(editor, chain, folded)
    if chain.forward:
        _emit_forward(editor, index, chain, folded)
    else:
        _emit_backward(editor, index, chain, folded)


def _emit_kernel(editor, chain, folded):
    match = chain.match
    if folded.kernel is not None:
        kernel = editor.add_const(match.kernel_const + ("_forward_folded" if chain.forward else "_bn_folded"),
                                  folded.kernel, match.dtype)
        _set_data_input(editor, match.linear.name, match.spec.kernel_input, kernel)


def _write_path(editor, chain, nodes, folded, bias_written_here):
    """Rewires the kept pass-throughs of `nodes` to read the linear op in turn, writing the new
    bias after nodes[chain.bias_after] (-1: right after the linear op) when bias_written_here;
    returns the name of the last tensor."""
    linear = chain.match.linear.name

    def with_bias(anchor):
        if not bias_written_here:
            return anchor
        name = editor.unique_name(linear + "/bias_folded")
        linear_ops.bias_node(editor, name, anchor, folded.bias, linear + "/bias_bn_folded", folded.bias_dtype,
                             chain.bias_layout, replace=False)
        return name

    previous = with_bias(linear) if chain.bias_after < 0 else linear
    for position, node in enumerate(nodes):
        if _is_kept(node):
            _set_data_input(editor, node.name, 0, previous)
            previous = node.name
            if position == chain.bias_after:
                previous = with_bias(previous)
    return previous


def _emit_backward(editor, index, chain, folded):
    """The kept pass-throughs read the linear op in turn; the new bias goes after the last
    of them that a bias does not commute with (a Cast), else right after the linear op
    (where TFLite fuses it: before a Dense's Reshape, inside SpaceToBatchND -> conv ->
    BatchToSpaceND). The root becomes that bias, or an Identity of the last kept op."""
    between = chain.nodes[:-1]
    if any(_is_kept(n) for n in between[chain.bias_after + 1:]):
        last = _write_path(editor, chain, between, folded, bias_written_here=True)
        editor.replace_node(chain.root.name, "Identity", [last],
                            {"T": graph_lib.type_attr(graph_lib.node_dtype(chain.root))})
    else:
        last = _write_path(editor, chain, between, folded, bias_written_here=False)
        linear_ops.bias_node(editor, chain.root.name, last, folded.bias, chain.match.linear.name + "/bias_bn_folded",
                             folded.bias_dtype, chain.bias_layout, index)


def _emit_concat(editor, index, chain, folded_branches):
    """Each branch gets its folded kernel and its bias before the ConcatV2, which reads them;
    the trunk's kept pass-throughs read the concat in turn, and the root becomes an Identity."""
    concat = editor.node(chain.concat.name)
    data_positions = [i for i, s in enumerate(concat.input) if not s.startswith("^")]
    for position, branch, folded in zip(data_positions, chain.branches, folded_branches):
        _emit_kernel(editor, branch, folded)
        concat.input[position] = _write_path(editor, branch, branch.nodes, folded, bias_written_here=True)
    previous = chain.concat.name
    for node in chain.nodes[:-1]:
        if _is_kept(node):
            _set_data_input(editor, node.name, 0, previous)
            previous = node.name
    editor.replace_node(chain.root.name, "Identity", [previous],
                        {"T": graph_lib.type_attr(graph_lib.node_dtype(chain.root))})


def _emit_forward(editor, index, chain, folded):
    """The kept pass-throughs read x in turn, the linear op the last of them; the added bias
    merges into the BiasAdd after the linear op, or a new BiasAdd takes the linear op's name
    (the op is renamed), so its consumers and any output naming it are unchanged."""
    match = chain.match
    linear = match.linear.name
    previous = chain.x
    for node in chain.nodes:
        if _is_kept(node):
            _set_data_input(editor, node.name, 0, previous)
            previous = node.name
    _set_data_input(editor, linear, match.spec.data_input, previous)
    if not np.any(chain.shift != 0):
        return  # a scale alone: the kernel says it all
    if chain.merge_into is not None:
        _set_data_input(editor, chain.merge_into.name, 1, editor.add_const(
            linear + "/bias_forward_folded", folded.bias, folded.bias_dtype))
        return
    new_name = editor.unique_name(linear + "/forward_folded")
    editor.rename_node(linear, new_name)
    linear_ops.bias_node(editor, linear, new_name, folded.bias, linear + "/bias_forward_folded", folded.bias_dtype,
                         chain.out_layout, index, replace=False)


# ---------------------------------------------------------------------------------------------
# The drivers the fold passes share
# ---------------------------------------------------------------------------------------------

def fold_backward(graph_def, outputs, pass_name, root_ops, report_every_root):
    """Folds every chain `linear op -> ... -> root` whose root op is in root_ops; returns
    (graph_def, PassReport).

    Each live root is walked; of the chains that end at one linear op (they nest: every
    tensor inside one has one consumer), the longest folds. A root that cannot fold is
    reported when report_every_root, when it scales (Mul, RealDiv: a batch norm's scale left
    in place), or when its walk had reached a linear op; other Adds of a constant (a
    positional embedding after an activation, say) are simply not chains.
    """
    index = graph_lib.index_of(graph_def, outputs)
    editor = graph_lib.GraphEditor(graph_def, outputs)
    report = report_lib.PassReport(pass_name, nodes_before=len(graph_def.node))
    longest, failures = {}, []
    for node in graph_def.node:
        if node.op not in root_ops or node.name not in index.live:
            continue
        try:
            found = walk_backward(index, node)
        except NoMatch as reason:
            failures.append((node, _detached(reason)))
            continue
        if found is not None:
            if found.key not in longest or len(found.nodes) > len(longest[found.key].nodes):
                longest[found.key] = found
    covered = {n.name for found in longest.values() for n in found.nodes}
    for found in longest.values():
        try:
            folded = fold_weights(found)
        except NoMatch as reason:
            failures.append((found.root, _detached(_reached(reason))))
            continue
        emit(editor, index, found, folded)
        report.folds.append(report_lib.Fold(found.root.name, found.root.op, *found.linear_description,
                                            absorbed=found.absorbed))
    if report_every_root:
        report.skips.extend(unreached_in_functions(index))
    failed = {node.name: str(reason) for node, reason in failures}
    for node, reason in failures:
        if node.name in covered and not any(found.root is node for found in longest.values()):
            continue  # part of a longer chain that folded
        if failed.get(_step_above(index, node)) == str(reason):
            continue  # the step above failed the same way (a Keras batch norm's Add after its Mul)
        if report_every_root or reason.reached_linear or grammar.STEPS[node.op].scales:
            report.skips.append(report_lib.Skip(node.name, node.op, str(reason)))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report


def _check_forward(found):
    """What a forward chain must also satisfy: MaxPools see positive scales, and a shift
    reaches the linear op's output as a per-channel constant."""
    _check_positive_scales(found.nodes, found.step_scales, forward=True)
    linear = found.match.linear
    blocked = found.match.spec.shift_blocked(linear, found.match.kernel_shape) if np.any(found.shift != 0) else None
    if blocked:
        raise NoMatch("feeds %s %s, which %s" % (linear.op, linear.name, blocked))


def unreached_in_functions(index):
    """Skips for the function calls (While/If bodies and branches, calls) whose functions still
    hold a linear op and a batch norm (or the Rsqrt of one computed from its variables) after
    fold_in_functions.

    One Skip per live calling node. A call that computes one linear op and nothing else is
    itself a linear op (linear_ops.linear_op_of) and is not listed.
    """
    skips = []
    for node in index.graph_def.node:
        if node.name not in index.live or linear_ops.linear_op_of(index, node) is not None:
            continue
        names = graph_lib.called_function_names(node)
        if not names:
            continue
        linear, affine, seen = 0, 0, set()
        while names:
            function = index.function(names.pop())
            if function is None or function.signature.name in seen:
                continue
            seen.add(function.signature.name)
            for inner in function.node_def:
                linear += inner.op in grammar.LINEAR_OPS
                # Rsqrt: a batch norm computed from its variables (Keras 3, tf.nn.batch_normalization)
                affine += inner.op in grammar.BATCH_NORM_OPS or inner.op == "Rsqrt"
                names += graph_lib.called_function_names(inner)
        if linear and affine:
            skips.append(report_lib.Skip(node.name, node.op, (
                "its functions (%s) still hold %d linear ops and %d batch norms: only the body or branch of one "
                "While/If whose kernel is a constant or loop-invariant argument is folded (fold_in_functions)" % (
                    ", ".join(sorted(seen)), linear, affine))))
    return skips


def _step_above(index, node):
    """The name of the step a step reads, through pass-throughs; None if there is none."""
    above, _ = index.producer(grammar.STEPS[node.op].data_input(index, node))
    while above is not None and above.op in grammar.PASS_THROUGHS:
        above, _ = index.producer(grammar.data_inputs(above)[0])
    return above.name if above is not None and above.op in grammar.STEPS else None


def fold_forward(graph_def, outputs, pass_name):
    """Folds every chain `x -> ... -> linear op` into the linear op; returns (graph_def, PassReport).

    A chain that cannot fold is reported at its step nearest the linear op; a walk stopped
    by a batch norm or scaling step that cannot be passed is reported at that step.
    """
    index = graph_lib.index_of(graph_def, outputs)
    editor = graph_lib.GraphEditor(graph_def, outputs)
    report = report_lib.PassReport(pass_name, nodes_before=len(graph_def.node))
    for linear in graph_def.node:
        if linear.op not in grammar.LINEAR_OPS or linear.name not in index.live:
            continue
        data_input = grammar.data_inputs(linear)[grammar.LINEAR_OPS[linear.op].data_input]
        head, _ = index.skip_identities(data_input)
        if head is None or _next_input(index, head) is None:
            continue  # the common case, decided without reading the kernel
        try:
            found, stop = walk_forward(index, linear)
            if found is None:
                if stop is not None and grammar.STEPS.get(stop[0].op, _NOT_A_STEP).scales:
                    report.skips.append(report_lib.Skip(stop[0].name, stop[0].op, str(stop[1])))
                continue
            head = found.near_linear
            _check_forward(found)
            folded = fold_weights(found)
        except NoMatch as reason:
            report.skips.append(report_lib.Skip(head.name, head.op, str(reason)))
            continue
        emit(editor, index, found, folded)
        report.folds.append(report_lib.Fold(head.name, head.op, linear.name, linear.op, found.absorbed))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report


_NOT_A_STEP = grammar.Step(None, None, scales=False)
