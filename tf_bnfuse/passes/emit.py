"""The one fold-and-emit path of every fold pass.

fold_weights computes the new kernel and bias of a Chain once, refusing (NoMatch) a fold
whose numbers are not finite or would overflow the dtype they are stored in; emit writes
them: new Const nodes (the old weights are left to any other user and to cleanup), and the
replaced node keeps its name, so its consumers and any signature output that names it are
unchanged.
"""

import dataclasses
from typing import Optional

import numpy as np

from tf_bnfuse import fold_math
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.passes.chain import is_kept
from tf_bnfuse.passes import linear_ops
from tf_bnfuse.passes.grammar import NoMatch


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


def fold_weights(chain, new_array=np.empty):
    """The FoldedWeights of a Chain (a list of them, one per branch, across a ConcatV2),
    computed once for check and emit; NoMatch when a number is not finite or would overflow
    the dtype it is stored in (a float16 conv whose float32 batch norm scales past 65504).
    new_array(shape, dtype): where a scaled kernel is written (the store's WeightStore.new_array,
    which the store then holds without a copy)."""
    if chain.concat is not None:
        return [fold_weights(branch, new_array) for branch in chain.branches]
    match = chain.match
    if not (np.all(np.isfinite(chain.scale)) and np.all(np.isfinite(chain.shift))):
        raise NoMatch("NaN or Inf in its scale or shift")
    ones = bool(np.all(chain.scale == 1.0))
    kernel = None
    if chain.forward:
        if ones:  # a shift alone: the kernel stays
            bias = fold_math.shift_through(match.kernel, chain.shift, match.in_channel_axis, match.out_channel_axes)
        else:  # rounded to the kernel's dtype as it is computed, as backward
            kernel, bias, (high, low) = fold_math.fold_affine_into_next_linear(
                match.kernel, chain.scale, chain.shift, match.in_channel_axis, match.out_channel_axes,
                match.dtype.as_numpy_dtype, out=new_array(np.shape(match.kernel), match.dtype.as_numpy_dtype))
            check_extremes(high, low, match.dtype, "kernel of " + match.linear.name)
        if chain.merge_value is not None:
            bias = bias + chain.merge_value
        bias_dtype = match.dtype
    else:
        if not ones:  # rounded to the kernel's dtype as it is computed: kernels are big
            kernel, (high, low) = fold_math.scale_kernel_as(
                match.kernel, chain.scale, match.out_channel_axes, match.dtype.as_numpy_dtype,
                out=new_array(np.shape(match.kernel), match.dtype.as_numpy_dtype))
            check_extremes(high, low, match.dtype, "kernel of " + match.linear.name)
        bias, bias_dtype = chain.shift, chain.bias_layout.dtype
    check_representable(bias, bias_dtype, "bias of " + match.linear.name)
    return FoldedWeights(kernel, bias, bias_dtype)


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
        # The old kernel's copy goes first, not at the pass's end: one kernel is held twice at a
        # time; and the old kernel itself where nothing else reads it (WeightStore.releases), so
        # that the new one can take its memory.
        old = match.index.node(match.kernel_const)
        control_edges = match.index.only_reader(old.name, match.linear.name)
        if control_edges is not None and editor.releases_weights:
            for consumer, source in control_edges:  # so that nothing keeps the old kernel's Const
                editor.drop_control_input(consumer, source)
        editor.forget_read(old, last_reader=control_edges is not None)
        kernel = editor.add_const(match.kernel_const + ("_forward_folded" if chain.forward else "_bn_folded"),
                                  folded.kernel, match.dtype)
        editor.set_data_input(match.linear.name, match.spec.kernel_input, kernel)


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
        if is_kept(node):
            editor.set_data_input(node.name, 0, previous)
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
    if any(is_kept(n) for n in between[chain.bias_after + 1:]):
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
    for position, branch, folded in zip(graph_lib.data_positions(concat), chain.branches, folded_branches):
        _emit_kernel(editor, branch, folded)
        concat.input[position] = _write_path(editor, branch, branch.nodes, folded, bias_written_here=True)
    previous = chain.concat.name
    for node in chain.nodes[:-1]:
        if is_kept(node):
            editor.set_data_input(node.name, 0, previous)
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
        if is_kept(node):
            editor.set_data_input(node.name, 0, previous)
            previous = node.name
    editor.set_data_input(linear, match.spec.data_input, previous)
    if not np.any(chain.shift != 0):
        return  # a scale alone: the kernel says it all
    if chain.merge_into is not None:
        editor.set_data_input(chain.merge_into.name, 1, editor.add_const(
            linear + "/bias_forward_folded", folded.bias, folded.bias_dtype))
        return
    new_name = editor.unique_name(linear + "/forward_folded")
    editor.rename_node(linear, new_name)
    linear_ops.bias_node(editor, linear, new_name, folded.bias, linear + "/bias_forward_folded", folded.bias_dtype,
                         chain.out_layout, index, replace=False)
