"""The linear ops a per-channel affine map folds into, and the matcher that
finds one by walking input edges up from the tensor an affine op consumes."""

import dataclasses
from typing import List, Optional

import numpy as np

from tf_bnfuse import fold_math
from tf_bnfuse import graph as graph_lib


@dataclasses.dataclass(frozen=True)
class LinearOpSpec:
    kernel_input: int
    rank: int  # rank of the op's output
    # Kernel axes whose row-major flattening numbers the output channels.
    out_channel_axes: tuple
    out_channel_axes_transposed: Optional[tuple] = None  # MatMul with transpose_b


LINEAR_OPS = {
    "Conv2D": LinearOpSpec(kernel_input=1, rank=4, out_channel_axes=(3,)),
    # Output channel c * multiplier + m comes from kernel[:, :, c, m].
    "DepthwiseConv2dNative": LinearOpSpec(kernel_input=1, rank=4, out_channel_axes=(2, 3)),
    "Conv3D": LinearOpSpec(kernel_input=1, rank=5, out_channel_axes=(4,)),
    # Transposed convolutions: the kernel is [.., out_channels, in_channels].
    "Conv2DBackpropInput": LinearOpSpec(kernel_input=1, rank=4, out_channel_axes=(2,)),
    "Conv3DBackpropInputV2": LinearOpSpec(kernel_input=1, rank=5, out_channel_axes=(3,)),
    "MatMul": LinearOpSpec(kernel_input=1, rank=2, out_channel_axes=(1,),
                           out_channel_axes_transposed=(0,)),
}

# A call whose function computes one of the ops above from its arguments, and nothing else,
# folds like that op: its kernel argument gets the folded kernel, the new bias goes after the
# call, and the function (a Keras grouped convolution's jit_compile function: TF's CPU
# Conv2D has no grouped kernel, so it must stay compiled by XLA) is left as it is.
CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
_CALL_PLUMBING = frozenset({"Identity", "NoOp"})

BIAS_OPS = frozenset({"BiasAdd", "Add", "AddV2"})
# Ops that only move elements of channel-last data and keep each element's
# channel: a per-channel affine map commutes with them, so the fold scales the
# kernel and the new bias goes after them (they stay). A dilated convolution
# is lowered to SpaceToBatchND -> conv -> BatchToSpaceND; Keras' Dense on
# rank > 2 reshapes around a MatMul. A Reshape qualifies when its target's
# last dimension is the channel count: row-major order then keeps element i in
# channel i mod channels.
CHANNEL_PRESERVING_OPS = frozenset({"BatchToSpaceND", "Reshape"})


def keeps_channels_last(index, node, channels):
    """Whether node (in CHANNEL_PRESERVING_OPS) maps channel-last data of `channels` to channel-last data."""
    if node.op == "BatchToSpaceND":
        return True
    if node.op == "Reshape":
        return static_last_element(index, [i for i in node.input if not i.startswith("^")][1]) == channels
    return False


def static_last_element(index, input_str):
    """The last element of a 1-D int tensor when it is fixed, else None.

    A constant, or a ConcatV2 / Pack whose last part is constant: Keras
    computes a Reshape's target as Concat(Shape(x)[:-1], [units]).
    """
    value = index.const_value(input_str)
    if value is not None:
        return int(value[-1]) if np.ndim(value) == 1 and len(value) else None
    node, _ = index.skip_identities(input_str)
    if node is None:
        return None
    data_inputs = [i for i in node.input if not i.startswith("^")]
    if node.op == "ConcatV2" and len(data_inputs) >= 2:
        axis = index.const_value(data_inputs[-1])
        if axis is None or int(np.reshape(axis, ())) not in (0, -1):
            return None
        return static_last_element(index, data_inputs[-2])
    if node.op == "Pack" and data_inputs:
        last = index.const_value(data_inputs[-1])
        return int(np.reshape(last, ())) if last is not None and np.size(last) == 1 else None
    return None


