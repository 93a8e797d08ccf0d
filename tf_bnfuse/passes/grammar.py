"""The chain grammar, as data: the affine steps, the pass-through ops and the linear ops.

A foldable chain is, along input edges,

    backward:  linear op -> (step | pass-through)* -> root step      (fold_batch_norm, fold_affine)
    forward:   x -> (step | pass-through)* -> linear op              (fold_forward)

where every tensor inside the chain has exactly one consumer (tf_bnfuse.passes.chain walks
and checks that, once, for every pass). Three tables say what may appear:

- STEPS: op -> Step. A step is `x * scale + shift` per channel: its `affine` rule returns
  (scale, shift) as float64 vectors for the Layout of its data input, or raises NoMatch.
- PASS_THROUGHS: op -> PassThrough. An op a per-channel affine map commutes with. Its `down`
  rule maps the Layout of its input to that of its output (backward walks), `up` the other
  way (forward walks; None: forward chains do not pass it). Both raise NoMatch with a reason.
- LINEAR_OPS: op -> LinearOpSpec: where its kernel is, which kernel axes number its output
  and input channels, and whether a constant shift of its input reaches its output as a
  per-channel constant (the forward fold of a shift).

Adding a pass-through or a step is one row here (plus its tests in
tests/test_grammar_graphs.py); the walker, the fold math, the overflow and NaN checks and
the emitters need no change.
"""

import dataclasses
from typing import Callable, Optional

import numpy as np

from tf_bnfuse import fold_math
from tf_bnfuse import graph as graph_lib


