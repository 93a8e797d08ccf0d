"""One Keras model zoo for both flavours: every builder takes the keras module it builds with.

Keras 3 models are built in the test process and written with model.export. tf-keras and
Keras 3 cannot share a process (TF_USE_LEGACY_KERAS must be set before TensorFlow loads),
so tf-keras models are built by running this file in a subprocess, written with
model.save(save_format="tf"):

    python tests/model_zoo.py tf_keras OUT_DIR NAME [NAME ...]

Every BatchNormalization gets random gamma, beta, moving mean and variance
(keras_flavour.randomize_batch_norms, shared with the benchmark), so every fold changes the
weights. Nothing is downloaded (weights=None).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import keras_flavour  # noqa: E402


def _leaky_relu(keras, slope):
    """LeakyReLU(slope): Keras 3 names the slope negative_slope, tf-keras alpha."""
    if int(keras.__version__.split(".")[0]) >= 3:
        return keras.layers.LeakyReLU(negative_slope=slope)
    return keras.layers.LeakyReLU(alpha=slope)


def _sequential(keras, input_shape, *layers):
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def conv_bn(keras):
    L = keras.layers
    return _sequential(keras, (12, 12, 3), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU())


def conv_no_bias_bn(keras):
    L = keras.layers
    return _sequential(keras, (12, 12, 3), L.Conv2D(8, 3, strides=2, use_bias=False), L.BatchNormalization())


def conv_bn_swish(keras):
    """Keras 3's swish is a tf.custom_gradient: its frozen ops carry a gradient type to save."""
    L = keras.layers
    return _sequential(keras, (12, 12, 3), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(),
                       L.Activation("swish"))


def dilated_conv_bn(keras):
    """A dilated conv is lowered to SpaceToBatchND -> Conv2D -> BatchToSpaceND."""
    L = keras.layers
    return _sequential(keras, (16, 16, 3), L.Conv2D(8, 3, dilation_rate=2, padding="same"), L.BatchNormalization())


def dilated_depthwise_bn(keras):
    L = keras.layers
    return _sequential(keras, (16, 16, 4), L.DepthwiseConv2D(3, dilation_rate=2), L.BatchNormalization())


def dense_rank3_bn(keras):
    """Dense on a rank-3 input: a MatMul between Reshapes, then the batch norm on the last axis."""
    L = keras.layers
    return _sequential(keras, (5, 7), L.Dense(6), L.BatchNormalization())


def einsum_dense_bn(keras):
    """EinsumDense "abc,cd->abd": Keras 3 computes it as a BatchMatMulV2 and its bias, tf-keras as
    an Einsum (not a linear op tf_bnfuse folds into: left alone, reported)."""
    L = keras.layers
    return _sequential(keras, (5, 7), L.EinsumDense("abc,cd->abd", (5, 6), bias_axes="d"), L.BatchNormalization())


def pool_bn_conv(keras):
    """A batch norm after a pool, before a conv with VALID padding: only a forward fold reaches it."""
    L = keras.layers
    return _sequential(keras, (12, 12, 3), L.MaxPooling2D(), L.BatchNormalization(), L.Conv2D(5, 3))