def _called_linear(index, node):
    """(linear op NodeDef in the function, call input of its kernel) for a call that computes
    one linear op of its arguments, or None."""
    if node.op not in CALL_OPS or not node.attr["f"].HasField("func"):
        return None
    function = index.function(node.attr["f"].func.name)
    if function is None or len(function.signature.output_arg) != 1:
        return None
    arguments = {a.name: i for i, a in enumerate(function.signature.input_arg)}
    by_name = {n.name: n for n in function.node_def}

    def source(input_str):
        """The node or argument a function-body input reads, through Identities; None off port 0."""
        name, _, rest = input_str.partition(":")
        while name in by_name and by_name[name].op == "Identity":
            if rest not in ("", "output:0"):
                return None
            name, _, rest = by_name[name].input[0].partition(":")
        return name if rest in ("", "output:0") else None

    linear = by_name.get(source(function.ret[function.signature.output_arg[0].name]))
    if linear is None or linear.op not in LINEAR_OPS:
        return None
    if any(n.op not in _CALL_PLUMBING for n in function.node_def if n is not linear):
        return None
    data = [i for i in linear.input if not i.startswith("^")]
    kernel_argument = arguments.get(source(data[LINEAR_OPS[linear.op].kernel_input]))
    if kernel_argument is None or source(data[0]) not in arguments:
        return None
    return linear, kernel_argument


def linear_op_of(index, node):
    """(LinearOpSpec, the NodeDef whose attributes describe the op) of a linear op, or of a
    call that computes one (CALL_OPS); None for anything else."""
    if node.op in LINEAR_OPS:
        return LINEAR_OPS[node.op], node
    called = _called_linear(index, node)
    if called is None:
        return None
    linear, kernel_argument = called
    return dataclasses.replace(LINEAR_OPS[linear.op], kernel_input=kernel_argument), linear


def channel_axis(node, rank):
    """Output channel axis of a linear op from its data_format: -1 or 1."""
    data_format = graph_lib.attr_string(node, "data_format", "NHWC")
    return 1 if data_format.startswith("NC") and rank > 2 else -1


@dataclasses.dataclass
class LinearMatch:
    """A linear op, its constant kernel, and the bias between it and the affine op."""
    linear: object  # NodeDef
    spec: LinearOpSpec
    kernel: np.ndarray
    kernel_const: str
    out_channel_axes: tuple
    channel_axis: int
    out_channels: int
    bias: Optional[np.ndarray]  # per-channel float64 vector, or None
    bias_const: Optional[str]
    absorbed: List[str]  # bias and Identity nodes the fold makes dead
    # A channel-preserving op (BatchToSpaceND) between the linear op and the
    # bias: it stays, and the new bias reads it instead of the linear op.
    anchor: Optional[str] = None
    # The node whose attributes describe the op: `linear` itself, or the op inside the
    # function a call (`linear`) computes.
    attrs: object = None

    @property
    def channel_first(self):
        return self.channel_axis == 1

    @property
    def dtype(self):
        return graph_lib.node_dtype(self.attrs)

    @property
    def op_description(self):
        """"Conv2D", or "Conv2D in StatefulPartitionedCall" for a called one (for reports)."""
        if self.attrs is self.linear:
            return self.linear.op
        return "%s in %s" % (self.attrs.op, self.linear.op)


class NoMatch(Exception):
    """The chain above an affine op cannot be folded; the message says why."""


def single_use(index, node, port):
    uses = index.use_count(node.name, port)
    if uses != 1:
        extra = " (one is a graph output)" if index.is_output(node.name, port) else ""
        raise NoMatch("%s has %d consumers%s; folding would change the others" % (
            graph_lib.tensor_name(node.name, port), uses, extra))


def _bias_operand(index, node):
    """(data input, constant input, constant value) of a bias-like node."""
    data_inputs = [i for i in node.input if not i.startswith("^")]
    if node.op == "BiasAdd":
        value = index.const_value(data_inputs[1])
        if value is None:
            raise NoMatch("bias %s of %s is not constant" % (data_inputs[1], node.name))
        return data_inputs[0], data_inputs[1], value
    for const_i, data_i in ((1, 0), (0, 1)):
        value = index.const_value(data_inputs[const_i])
        if value is not None and index.const_value(data_inputs[data_i]) is None:
            return data_inputs[data_i], data_inputs[const_i], value
    raise NoMatch("%s %s does not add a constant" % (node.op, node.name))