class NoMatch(Exception):
    """A chain cannot be folded; the message says why.

    reached_linear: the walk had found the linear op when the chain failed (so it is a
    real candidate, worth reporting, even when its root is only an Add).
    """
    reached_linear = False


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the channels of one tensor of a chain are."""
    rank: Optional[int]  # None: known only at run time (after a Reshape to a computed shape)
    channel: int  # the channel axis, non-negative; -1 with rank None: the last axis
    channels: int
    dtype: object  # tf.DType

    @property
    def channel_last(self):
        return self.rank is None or self.channel == self.rank - 1

    def broadcast(self):
        """(rank, channel axis) a constant is read against: of unknown rank, only scalars and
        channel vectors broadcast without changing the shape."""
        return (1, 0) if self.rank is None else (self.rank, self.channel)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


data_inputs = graph_lib.data_inputs


def _data_format_axis(node, rank):
    """The channel axis a data_format attribute names for a rank-`rank` tensor (None: unknown rank)."""
    if graph_lib.attr_string(node, "data_format", "NHWC").startswith("NC"):
        return 1
    return None if rank is None else rank - 1


def _check_channel_axis(node, layout):
    axis = _data_format_axis(node, layout.rank)
    if axis is None and layout.rank is None:
        return  # NHWC-like on data whose channels are last
    if layout.rank is None or axis != layout.channel:
        where = "the last axis" if layout.rank is None else "axis %d of %d" % (layout.channel, layout.rank)
        raise NoMatch("data_format %s does not match the chain, whose channels are on %s" % (
            graph_lib.attr_string(node, "data_format", "NHWC"), where))


# Steps ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Step:
    # (index, node) -> the input string of the data, or None when the node is not a step here
    # (Mul of two tensors, say): such a node is not a candidate, and not reported.
    data_input: Callable
    # (index, node, Layout of the data) -> (scale, shift) vectors of layout.channels; NoMatch.
    affine: Callable
    scales: bool  # whether it can scale (a chain of shifts alone is a bias)
    doc: str = ""  # what it computes and when it is a step (docs/folding.md's table)


def _one_constant_operand(index, node):
    """(data input, constant input, position of the constant) of a binary op, or None."""
    inputs = data_inputs(node)
    if len(inputs) != 2:
        return None
    constants = [index.const_value(i) is not None for i in inputs]
    if constants[0] == constants[1]:
        return None
    position = 0 if constants[0] else 1
    return inputs[1 - position], inputs[position], position


def _arithmetic_data_input(index, node):
    found = _one_constant_operand(index, node)
    if found is None or (node.op == "BiasAdd" and found[2] != 1):
        return None
    return found[0]


def _channel_vector(index, node, const_input, layout):
    value = index.const_value(const_input)
    if node.op == "BiasAdd":
        # BiasAdd's bias is one value per channel whatever the data_format.
        _check_channel_axis(node, layout)
        if np.shape(value) != (layout.channels,):
            raise NoMatch("bias %s of %s is not a vector of %d channels" % (const_input, node.name, layout.channels))
        return np.asarray(value, np.float64)
    rank, channel = layout.broadcast()
    vector = fold_math.as_channel_vector(value, rank, channel, layout.channels)
    if vector is None:
        raise NoMatch("%s %s: constant %s of shape %s varies along a non-channel axis" % (
            node.op, node.name, const_input, list(np.shape(value))))
    return vector


def _arithmetic_affine(index, node, layout):
    _, const_input, position = _one_constant_operand(index, node)
    if node.op in ("Sub", "RealDiv") and position == 0:
        form = "c - x" if node.op == "Sub" else "c / x"
        raise NoMatch("%s %s computes %s, which is not affine in x" % (node.op, node.name, form))
    vector = _channel_vector(index, node, const_input, layout)
    ones, zeros = np.ones(layout.channels), np.zeros(layout.channels)
    if node.op == "Mul":
        return vector, zeros
    if node.op == "RealDiv":
        if np.any(vector == 0):
            raise NoMatch("RealDiv %s divides by zero in some channel" % node.name)
        return 1.0 / vector, zeros
    if node.op == "Sub":
        return ones, -vector
    return ones, vector


def _first_input(index, node):
    return data_inputs(node)[0]


def _constant_params(index, node, names, inputs):
    params = []
    for name, input_str in zip(names, inputs):
        value = index.const_value(input_str)
        if value is None:
            raise NoMatch("%s (%s) is not constant" % (name, input_str))
        if not np.all(np.isfinite(value)):
            raise NoMatch("%s (%s) has NaN or Inf values" % (name, input_str))
        params.append(value)
    return params


def is_training(node):
    """Whether a fused batch norm runs in training mode (is_training defaults to true when absent)."""
    return "is_training" not in node.attr or node.attr["is_training"].b


def _fused_batch_norm_affine(index, node, layout):
    if is_training(node):
        raise NoMatch("training mode (is_training=true)")
    used_side_outputs = sorted(p for p in index.ports_in_use(node.name) if p != 0)
    if used_side_outputs:
        raise NoMatch("its statistics outputs %s are used" % used_side_outputs)
    params = _constant_params(index, node, ("scale", "offset", "mean", "variance"), data_inputs(node)[1:5])
    epsilon = node.attr["epsilon"].f if "epsilon" in node.attr else 1e-4
    scale, shift = fold_math.batch_norm_to_affine(*params, epsilon)
    _check_channel_axis(node, layout)
    if scale.shape != (layout.channels,):
        raise NoMatch("has %d channels but the chain has %d" % (scale.size, layout.channels))
    return scale, shift


def _global_normalization_affine(index, node, layout):
    """BatchNormWithGlobalNormalization (inputs t, m, v, beta, gamma; channels last)."""
    mean, variance, beta, gamma = _constant_params(
        index, node, ("mean", "variance", "beta", "gamma"), data_inputs(node)[1:5])
    if not node.attr["scale_after_normalization"].b:
        gamma = np.ones_like(np.asarray(gamma, np.float64))
    scale, shift = fold_math.batch_norm_to_affine(gamma, beta, mean, variance, node.attr["variance_epsilon"].f)
    if not layout.channel_last:
        raise NoMatch("normalizes the last axis, but the chain's channels are on axis %d" % layout.channel)
    if scale.shape != (layout.channels,):
        raise NoMatch("has %d channels but the chain has %d" % (scale.size, layout.channels))
    return scale, shift


_CONSTANT = "one operand constant: a scalar, or varying only along the channel axis"
_FUSED_BATCH_NORM = Step(_first_input, _fused_batch_norm_affine, scales=True, doc=(
    "`is_training=false`, constant finite parameters, statistics outputs unused, `data_format` "
    "where the chain has its channels: `scale = gamma / sqrt(variance + epsilon)`, `shift = beta - mean * scale`"))

_ADD = Step(_arithmetic_data_input, _arithmetic_affine, scales=False, doc="`x + c`; " + _CONSTANT)

STEPS = {
    "Mul": Step(_arithmetic_data_input, _arithmetic_affine, scales=True, doc="`x * c`; " + _CONSTANT),
    "RealDiv": Step(_arithmetic_data_input, _arithmetic_affine, scales=True,
                    doc="`x / c`, c nonzero in every channel (not `c / x`); " + _CONSTANT),
    "Add": _ADD,
    "AddV2": _ADD,
    "Sub": Step(_arithmetic_data_input, _arithmetic_affine, scales=False, doc="`x - c` (not `c - x`); " + _CONSTANT),
    "BiasAdd": Step(_arithmetic_data_input, _arithmetic_affine, scales=False,
                    doc="`x + b`, b a vector of the channel count, `data_format` where the chain has its channels"),
    "FusedBatchNorm": _FUSED_BATCH_NORM,
    "FusedBatchNormV2": _FUSED_BATCH_NORM,
    "FusedBatchNormV3": _FUSED_BATCH_NORM,
    "BatchNormWithGlobalNormalization": Step(_first_input, _global_normalization_affine, scales=True, doc=(
        "the pre-2017 op of old frozen graphs (GraphDef version < 9); constant finite parameters, channels "
        "last; gamma only with `scale_after_normalization`")),
}
BATCH_NORM_OPS = frozenset(op for op, step in STEPS.items() if step.affine is not _arithmetic_affine)
ARITHMETIC_OPS = frozenset(STEPS) - BATCH_NORM_OPS


# Pass-throughs -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PassThrough:
    down: Callable  # (index, node, Layout of its input) -> Layout of its output; NoMatch
    up: Optional[Callable]  # (index, node, Layout of its output) -> Layout of its input; NoMatch
    absorbed: bool = False  # adds nothing (Identity-likes): the rewrite bypasses it
    bias_commutes: bool = True  # it(x) + b == it(x + b): the new bias may go before it
    positive_scale: bool = False  # commutes with x * s + t only where every s > 0 (MaxPool)
    doc: str = ""  # when it is passed (docs/folding.md's table)


def _identity(index, node, layout):
    if node.op == "IdentityN" and len(data_inputs(node)) != 1:
        raise NoMatch("IdentityN %s forwards %d tensors" % (node.name, len(data_inputs(node))))
    return layout


def _zero_width_pad(index, node, layout):
    paddings = index.const_value(data_inputs(node)[1])
    if paddings is None or np.any(paddings):
        raise NoMatch("%s %s pads (the padded zeros would not be scaled and shifted)" % (node.op, node.name))
    return layout


def _known_rank(node, layout):
    if layout.rank is None:
        raise NoMatch("the rank before %s %s is known only at run time" % (node.op, node.name))


def _squeeze_dims(node, rank):
    return sorted({d % rank for d in node.attr["squeeze_dims"].list.i})


def _squeeze_down(index, node, layout):
    _known_rank(node, layout)
    dims = _squeeze_dims(node, layout.rank)
    if not dims or layout.channel in dims:
        raise NoMatch("Squeeze %s may remove the channel axis" % node.name)
    return layout.replace(rank=layout.rank - len(dims), channel=layout.channel - sum(d < layout.channel for d in dims))


def _squeeze_up(index, node, layout):
    _known_rank(node, layout)
    squeezed = node.attr["squeeze_dims"].list.i
    if not squeezed:
        raise NoMatch("Squeeze %s without squeeze_dims" % node.name)
    rank = layout.rank + len(set(squeezed))
    dims = _squeeze_dims(node, rank)
    kept = [a for a in range(rank) if a not in dims]
    return layout.replace(rank=rank, channel=kept[layout.channel])


def _expand_axis(index, node, out_rank):
    axis = index.const_value(data_inputs(node)[1])
    if axis is None or np.size(axis) != 1:
        raise NoMatch("ExpandDims %s has no constant axis" % node.name)
    return int(np.reshape(axis, ())) % out_rank


def _expand_down(index, node, layout):
    _known_rank(node, layout)
    axis = _expand_axis(index, node, layout.rank + 1)
    return layout.replace(rank=layout.rank + 1, channel=layout.channel + (axis <= layout.channel))


def _expand_up(index, node, layout):
    _known_rank(node, layout)
    axis = _expand_axis(index, node, layout.rank)
    if axis == layout.channel:
        raise NoMatch("ExpandDims %s inserts the channel axis" % node.name)
    return layout.replace(rank=layout.rank - 1, channel=layout.channel - (axis < layout.channel))


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
    inputs = data_inputs(node)
    if node.op == "ConcatV2" and len(inputs) >= 2:
        axis = index.const_value(inputs[-1])
        if axis is None or int(np.reshape(axis, ())) not in (0, -1):
            return None
        return static_last_element(index, inputs[-2])
    if node.op == "Pack" and inputs:
        last = index.const_value(inputs[-1])
        return int(np.reshape(last, ())) if last is not None and np.size(last) == 1 else None
    return None


def _reshape_rank(index, node):
    """The rank a Reshape outputs, from a constant or Pack-built target shape; None if unknown."""
    target = data_inputs(node)[1]
    value = index.const_value(target)
    if value is not None:
        return len(value)
    producer, _ = index.skip_identities(target)
    if producer is not None and producer.op == "Pack":
        return len(data_inputs(producer))
    return None


def _reshape_down(index, node, layout):
    # Row-major order keeps element i in channel i mod C when the channels are last on both sides.
    if not layout.channel_last or static_last_element(index, data_inputs(node)[1]) != layout.channels:
        raise NoMatch("Reshape %s does not keep the %d channels last" % (node.name, layout.channels))
    rank = _reshape_rank(index, node)
    return layout.replace(rank=rank, channel=-1 if rank is None else rank - 1)


def _channels_last(index, node, layout):
    if not layout.channel_last:
        raise NoMatch("%s %s moves the channels unless they are last" % (node.op, node.name))
    return layout


def _cast_types(node):
    return graph_lib.node_dtype(node, "SrcT"), graph_lib.node_dtype(node, "DstT")


def _check_float_cast(node):
    source, target = _cast_types(node)
    if not (source and source.is_floating and target and target.is_floating) or node.attr["Truncate"].b:
        raise NoMatch("Cast %s is not between float types" % node.name)
    return source, target


def _cast_down(index, node, layout):
    # Mixed precision: a float16 conv whose batch norm runs in float32. The Cast stays.
    source, target = _check_float_cast(node)
    if source != layout.dtype:
        raise NoMatch("Cast %s reads %s, not %s" % (node.name, source.name, layout.dtype.name))
    return layout.replace(dtype=target)


def _cast_up(index, node, layout):
    source, target = _check_float_cast(node)
    if target != layout.dtype:
        raise NoMatch("Cast %s makes %s, not %s" % (node.name, target.name, layout.dtype.name))
    return layout.replace(dtype=source)


def _permutation(index, node, layout):
    _known_rank(node, layout)
    perm = index.const_value(data_inputs(node)[1])
    if perm is None or np.shape(perm) != (layout.rank,):
        raise NoMatch("Transpose %s has no constant permutation of rank %d" % (node.name, layout.rank))
    return [int(p) % layout.rank for p in perm]


def _transpose_down(index, node, layout):
    return layout.replace(channel=_permutation(index, node, layout).index(layout.channel))


def _transpose_up(index, node, layout):
    return layout.replace(channel=_permutation(index, node, layout)[layout.channel])


def _pool(index, node, layout):
    """A pool that leaves the channel axis alone: TF's AvgPool averages only the cells inside
    the input (SAME padding included), so it commutes with x * s + t; MaxPool with s > 0."""
    _check_channel_axis(node, layout)
    if layout.rank is not None:
        for attr in ("ksize", "strides"):
            values = node.attr[attr].list.i
            if len(values) == layout.rank and values[layout.channel] != 1:
                raise NoMatch("%s %s pools across channels" % (node.op, node.name))
    return layout


_IDENTITY = PassThrough(_identity, _identity, absorbed=True, doc="always (one input); bypassed by the fold")
_ZERO_PAD = PassThrough(_zero_width_pad, _zero_width_pad, absorbed=True,
                        doc="constant paddings, all zero (a real pad would add unscaled zeros); bypassed")
_POOL = PassThrough(_pool, _pool, doc=(
    "`data_format` where the chain has its channels, not across channels: TF averages only the cells "
    "inside the input (SAME too), so `avg(x * s + t) = avg(x) * s + t`"))
_MAX_POOL = PassThrough(_pool, _pool, positive_scale=True, doc=(
    "as AvgPool, and only a scale positive in every channel crosses it: `max(x * s + t) = max(x) * s + t` "
    "for s > 0"))

PASS_THROUGHS = {
    "Identity": _IDENTITY,
    "Snapshot": _IDENTITY,
    "IdentityN": _IDENTITY,
    "Squeeze": PassThrough(_squeeze_down, _squeeze_up, doc=(
        "`squeeze_dims` given and not the channel axis (Keras' Conv1D is ExpandDims -> Conv2D -> Squeeze)")),
    "ExpandDims": PassThrough(_expand_down, _expand_up, doc="a constant axis (upward: not the channel axis)"),
    "Reshape": PassThrough(_reshape_down, None, doc=(
        "channels last on both sides: the target's last dimension is the channel count (a constant, or the "
        "constant tail of the Concat/Pack Keras builds it with; a Dense on rank > 2). Backward only")),
    "BatchToSpaceND": PassThrough(_channels_last, _channels_last, doc=(
        "channels last (a dilated conv is SpaceToBatchND -> conv -> BatchToSpaceND, which only crops)")),
    "Cast": PassThrough(_cast_down, _cast_up, bias_commutes=False, doc=(
        "float to float, not truncating (mixed precision); stays, and the new bias goes after it, in the wider "
        "type")),
    "Pad": _ZERO_PAD,
    "PadV2": _ZERO_PAD,
    "Transpose": PassThrough(_transpose_down, _transpose_up, doc="a constant permutation; the channel axis moves with it"),
    "AvgPool": _POOL,
    "AvgPool3D": _POOL,
    "MaxPool": _MAX_POOL,
    "MaxPool3D": _MAX_POOL,
}


# Linear ops ----------------------------------------------------------------------------------

def _conv_shift_blocked(node, kernel_shape):
    """conv(x + t) = conv(x) + conv(t) with conv(t) constant per channel only where the conv
    reads no zero padding: VALID, EXPLICIT of zero width, or a kernel of one cell."""
    padding = graph_lib.attr_string(node, "padding", "VALID")
    if padding == "VALID" or (padding == "EXPLICIT" and not any(node.attr["explicit_paddings"].list.i)):
        return None
    if padding == "SAME" and all(size == 1 for size in kernel_shape[:-2]):
        return None
    return "pads with zeros (padding %s): the shift would not reach the padding" % padding


def _never_blocked(node, kernel_shape):
    return None


def _transposed_shift_blocked(node, kernel_shape):
    return "adds a different number of kernel cells to each output cell: a shift before it is not a bias after it"


def _batched_kernel_shift_blocked(node, kernel_shape):
    return None if len(kernel_shape) <= 2 else "multiplies each batch by its own kernel: a shift is not one bias"


@dataclasses.dataclass(frozen=True)
class LinearOpSpec:
    kernel_input: int
    rank: Optional[int]  # rank of the op's input and output; None: any, the channels last
    # Kernel axes whose row-major flattening numbers the output channels (negative: from the last).
    out_channel_axes: tuple
    in_channel_axis: int  # the kernel axis of the input channels
    # (node, kernel shape) -> None when a constant shift of the input adds a per-channel
    # constant to the output (the forward fold of a shift), else the reason it does not.
    shift_blocked: Callable
    data_input: int = 0
    # Bool attrs transposing the kernel (then the *_transposed axes) and the data (no forward fold)
    transpose_attr: Optional[str] = None
    out_channel_axes_transposed: Optional[tuple] = None
    in_channel_axis_transposed: Optional[int] = None
    input_transpose_attr: Optional[str] = None
    batched_kernel: bool = False  # kernel axes before the last two: one kernel per batch, not summed


# x @ W, W constant (Keras 3's EinsumDense, tf.matmul of a rank-3 x): channels on the last axis.
_BATCH_MATMUL = LinearOpSpec(1, None, (-1,), -2, _batched_kernel_shift_blocked, 0, "adj_y", (-2,), -1, "adj_x",
                             batched_kernel=True)

LINEAR_OPS = {
    "Conv2D": LinearOpSpec(1, 4, (3,), 2, _conv_shift_blocked),
    # Output channel c * multiplier + m comes from kernel[:, :, c, m].
    "DepthwiseConv2dNative": LinearOpSpec(1, 4, (2, 3), 2, _conv_shift_blocked),
    "Conv3D": LinearOpSpec(1, 5, (4,), 3, _conv_shift_blocked),
    # Transposed convolutions: inputs (input_sizes, filter, out_backprop); kernel [.., out, in].
    "Conv2DBackpropInput": LinearOpSpec(1, 4, (2,), 3, _transposed_shift_blocked, data_input=2),
    "Conv3DBackpropInputV2": LinearOpSpec(1, 5, (3,), 4, _transposed_shift_blocked, data_input=2),
    "MatMul": LinearOpSpec(1, 2, (1,), 0, _never_blocked, 0, "transpose_b", (0,), 1, "transpose_a"),
    "BatchMatMul": _BATCH_MATMUL,
    "BatchMatMulV2": _BATCH_MATMUL,
}
