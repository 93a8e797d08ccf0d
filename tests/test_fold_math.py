"""The fold formula against independent references: a numpy convolution written
here, numpy matmul, and TensorFlow's own transposed convolution."""

import numpy as np
import pytest
import tensorflow as tf

from tf_bnfuse import fold_math

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)

RNG = np.random.default_rng(7)


def numpy_conv2d(x, kernel, stride=1):
    """VALID NHWC convolution, HWIO kernel, written out with plain loops over taps."""
    kh, kw, _, cout = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
            out += patch @ kernel[i, j]
    return out


def numpy_depthwise(x, kernel):
    """VALID NHWC depthwise convolution, kernel [h, w, in, multiplier]."""
    kh, kw, cin, mult = kernel.shape
    n, h, w, _ = x.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, cin, mult))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + h - kh + 1, j:j + w - kw + 1, :, None]
            out += patch * kernel[i, j]
    return out.reshape(n, h - kh + 1, w - kw + 1, cin * mult)


def reference_bn(y, gamma, beta, mean, var, eps):
    return gamma * (y - mean) / np.sqrt(var + eps) + beta


def random_bn(channels):
    return (RNG.uniform(0.5, 1.5, channels), RNG.normal(0, 1, channels),
            RNG.normal(0, 1, channels), RNG.uniform(0.1, 2, channels))


def fold_backward(kernel, bias, scale, shift, out_channel_axes):
    """(new kernel, new bias) as a backward fold computes them (passes/emit.fold_weights): the
    kernel scaled per output channel, rounded to float64 here; the bias, the linear op's own
    (None: none) composed with the affine step after it (passes/chain.py)."""
    new_kernel, _ = fold_math.scale_kernel_as(kernel, scale, out_channel_axes, np.float64)
    _, new_bias = fold_math.compose_affine((1.0, 0.0 if bias is None else np.asarray(bias)), (scale, shift))
    return new_kernel, new_bias


