"""The linear ops a per-channel affine map folds into (grammar.LINEAR_OPS), found as ops
or as calls of functions that compute one, and how a new bias is written after one."""

import dataclasses
from typing import Optional

import numpy as np

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.passes.grammar import LINEAR_OPS, LinearOpSpec, NoMatch

# A call (graph.CALL_OPS) whose function computes one of the ops above from its arguments,
# and nothing else, folds like that op: its kernel argument gets the folded kernel, the new
# bias goes after the call, and the function (a Keras grouped convolution's jit_compile
# function: TF's CPU Conv2D has no grouped kernel, so it must stay compiled by XLA) is left
# as it is.
_CALL_PLUMBING = frozenset({"Identity", "NoOp"})

def _called_linear(index, node):
    """(linear op NodeDef in the function, call input of its kernel) for a call that computes
    one linear op of its arguments, or None."""
    if node.op not in graph_lib.CALL_OPS or not node.attr["f"].HasField("func"):
        return None
    function = index.function(node.attr["f"].func.name)
    if function is None or len(function.signature.output_arg) != 1:
        return None
    arguments = {a.name: i for i, a in enumerate(function.signature.input_arg)}
    by_name = {n.name: n for n in function.node_def}

    def source(input_str):
        """The node or argument a function-body input reads, through Identities; None off port 0."""
        name, output = graph_lib.body_source(by_name, input_str)
        return name if output in ("", "output:0") else None

    linear = by_name.get(source(function.ret[function.signature.output_arg[0].name]))
    if linear is None or linear.op not in LINEAR_OPS:
        return None
    if any(n.op not in _CALL_PLUMBING for n in function.node_def if n is not linear):
        return None
    data = graph_lib.data_inputs(linear)
    kernel_argument = arguments.get(source(data[LINEAR_OPS[linear.op].kernel_input]))
    if kernel_argument is None or source(data[0]) not in arguments:
        return None
    return linear, kernel_argument


def linear_op_of(index, node):
    """(LinearOpSpec, the NodeDef whose attributes describe the op) of a linear op, or of a
    call that computes one (graph.CALL_OPS); None for anything else."""
    if node.op in LINEAR_OPS:
        return LINEAR_OPS[node.op], node
    called = _called_linear(index, node)
    if called is None:
        return None
    linear, kernel_argument = called
    return dataclasses.replace(LINEAR_OPS[linear.op], kernel_input=kernel_argument), linear


def channel_axis(node, rank):
    """Channel axis of a linear op's input and output from its data_format: -1 or 1."""
    data_format = graph_lib.attr_string(node, "data_format", "NHWC")
    return 1 if data_format.startswith("NC") and rank is not None and rank > 2 else -1


@dataclasses.dataclass
class LinearMatch:
    """A linear op (or a call computing one) and its kernel, read only when a fold needs it."""
    index: object  # the GraphIndex it was found in
    linear: object  # NodeDef
    spec: LinearOpSpec
    attrs: object  # the NodeDef whose attributes describe the op: `linear`, or the op in its function
    kernel_input: str
    kernel_const: Optional[str]  # the kernel's Const node, None when the kernel is not constant
    kernel_shape: Optional[tuple]
    out_channel_axes: tuple
    in_channel_axis: int
    channel_axis: int  # -1 or 1 (data_format)

    @property
    def kernel(self):
        if self.kernel_const is None:
            raise NoMatch("kernel %s of %s is not constant" % (self.kernel_input, self.linear.name))
        return self.index.const_value(self.kernel_input)

    @property
    def out_channels(self):
        if self.kernel_shape is None:
            return None
        return int(np.prod([self.kernel_shape[a] for a in self.out_channel_axes]))

    @property
    def in_channels(self):
        return None if self.kernel_shape is None else self.kernel_shape[self.in_channel_axis]

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


def linear_match(index, node):
    """The LinearMatch of a linear op or call (linear_op_of must have found it)."""
    spec, attrs = linear_op_of(index, node)
    transposed = spec.transpose_attr is not None and attrs.attr[spec.transpose_attr].b
    kernel_input = graph_lib.data_inputs(node)[spec.kernel_input]
    kernel_const = index.const_node(kernel_input)
    kernel_shape = index.const_shape(kernel_input)
    out_channel_axes = spec.out_channel_axes_transposed if transposed else spec.out_channel_axes
    in_channel_axis = spec.in_channel_axis_transposed if transposed else spec.in_channel_axis
    if kernel_shape is not None:  # axes counted from the kernel's last (any rank) as its own
        out_channel_axes = tuple(a % len(kernel_shape) for a in out_channel_axes)
        in_channel_axis %= len(kernel_shape)
    return LinearMatch(
        index=index, linear=node, spec=spec, attrs=attrs, kernel_input=kernel_input,
        kernel_const=None if kernel_const is None else kernel_const.name, kernel_shape=kernel_shape,
        out_channel_axes=out_channel_axes, in_channel_axis=in_channel_axis,
        channel_axis=channel_axis(attrs, spec.rank))


# LeakyRelu's default alpha: the one TF's fused kernel uses when the remapper drops the attribute.
_FUSED_LEAKY_RELU_ALPHA = 0.2


def misfused_by_remapper(index, node_name, channel_first):
    """Whether a BiasAdd named node_name would be fused wrongly by TensorFlow's remapper.

    With oneDNN (TF 2.21, on by default on many x86 CPUs), Grappler fuses
    Conv2D -> BiasAdd -> Add -> LeakyRelu into one _FusedConv2D and does not
    carry LeakyRelu's alpha over: the kernel computes with 0.2. Folding a
    batch norm creates exactly that chain from conv -> BN -> residual add ->
    LeakyReLU(0.1). The same bias written as AddV2 of a constant is not
    fused that way (the residual_leaky_relu model tests check both). Only
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


def bias_node(editor, name, anchor, bias, bias_name, dtype, layout, index=None, replace=True):
    """Writes `anchor + bias` (bias: a per-channel vector of values) as node `name`, with the
    bias in a new Const named after bias_name; returns the node.

    A BiasAdd where the channels are last (or on axis 1 of rank 4 or 5: NCHW); an AddV2 of
    the vector shaped to broadcast along the channel axis otherwise, and where TF's remapper
    would compute the BiasAdd's fusion wrongly (misfused_by_remapper). layout is the
    grammar.Layout of `anchor`.
    """
    bias = np.asarray(bias)
    channel_first = layout.rank in (4, 5) and layout.channel == 1
    if (layout.channel_last or channel_first) and not misfused_by_remapper(index, name, channel_first):
        op, attrs = "BiasAdd", {"T": graph_lib.type_attr(dtype),
                                "data_format": graph_lib.string_attr("NCHW" if channel_first else "NHWC")}
    else:
        op, attrs = "AddV2", {"T": graph_lib.type_attr(dtype)}
        if not layout.channel_last:
            bias = bias.reshape([-1] + [1] * (layout.rank - layout.channel - 1))
    inputs = [anchor, editor.add_const(bias_name, bias, dtype)]
    if replace:
        return editor.replace_node(name, op, inputs, attrs)
    return editor.add_node(name, op, inputs, attrs)