def mixed_float16_conv_bn(keras):
    """Under mixed_float16 the conv runs in float16 and the batch norm in float32, with Casts between."""
    L = keras.layers
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return _sequential(keras, (12, 12, 3), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def depthwise_bn(keras):
    L = keras.layers
    return _sequential(keras, (12, 12, 4), L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
                       L.BatchNormalization(), L.ReLU(6.0))


def separable_bn(keras):
    L = keras.layers
    return _sequential(keras, (12, 12, 4), L.SeparableConv2D(6, 3, padding="same"), L.BatchNormalization())


def conv_transpose_bn(keras):
    L = keras.layers
    return _sequential(keras, (6, 6, 4), L.Conv2DTranspose(5, 3, strides=2, padding="same"),
                       L.BatchNormalization())


def conv1d_bn(keras):
    L = keras.layers
    return _sequential(keras, (12, 3), L.Conv1D(6, 3), L.BatchNormalization())


def dense_bn(keras):
    """tf-keras exports this batch norm (on a rank-2 input) as Mul/Add, not FusedBatchNormV3."""
    L = keras.layers
    return _sequential(keras, (7,), L.Dense(5), L.BatchNormalization(), L.ReLU())


def conv3d_bn(keras):
    L = keras.layers
    return _sequential(keras, (4, 6, 6, 2), L.Conv3D(4, 3, padding="same"), L.BatchNormalization())


def conv3d_no_bias_bn(keras):
    L = keras.layers
    return _sequential(keras, (4, 6, 6, 2), L.Conv3D(4, 3, padding="same", use_bias=False), L.BatchNormalization())


def channels_first_bn(keras):
    L = keras.layers
    return _sequential(keras, (3, 10, 10), L.Conv2D(6, 3, padding="same", data_format="channels_first"),
                       L.BatchNormalization(axis=1))


def branch_bn(keras):
    """The conv's output feeds a BatchNormalization and a ReLU: folding must not touch the ReLU."""
    L = keras.layers
    inputs = keras.Input((10, 10, 3), name="image")
    conv = L.Conv2D(6, 3, padding="same")(inputs)
    return keras.Model(inputs, L.Concatenate()([L.BatchNormalization()(conv), L.ReLU()(conv)]))


def preactivation_concat_bn(keras):
    """DenseNet's pre-activation block: concat(input, conv) -> batch norm -> ReLU -> conv. The batch
    norm can fold neither back (the concat joins the input) nor forward (the ReLU): it stays."""
    L = keras.layers
    inputs = keras.Input((8, 8, 4), name="image")
    x = L.Concatenate()([inputs, L.Conv2D(4, 3, padding="same")(inputs)])
    return keras.Model(inputs, L.Conv2D(6, 1)(L.ReLU()(L.BatchNormalization()(x))))


def residual_leaky_relu(keras):
    """conv -> batch norm -> residual add -> LeakyReLU(0.1): folded naively, TF's oneDNN
    remapper fuses it with the default alpha 0.2 (see linear_ops.misfused_by_remapper)."""
    L = keras.layers
    inputs = keras.Input((8, 8, 4), name="image")
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))
    return keras.Model(inputs, _leaky_relu(keras, 0.1)(L.Add()([x, inputs])))


def leaky_residual_then_bn(keras):
    """conv with bias -> residual add -> LeakyReLU(0.1) in the INPUT (what TF's oneDNN remapper
    computes with alpha 0.2), then conv -> batch norm to fold."""
    L = keras.layers
    inputs = keras.Input((8, 8, 4), name="image")
    x = _leaky_relu(keras, 0.1)(L.Add()([L.Conv2D(4, 3, padding="same")(inputs), inputs]))
    return keras.Model(inputs, L.BatchNormalization()(L.Conv2D(6, 3, padding="same")(x)))


def lstm_dense_bn(keras):
    """LSTM (return_sequences) -> Dense -> BatchNormalization: a While loop, then a foldable MatMul."""
    L = keras.layers
    return _sequential(keras, (5, 3), L.LSTM(4, return_sequences=True), L.Dense(6), L.BatchNormalization())


def gru_dense_bn(keras):
    L = keras.layers
    return _sequential(keras, (5, 3), L.GRU(4, return_sequences=True), L.Dense(6), L.BatchNormalization())


def grouped_conv_bn(keras):
    """Conv2D(groups=4): tf-keras runs it in a jit_compile function."""
    L = keras.layers
    return _sequential(keras, (8, 8, 8), L.Conv2D(8, 3, groups=4, padding="same"), L.BatchNormalization())


def mixed_float16_float32_output(keras):
    """The Keras mixed-precision guide's model: mixed_float16 layers, a float32 output layer.

    The output is float32, but it is computed in float16: only float16's
    tolerance fits the comparison.
    """
    L = keras.layers
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((12, 12, 3), name="image")
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(inputs)))
        x = L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(x))
        x = L.Dense(10)(L.GlobalAveragePooling2D()(x))
        outputs = L.Activation("linear", dtype="float32")(x)
        return keras.Model(inputs, outputs)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def dropout_training(keras):
    """Dropout called with training=True: every call drops other units."""
    L = keras.layers
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))
    return keras.Model(inputs, L.Dropout(0.5)(x, training=True))


def bn_training(keras):
    """A BatchNormalization called with training=True (the batch's statistics, its moving averages
    updated on every call) after one that folds. (Keras 3 runs the layers after it in training
    mode too.)"""
    L = keras.layers
    inputs = keras.Input((10, 10, 3), name="image")
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))
    return keras.Model(inputs, L.BatchNormalization()(L.Conv2D(5, 3, padding="same")(x), training=True))