def match_linear_chain(index, input_str):
    """Walks up from `input_str` to the linear op that produces it.

    Accepts Identity nodes, at most one bias (BiasAdd, or Add/AddV2 with a
    per-channel constant) and at most one channel-preserving op
    (BatchToSpaceND of a dilated convolution, or a Reshape that keeps the
    channels last) on the way. Every tensor on the way, including the
    linear op's output, must have exactly one consumer. Raises NoMatch with a
    reason when the chain does not qualify.
    """
    absorbed = []
    bias_found = None  # (node, const input, value)
    anchor = None
    node, port = index.producer(input_str)
    while True:
        if node is None:
            raise NoMatch("input %s has no producer in the graph" % input_str)
        data_inputs = [i for i in node.input if not i.startswith("^")]
        is_identity = node.op in ("Identity", "Snapshot") or (node.op == "IdentityN" and len(data_inputs) == 1)
        is_bias = node.op in BIAS_OPS and bias_found is None
        is_kept = node.op in CHANNEL_PRESERVING_OPS and anchor is None
        is_linear = linear_op_of(index, node) is not None
        if not (is_identity or is_bias or is_kept or is_linear):
            raise NoMatch("input comes from %s (%s), not from a supported linear op" % (node.name, node.op))
        single_use(index, node, port)
        if is_linear:
            break
        if is_identity:
            absorbed.append(node.name)
            node, port = index.producer(data_inputs[0])
        elif is_kept:
            anchor = node.name
            node, port = index.producer(data_inputs[0])
        else:
            data_input, const_input, value = _bias_operand(index, node)
            bias_found = (node, const_input, value)
            absorbed.append(node.name)
            node, port = index.producer(data_input)

    match = linear_kernel(index, node)
    if anchor is not None and match.channel_axis != -1:
        raise NoMatch("%s reads %s, whose channels are not last" % (anchor, node.name))
    if anchor is not None and not keeps_channels_last(index, index.node(anchor), match.out_channels):
        raise NoMatch("%s %s does not keep the %d channels of %s last" % (
            index.node(anchor).op, anchor, match.out_channels, node.name))
    if bias_found is not None:
        bias_node, const_input, value = bias_found
        if bias_node.op == "BiasAdd":
            if channel_axis(bias_node, match.spec.rank) != match.channel_axis:
                raise NoMatch("BiasAdd %s data_format does not match %s" % (bias_node.name, node.name))
            # BiasAdd's bias is one value per channel whatever the data_format.
            bias = np.asarray(value, np.float64) if np.shape(value) == (match.out_channels,) else None
        else:
            bias = fold_math.as_channel_vector(value, match.spec.rank, match.channel_axis, match.out_channels)
        if bias is None:
            raise NoMatch("constant %s of %s is not a per-channel vector of %d" % (
                const_input, bias_node.name, match.out_channels))
        match.bias = bias
        match.bias_const = index.const_node(const_input).name
    match.absorbed = absorbed
    match.anchor = anchor
    return match


def linear_kernel(index, node):
    """The LinearMatch of a linear op alone (no bias yet); NoMatch if its kernel is not constant."""
    spec, attrs = linear_op_of(index, node)
    linear_inputs = [i for i in node.input if not i.startswith("^")]
    if attrs.op == "MatMul" and attrs.attr["transpose_b"].b:
        out_axes = spec.out_channel_axes_transposed
    else:
        out_axes = spec.out_channel_axes
    kernel_const = index.const_node(linear_inputs[spec.kernel_input])
    if kernel_const is None:
        raise NoMatch("kernel %s of %s is not constant" % (linear_inputs[spec.kernel_input], node.name))
    kernel = index.const_value(linear_inputs[spec.kernel_input])
    return LinearMatch(linear=node, spec=spec, kernel=kernel, kernel_const=kernel_const.name,
                       out_channel_axes=out_axes, channel_axis=channel_axis(attrs, spec.rank),
                       out_channels=fold_math.out_channel_count(kernel.shape, out_axes),
                       bias=None, bias_const=None, absorbed=[], attrs=attrs)


def _check_representable(values, dtype, what):
    limit = float(dtype.max) if dtype.is_floating else None  # tf.DType knows bfloat16; np.finfo does not
    if limit is not None and np.any(np.abs(values) > limit):
        raise NoMatch("the folded %s would overflow %s" % (what, dtype.name))


@dataclasses.dataclass
class FoldedWeights:
    """The new kernel (None when the scale is all ones: a shift leaves it as it is) and bias."""
    kernel: Optional[np.ndarray]
    bias: np.ndarray
    bias_dtype: object  # tf.DType of the new BiasAdd


