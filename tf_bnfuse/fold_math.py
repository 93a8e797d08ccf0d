"""The fold itself: pure numpy functions, no graph and no TensorFlow.

Everything is computed in float64; callers cast the results to the dtype of
the op they feed.

An inference batch norm is a per-channel affine map,

    y = gamma * (x - mean) / sqrt(variance + epsilon) + beta = x * scale + shift,

and a linear op followed by one is again a linear op:

    (x (*) W + b) * scale + shift = x (*) (W * scale) + (b * scale + shift)

where "W * scale" multiplies every kernel entry that produces output channel c
by scale[c].
"""

import numpy as np


def batch_norm_to_affine(gamma, beta, mean, variance, epsilon):
    """Returns (scale, shift) with batch_norm(x) == x * scale + shift."""
    gamma, beta, mean, variance = (
        np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, variance))
    scale = gamma / np.sqrt(variance + float(epsilon))
    shift = beta - mean * scale
    return scale, shift


def compose_affine(first, second):
    """Returns the (scale, shift) of applying `first`, then `second`."""
    scale1, shift1 = first
    scale2, shift2 = second
    return scale1 * scale2, shift1 * scale2 + shift2


def scale_kernel(kernel, scale, out_channel_axes):
    """Multiplies the kernel entries of output channel c by scale[c].

    out_channel_axes are the kernel axes whose row-major flattening numbers the
    output channels: (3,) for a Conv2D HWIO kernel, (2, 3) for a depthwise
    [H, W, in, multiplier] kernel whose output channel is in * multiplier + m.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    broadcast_shape = [1] * kernel.ndim
    for axis in out_channel_axes:
        broadcast_shape[axis] = kernel.shape[axis]
    return kernel * np.asarray(scale, dtype=np.float64).reshape(broadcast_shape)


def fold_affine_into_linear(kernel, bias, scale, shift, out_channel_axes):
    """Returns (new_kernel, new_bias) of `linear(x, kernel) + bias` then `* scale + shift`.

    bias may be None (no bias). scale and shift are per output channel vectors.
    """
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    new_kernel = scale_kernel(kernel, scale, out_channel_axes)
    old_bias = np.zeros_like(scale) if bias is None else np.asarray(bias, dtype=np.float64)
    return new_kernel, old_bias * scale + shift


def out_channel_count(kernel_shape, out_channel_axes):
    return int(np.prod([kernel_shape[a] for a in out_channel_axes]))


def as_channel_vector(value, rank, channel_axis, channels):
    """A constant that broadcasts against a rank-`rank` tensor only along its
    channel axis, as a vector of `channels` float64 values; None otherwise.

    Scalars count (they broadcast to every channel). channel_axis may be
    negative.
    """
    value = np.asarray(value, dtype=np.float64)
    if value.ndim > rank:
        return None
    channel_axis %= rank
    shape = (1,) * (rank - value.ndim) + value.shape
    for axis, size in enumerate(shape):
        if axis != channel_axis and size != 1:
            return None
    if shape[channel_axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()


def fold_affine_into_next_linear(kernel, scale, shift, in_channel_axis, out_channel_axes):
    """Returns (new_kernel, added_bias) of `linear(x * scale + shift, kernel)`.

    The affine map is on the linear op's input channels (kernel axis
    in_channel_axis); by linearity

        linear(x * scale + shift, W) = linear(x, W * scale) + linear(shift, W)

    and linear(shift, W) for a constant input is, for every output channel,
    the sum of the kernel entries that produce it times the shift of their
    input channel. That holds only where the op reads no zero padding (a
    padded zero would become shift, not zero), which the caller checks.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    broadcast_shape = [1] * kernel.ndim
    broadcast_shape[in_channel_axis] = kernel.shape[in_channel_axis]
    new_kernel = kernel * np.asarray(scale, dtype=np.float64).reshape(broadcast_shape)
    shifted = kernel * np.asarray(shift, dtype=np.float64).reshape(broadcast_shape)
    summed_axes = tuple(a for a in range(kernel.ndim) if a not in out_channel_axes)
    return new_kernel, shifted.sum(axis=summed_axes).reshape(-1)