def stateful_counter(keras):
    """A layer that counts its calls in a variable it assigns (state the output must keep), then a
    conv + batch norm that folds."""
    import tensorflow as tf
    L = keras.layers

    class CallCounter(L.Layer):
        def build(self, input_shape):
            self.calls = self.add_weight(name="calls", shape=(), initializer="zeros", trainable=False)

        def call(self, x):
            self.calls.assign_add(1.0)
            return x + 0.0 * tf.cast(self.calls, x.dtype)

    inputs = keras.Input((8, 8, 3), name="image")
    x = CallCounter()(inputs)
    return keras.Model(inputs, L.BatchNormalization()(L.Conv2D(4, 3)(x)))


def softmax_100(keras):
    """Conv + batch norm, then a 100-class Dense and its softmax as separate layers (the logits
    are a layer's output): nearly equal probabilities, which int8 quantization ties."""
    L = keras.layers
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.GlobalAveragePooling2D()(L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(inputs))))
    return keras.Model(inputs, L.Activation("softmax")(L.Dense(100, name="logits")(x)))


def _embedding_conv_bn(keras, rows):
    L = keras.layers
    inputs = keras.Input((6,), dtype="int32", name="ids")
    x = L.Embedding(rows, 5)(inputs)
    return keras.Model(inputs, L.BatchNormalization()(L.Conv1D(4, 3, padding="same")(x)))


def embedding4_conv_bn(keras):
    """Embedding(4): ids 0..3 only; the default test ids [0, 8) would be out of range."""
    return _embedding_conv_bn(keras, 4)


def embedding1000_conv_bn(keras):
    return _embedding_conv_bn(keras, 1000)


def sequential_conv_dense_bn(keras):
    """A keras.Sequential model (the others here are functional models built layer by layer)."""
    L = keras.layers
    return keras.Sequential([keras.Input((6, 6, 2), name="image"), L.Conv2D(4, 3), L.BatchNormalization(),
                             L.Flatten(), L.Dense(3), L.BatchNormalization()])


def subclassed_conv_bn(keras):
    """A subclassed model, built by calling it once (what Keras 3 traces a subclassed model's
    inputs from)."""
    import numpy as np
    L = keras.layers

    class ConvBnBlock(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.dense, self.bn2 = L.Conv2D(6, 3), L.BatchNormalization(), L.Dense(4), \
                L.BatchNormalization()

        def call(self, x, training=False):
            x = keras.activations.relu(self.bn(self.conv(x), training=training))
            return self.bn2(self.dense(L.GlobalAveragePooling2D()(x)), training=training)

    model = ConvBnBlock()
    model(np.zeros((1, 10, 10, 3), np.float32))
    return model


def _application(keras, name, size, **kwargs):
    """A keras.applications model, weights=None, size x size x 3 inputs, a 10-class head without
    activation unless kwargs say otherwise."""
    options = dict(input_shape=(size, size, 3), weights=None, classes=10, classifier_activation=None)
    options.update(kwargs)
    return getattr(keras.applications, name)(**options)


def mobilenet_v2_small(keras):
    return _application(keras, "MobileNetV2", 32, alpha=0.35)


def resnet50_small(keras):
    return _application(keras, "ResNet50", 32)


def resnet50(keras):
    return _application(keras, "ResNet50", 64)


def mobilenet_v2(keras):
    return _application(keras, "MobileNetV2", 96)


def mobilenet_v2_softmax(keras):
    """A 1000-class softmax classifier: its outputs on random inputs hide almost any error inside."""
    return _application(keras, "MobileNetV2", 32, alpha=0.35, classes=1000, classifier_activation="softmax")


def efficientnet_b0(keras):
    return _application(keras, "EfficientNetB0", 32)


def efficientnet_v2_b0(keras):
    """Deep enough that its own float32 rounding exceeds rtol 1e-4 at its output (issue 26)."""
    return _application(keras, "EfficientNetV2B0", 64)


def conv_bn_blocks(keras):
    """Three Conv2D -> BatchNormalization -> ReLU blocks, 3x3 kernels over 8 and 16 channels."""
    L = keras.layers
    return _sequential(keras, (12, 12, 3), *[layer for channels in (8, 16, 16) for layer in (
        L.Conv2D(channels, 3, padding="same"), L.BatchNormalization(), L.ReLU())])


def pool_bn_conv_bn(keras):
    """conv -> batch norm -> ReLU -> pool -> batch norm -> VALID conv -> batch norm: the last batch
    norm folds backward into the VALID conv, the one before it forward into the same conv."""
    L = keras.layers
    return _sequential(keras, (8, 8, 3), L.Conv2D(4, 3, padding="same"), L.BatchNormalization(), L.ReLU(),
                       L.AveragePooling2D(2), L.BatchNormalization(), L.Conv2D(4, 3, padding="valid"),
                       L.BatchNormalization())


def mixed_float16_project_expand(keras):
    """MobileNetV2's project -> expand under mixed_float16: conv -> batch norm (float32, Casts
    around it) -> 1x1 VALID conv -> batch norm -> ReLU."""
    L = keras.layers
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return _sequential(keras, (8, 8, 3), L.Conv2D(8, 3, padding="same", use_bias=False), L.BatchNormalization(),
                           L.Conv2D(16, 1, use_bias=False), L.BatchNormalization(), L.ReLU())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def two_inputs_same_shape(keras):
    """Two inputs of one shape, "second" before "first", feeding Subtract -> Conv2D -> batch norm:
    only their order tells them apart."""
    L = keras.layers
    second, first = keras.Input((8, 8, 2), name="second"), keras.Input((8, 8, 2), name="first")
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(L.Subtract()([second, first])))
    return keras.Model([second, first], x)