def fold_weights(match, scale, shift, bias_dtype=None):
    """The FoldedWeights of `x * scale + shift` after `match`, computed once for check and emit.

    Raises NoMatch when the kernel or bias would overflow the dtype it is
    stored in (a float16 conv whose float32 batch norm scales past 65504).
    bias_dtype: the new BiasAdd's dtype when a Cast stays in between (mixed
    precision); the linear op's dtype otherwise.
    """
    new_kernel, new_bias = fold_math.fold_affine_into_linear(
        match.kernel, match.bias, scale, shift, match.out_channel_axes)
    if np.all(np.asarray(scale) == 1.0):
        new_kernel = None
    else:
        _check_representable(new_kernel, match.dtype, "kernel of " + match.linear.name)
    bias_dtype = bias_dtype or match.dtype
    _check_representable(new_bias, bias_dtype, "bias of " + match.linear.name)
    return FoldedWeights(new_kernel, new_bias, bias_dtype)


# LeakyRelu's default alpha: the one TF's fused kernel uses when the remapper drops the attribute.
_FUSED_LEAKY_RELU_ALPHA = 0.2


def misfused_by_remapper(index, node_name, channel_first):
    """Whether a BiasAdd named node_name would be fused wrongly by TensorFlow's remapper.

    With oneDNN (TF 2.21, on by default on many x86 CPUs), Grappler fuses
    Conv2D -> BiasAdd -> Add -> LeakyRelu into one _FusedConv2D and does not
    carry LeakyRelu's alpha over: the kernel computes with 0.2. Folding a
    batch norm creates exactly that chain from conv -> BN -> residual add ->
    LeakyReLU(0.1). The same bias written as AddV2 of a constant is not
    fused that way (tests/test_remapper_guard.py checks both). Only
    channel-last data: there AddV2 of a [C] vector is what BiasAdd computes.
    """
    if index is None or channel_first:
        return False
    consumers = index.data_consumers(node_name)
    if len(consumers) != 1 or index.is_output(node_name):
        return False
    add = index.node(consumers[0][0])
    if add.op not in ("Add", "AddV2"):
        return False
    after = index.data_consumers(add.name)
    if len(after) != 1:
        return False
    activation = index.node(after[0][0])
    alpha = activation.attr["alpha"].f if "alpha" in activation.attr else _FUSED_LEAKY_RELU_ALPHA
    return activation.op == "LeakyRelu" and not np.isclose(alpha, _FUSED_LEAKY_RELU_ALPHA)


def bias_node(editor, name, anchor, bias, dtype, channel_first, index=None, replace=True):
    """Writes `anchor + bias` (a per-channel vector) as node `name`: a BiasAdd, or an AddV2
    where TF's remapper would compute the BiasAdd's fusion wrongly (misfused_by_remapper)."""
    if misfused_by_remapper(index, name, channel_first):
        op, attrs = "AddV2", {"T": graph_lib.type_attr(dtype)}
    else:
        op, attrs = "BiasAdd", {"T": graph_lib.type_attr(dtype),
                                "data_format": graph_lib.string_attr("NCHW" if channel_first else "NHWC")}
    if replace:
        return editor.replace_node(name, op, [anchor, bias], attrs)
    return editor.add_node(name, op, [anchor, bias], attrs)


def emit_fold(editor, match, folded, replaced_node, anchor=None, channel_first=None, suffix="_bn_folded",
              index=None):
    """Writes a fold (FoldedWeights from fold_weights) after `match` into `editor`.

    New Const nodes hold the folded kernel and bias (the old ones are left for
    any other user and for cleanup). The linear op reads the new kernel, and
    `replaced_node` becomes BiasAdd(anchor, new bias): it keeps its name, so
    its consumers and any signature output that names it are unchanged.
    anchor is the linear op's output unless shape-only ops stay in between.
    index (the pass's GraphIndex) lets it see the node's consumers (bias_node).
    """
    bias_base = (match.bias_const or match.linear.name + "/bias") + suffix
    bias_name = editor.add_const(bias_base, folded.bias, folded.bias_dtype)
    if folded.kernel is not None:
        kernel_name = editor.add_const(match.kernel_const + suffix, folded.kernel, match.dtype)
        linear = editor.node(match.linear.name)
        data_positions = [i for i, s in enumerate(linear.input) if not s.startswith("^")]
        linear.input[data_positions[match.spec.kernel_input]] = kernel_name

    if channel_first is None:
        channel_first = match.channel_first
    if anchor is None and match.anchor is not None:
        # The kept op now reads the linear op directly: a bias or Identity that
        # was between them is absorbed into the new bias after it.
        kept = editor.node(match.anchor)
        kept.input[next(i for i, s in enumerate(kept.input) if not s.startswith("^"))] = match.linear.name
        anchor = match.anchor
    anchor = anchor or match.linear.name
    bias_node(editor, replaced_node, anchor, bias_name, folded.bias_dtype, channel_first, index)