def test_batch_norm_to_affine_matches_the_batch_norm_formula():
    gamma, beta, mean, var = random_bn(5)
    x = RNG.normal(size=(3, 5))
    scale, shift = fold_math.batch_norm_to_affine(gamma, beta, mean, var, 1e-3)
    np.testing.assert_allclose(x * scale + shift, reference_bn(x, gamma, beta, mean, var, 1e-3),
                               rtol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_fold_matches_numpy_conv_then_batch_norm(with_bias, stride):
    x = RNG.normal(size=(2, 7, 7, 3))
    kernel = RNG.normal(size=(3, 3, 3, 4))
    bias = RNG.normal(size=4) if with_bias else None
    gamma, beta, mean, var = random_bn(4)
    expected = numpy_conv2d(x, kernel, stride) + (0 if bias is None else bias)
    expected = reference_bn(expected, gamma, beta, mean, var, 1e-3)

    scale, shift = fold_math.batch_norm_to_affine(gamma, beta, mean, var, 1e-3)
    new_kernel, new_bias = fold_backward(kernel, bias, scale, shift, (3,))
    np.testing.assert_allclose(numpy_conv2d(x, new_kernel, stride) + new_bias, expected, rtol=1e-10)


def test_depthwise_fold_with_multiplier_two_matches_numpy():
    x = RNG.normal(size=(1, 6, 6, 3))
    kernel = RNG.normal(size=(3, 3, 3, 2))
    gamma, beta, mean, var = random_bn(6)
    expected = reference_bn(numpy_depthwise(x, kernel), gamma, beta, mean, var, 1e-5)
    scale, shift = fold_math.batch_norm_to_affine(gamma, beta, mean, var, 1e-5)
    new_kernel, new_bias = fold_backward(kernel, None, scale, shift, (2, 3))
    np.testing.assert_allclose(numpy_depthwise(x, new_kernel) + new_bias, expected, rtol=1e-10)


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_fold_matches_numpy(transpose_b):
    x = RNG.normal(size=(4, 6))
    weights = RNG.normal(size=(6, 5))
    bias = RNG.normal(size=5)
    gamma, beta, mean, var = random_bn(5)
    expected = reference_bn(x @ weights + bias, gamma, beta, mean, var, 1e-3)
    scale, shift = fold_math.batch_norm_to_affine(gamma, beta, mean, var, 1e-3)
    stored = weights.T if transpose_b else weights
    new_kernel, new_bias = fold_backward(stored, bias, scale, shift,
                                                             (0,) if transpose_b else (1,))
    product = x @ (new_kernel.T if transpose_b else new_kernel)
    np.testing.assert_allclose(product + new_bias, expected, rtol=1e-10)


@pytest.mark.parametrize("linear", ["conv2d", "depthwise", "matmul", "matmul_transpose_b"])
def test_forward_fold_matches_numpy_and_slices_a_big_kernel(linear, monkeypatch):
    """linear(x * s + t, W) = linear(x, W') + b' against the numpy op on the affine input, with
    the kernel summed a few rows at a time (SLICE_ELEMENTS lowered) as a big one is."""
    monkeypatch.setattr(fold_math, "SLICE_ELEMENTS", 7)
    cin = 4
    scale, shift = RNG.uniform(0.5, 1.5, cin), RNG.normal(0, 1, cin)
    if linear in ("conv2d", "depthwise"):
        x = RNG.normal(size=(2, 6, 6, cin))
        kernel = RNG.normal(size=(3, 3, cin, 5 if linear == "conv2d" else 2))
        op = numpy_conv2d if linear == "conv2d" else numpy_depthwise
        axes = (3,) if linear == "conv2d" else (2, 3)
        in_axis = 2
    else:
        x = RNG.normal(size=(3, cin))
        transposed = linear == "matmul_transpose_b"
        kernel = RNG.normal(size=(5, cin) if transposed else (cin, 5))

        def op(inputs, weights):
            return inputs @ (weights.T if transposed else weights)
        axes, in_axis = ((0,), 1) if transposed else ((1,), 0)
    expected = op(x * scale + shift, kernel)
    new_kernel, bias, (high, low) = fold_math.fold_affine_into_next_linear(kernel, scale, shift, in_axis, axes)
    np.testing.assert_allclose(op(x, new_kernel) + bias, expected, rtol=1e-10, atol=1e-12)
    assert (high, low) == (new_kernel.max(), new_kernel.min())
    np.testing.assert_allclose(fold_math.shift_through(kernel, shift, in_axis, axes), bias, rtol=1e-12)


def test_forward_fold_makes_no_float64_copy_of_the_kernel():
    """Numpy's allocations, traced: a forward fold of a 9.4 MB float32 kernel into a given array
    takes a few slices' worth of memory, not the kernel in float64 (19 MB, three times over as
    the straightforward formula takes it)."""
    import tracemalloc
    kernel = RNG.normal(size=(3, 3, 512, 512)).astype(np.float32)
    scale, shift = RNG.uniform(0.5, 1.5, 512), RNG.normal(0, 1, 512)
    out = np.empty_like(kernel)
    tracemalloc.start()
    try:
        fold_math.fold_affine_into_next_linear(kernel, scale, shift, 2, (3,), np.float32, out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < kernel.nbytes / 4, peak


def test_transposed_conv_fold_matches_tensorflow_conv2d_transpose():
    # Conv2DBackpropInput's kernel is [h, w, out_channels, in_channels].
    x = RNG.normal(size=(1, 4, 4, 3))
    kernel = RNG.normal(size=(3, 3, 5, 3))
    gamma, beta, mean, var = random_bn(5)

    def deconv(k):
        return tf.raw_ops.Conv2DBackpropInput(input_sizes=[1, 8, 8, 5], filter=k, out_backprop=x,
                                              strides=[1, 2, 2, 1], padding="SAME").numpy()

    expected = reference_bn(deconv(kernel), gamma, beta, mean, var, 1e-3)
    scale, shift = fold_math.batch_norm_to_affine(gamma, beta, mean, var, 1e-3)
    new_kernel, new_bias = fold_backward(kernel, None, scale, shift, (2,))
    np.testing.assert_allclose(deconv(new_kernel) + new_bias, expected, rtol=1e-9, atol=1e-12)


def test_compose_affine_applies_first_then_second():
    x = RNG.normal(size=4)
    first = (RNG.normal(size=4), RNG.normal(size=4))
    second = (RNG.normal(size=4), RNG.normal(size=4))
    scale, shift = fold_math.compose_affine(first, second)
    np.testing.assert_allclose(x * scale + shift, (x * first[0] + first[1]) * second[0] + second[1])


@pytest.mark.parametrize("value,rank,axis,expected", [
    (np.float32(2.0), 4, -1, [2.0, 2.0, 2.0]),
    (np.arange(3.0), 4, -1, [0.0, 1.0, 2.0]),
    (np.arange(3.0).reshape(1, 1, 1, 3), 4, -1, [0.0, 1.0, 2.0]),
    (np.arange(3.0).reshape(3, 1, 1), 4, 1, [0.0, 1.0, 2.0]),
    (np.arange(3.0), 4, 1, None),                       # would broadcast along W
    (np.arange(6.0).reshape(2, 3), 4, -1, None),        # varies along W
    (np.ones((1, 1, 1, 1, 3)), 4, -1, None),            # would raise the rank
    (np.arange(2.0), 4, -1, None),                      # wrong channel count
])
def test_as_channel_vector_accepts_only_per_channel_constants(value, rank, axis, expected):
    result = fold_math.as_channel_vector(value, rank, axis, 3)
    if expected is None:
        assert result is None
    else:
        np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("shape,axes", [
    ((3, 3, 64, 80), (3,)),  # Conv2D HWIO, rows bigger than a slice
    ((3, 3, 8, 2), (2, 3)),  # depthwise: channel = in * multiplier + m
    ((300, 700), (1,)),  # MatMul [in, out]
    ((700, 300), (0,)),  # MatMul transpose_b [out, in]: the leading axis is the channel
    ((2, 3, 3, 5, 4), (4,)),  # Conv3D
    ((5, 0, 3), (2,)),  # empty
])
def test_scale_kernel_as_rounds_the_float64_products_and_reports_their_extremes(shape, axes, monkeypatch):
    monkeypatch.setattr(fold_math, "SLICE_ELEMENTS", 1000)  # several slices even for small kernels
    rng = np.random.default_rng(4)
    kernel = rng.standard_normal(shape).astype(np.float32)
    scale = rng.uniform(-3, 3, int(np.prod([shape[a] for a in axes])))
    broadcast = [1] * len(shape)
    for a in axes:
        broadcast[a] = shape[a]
    reference = kernel.astype(np.float64) * scale.reshape(broadcast)  # numpy, independently
    got, (high, low) = fold_math.scale_kernel_as(kernel, scale, axes, np.float16)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, reference.astype(np.float16))
    if reference.size:
        assert (high, low) == (reference.max(), reference.min())


def test_scale_kernel_as_reports_nan_and_overflow():
    kernel = np.ones((4, 6), np.float32)
    kernel[2, 3] = np.nan
    _, extremes = fold_math.scale_kernel_as(kernel, np.ones(6), (1,), np.float32)
    assert all(np.isnan(e) for e in extremes)
    _, (high, low) = fold_math.scale_kernel_as(np.full((2, 3), 300.0, np.float32), [1.0, -300.0, 2.0], (1,), np.float16)
    assert high == 600.0 and low == -90000.0  # past float16's 65504: the caller refuses the fold
