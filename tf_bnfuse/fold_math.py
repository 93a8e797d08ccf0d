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

import concurrent.futures
import os

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


def _along_channels(kernel, scale, out_channel_axes):
    """scale as float64, shaped to broadcast against kernel along its output-channel axes."""
    broadcast_shape = [1] * kernel.ndim
    for axis in out_channel_axes:
        broadcast_shape[axis] = kernel.shape[axis]
    return np.asarray(scale, dtype=np.float64).reshape(broadcast_shape)


# Elements per slice in scale_kernel_as: its float64 products then stay in cache-sized
# buffers instead of a fresh float64 copy of the whole kernel, whose page faults
# cost more than the multiply (a 3x3x512x512 kernel is 19 MB in float64).
SLICE_ELEMENTS = 1 << 16


# Kernels at least this big are scaled by several threads (numpy's multiply and casts release
# the GIL), each on its own run of the leading axis: the multiply is most of a big fold's time.
PARALLEL_MIN_ELEMENTS = 1 << 22


def scale_kernel_as(kernel, scale, out_channel_axes, dtype, workers=None, out=None):
    """The kernel entries of output channel c times scale[c], each product in float64 rounded
    to the numpy `dtype`, and (max, min) of the float64 products (NaN when one is NaN).

    out_channel_axes are the kernel axes whose row-major flattening numbers the output
    channels: (3,) for a Conv2D HWIO kernel, (2, 3) for a depthwise [H, W, in, multiplier]
    kernel whose output channel is in * multiplier + m. Computed in slices along the leading
    axes (no float64 copy of the kernel); a big kernel's slices by `workers` threads (default:
    the CPUs). out: the array of kernel's shape and `dtype` to write them into (None: a new one).
    """
    kernel = np.asarray(kernel)
    scale = _along_channels(kernel, scale, out_channel_axes)
    if kernel.ndim == 0:
        products = np.multiply(kernel, scale, dtype=np.float64)
        return products.astype(dtype), (float(products), float(products))
    out = np.empty(kernel.shape, dtype) if out is None else out
    workers = min(workers or os.cpu_count() or 1, kernel.shape[0])
    if kernel.size < PARALLEL_MIN_ELEMENTS or workers < 2:
        extremes = [_scale_into(kernel, scale, out)]
    else:
        bounds = np.linspace(0, kernel.shape[0], workers + 1).astype(int)
        runs = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
            extremes = list(pool.map(lambda run: _scale_into(
                kernel[run], scale[run] if scale.shape[0] > 1 else scale, out[run]), runs))
    if any(np.isnan(high) for high, _ in extremes):
        return out, (np.nan, np.nan)
    return out, (max(high for high, _ in extremes), min(low for _, low in extremes))


def _scale_into(kernel, scale, out):
    """Writes kernel * scale (float64 products, in cache-sized slices) rounded into `out`;
    returns (max, min) of the products, (NaN, NaN) when one is NaN."""
    seen = {"max": -np.inf, "min": np.inf, "nan": False}
    buffer = [np.empty(0, np.float64)]  # one float64 slice, reused: a fresh one per slice costs page faults

    def fill(part, part_scale, part_out):
        if part.size == 0:
            return
        row = part[0].size if part.ndim > 1 else part.size
        if part.ndim > 1 and row > SLICE_ELEMENTS:
            for i in range(part.shape[0]):
                fill(part[i], part_scale[i] if part_scale.shape[0] > 1 else part_scale[0], part_out[i])
            return
        step = max(1, SLICE_ELEMENTS // max(row, 1)) if part.ndim > 1 else part.shape[0]
        for start in range(0, part.shape[0], step):
            rows = slice(start, start + step)
            piece = part[rows]
            if buffer[0].size < piece.size:
                buffer[0] = np.empty(piece.size, np.float64)
            products = buffer[0][:piece.size].reshape(piece.shape)
            np.multiply(piece, part_scale[rows] if part_scale.shape[0] > 1 else part_scale, out=products)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows in the extremes
                part_out[rows] = products
            high, low = float(products.max()), float(products.min())  # NaN when a product is NaN
            if np.isnan(high) or np.isnan(low):
                seen["nan"] = True
            else:
                seen["max"], seen["min"] = max(seen["max"], high), min(seen["min"], low)

    fill(kernel, scale, out)
    return (np.nan, np.nan) if seen["nan"] else (seen["max"], seen["min"])


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


def fold_affine_into_next_linear(kernel, scale, shift, in_channel_axis, out_channel_axes, dtype=np.float64,
                                 out=None):
    """Returns (new_kernel, added_bias, (max, min) of new_kernel's float64 products) of
    `linear(x * scale + shift, kernel)`.

    The affine map is on the linear op's input channels (kernel axis
    in_channel_axis); by linearity

        linear(x * scale + shift, W) = linear(x, W * scale) + linear(shift, W)

    and linear(shift, W) for a constant input is, for every output channel,
    the sum of the kernel entries that produce it times the shift of their
    input channel. That holds only where the op reads no zero padding (a
    padded zero would become shift, not zero), which the caller checks.
    new_kernel is rounded to `dtype` as scale_kernel_as computes it (into `out`), and the bias
    summed over slices (shift_through): no float64 copy of the kernel.
    """
    kernel = np.asarray(kernel)
    new_kernel, extremes = scale_kernel_as(kernel, scale, (in_channel_axis,), dtype, out=out)
    return new_kernel, shift_through(kernel, shift, in_channel_axis, out_channel_axes), extremes


def shift_through(kernel, shift, in_channel_axis, out_channel_axes):
    """For every output channel (the row-major flattening of out_channel_axes), the float64 sum
    of its kernel entries times their input channel's shift: over slices of the leading axes
    of at most SLICE_ELEMENTS entries, each added where its output channels are."""
    kernel = np.asarray(kernel)
    shift = _along_channels(kernel, shift, (in_channel_axis,))
    depth = next(d for d in range(kernel.ndim)
                 if d == kernel.ndim - 1 or np.prod(kernel.shape[d:], dtype=np.int64) <= SLICE_ELEMENTS)
    summed_within = tuple(a - depth for a in range(depth, kernel.ndim) if a not in out_channel_axes)
    out_outside = [a for a in out_channel_axes if a < depth]
    total = np.zeros([kernel.shape[a] for a in out_channel_axes])
    for index in np.ndindex(*kernel.shape[:depth]):
        products = np.multiply(kernel[index], shift[tuple(i if shift.shape[a] > 1 else 0 for a, i in enumerate(index))],
                               dtype=np.float64)
        total[tuple(index[a] for a in out_outside)] += products.sum(axis=summed_within)
    return total.reshape(-1)