def three_inputs(keras):
    """Three inputs of different shapes (an image, a vector, a scale), not in sorted order."""
    L = keras.layers
    image, vector, scale = keras.Input((6, 6, 2), name="image"), keras.Input((4,), name="vector"), \
        keras.Input((1,), name="a_scale")
    x = L.GlobalAveragePooling2D()(L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(image)))
    return keras.Model([image, vector, scale], L.Multiply()([L.Add()([x, vector]), scale]))


def _under_policy(policy, build):
    """A zoo builder that builds `build`'s model under a Keras mixed-precision policy."""
    def builder(keras):
        keras.mixed_precision.set_global_policy(policy)
        try:
            return build(keras)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    builder.__name__ = "%s_%s" % (policy, build.__name__)
    builder.__doc__ = "%s under %s: each fold's linear op computes in half precision." % (build.__name__, policy)
    return builder


HALF_PRECISION = [_under_policy(policy, build) for policy in ("mixed_float16", "mixed_bfloat16")
                  for build in (conv_bn_blocks, resnet50_small, mobilenet_v2_small)]

MODELS = {f.__name__: f for f in HALF_PRECISION + [conv_bn_blocks, two_inputs_same_shape, three_inputs, pool_bn_conv_bn, mixed_float16_project_expand, 
    conv_bn, conv_no_bias_bn, conv_bn_swish, dilated_conv_bn, dilated_depthwise_bn, dense_rank3_bn, einsum_dense_bn,
    pool_bn_conv,
    mixed_float16_conv_bn, depthwise_bn, separable_bn, conv_transpose_bn, conv1d_bn, dense_bn, conv3d_bn,
    conv3d_no_bias_bn, channels_first_bn, branch_bn, preactivation_concat_bn, residual_leaky_relu, leaky_residual_then_bn, lstm_dense_bn,
    gru_dense_bn, grouped_conv_bn, mixed_float16_float32_output, dropout_training, bn_training, stateful_counter, softmax_100, embedding4_conv_bn,
    embedding1000_conv_bn, sequential_conv_dense_bn, subclassed_conv_bn, mobilenet_v2_small, resnet50_small, resnet50, mobilenet_v2, mobilenet_v2_softmax,
    efficientnet_b0, efficientnet_v2_b0]}


def build_model(keras, name, seed=0):
    """(the live model, number of batch norms): built with seeded kernels, its batch norms randomized."""
    import numpy as np
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)  # the same kernels in every run: a deep model's rounding is part of a test
    try:
        model = MODELS[name](keras)
    finally:
        # That seeds TensorFlow's global generator too, which would make later unseeded random ops
        # (tf.nn.dropout in another test's model) repeat from call to call.
        import tensorflow as tf
        tf.random.set_seed(None)
    count = keras_flavour.randomize_batch_norms(keras, model, np.random.default_rng(seed))
    if count == 0:
        raise ValueError("%s has no BatchNormalization" % name)
    return model, count


def build(keras, name, out_dir, seed=0):
    """Builds, randomizes and writes one model as its flavour writes SavedModels; returns
    (path, number of batch norms)."""
    model, count = build_model(keras, name, seed)
    path = os.path.join(out_dir, name)
    if int(keras.__version__.split(".")[0]) >= 3:
        model.export(path, verbose=False)
    else:
        model.save(path, save_format="tf")
    return path, count


def main(flavour, out_dir, names):
    keras = keras_flavour.import_keras(flavour)
    for name in names:
        build(keras, name, out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
