"""Keras 3 models for the tests, built in the test process and exported with model.export.

Every BatchNormalization gets random gamma, beta, moving mean and variance.
"""

import os

import keras
import numpy as np

L = keras.layers


def _sequential(input_shape, *layers):
    return keras.Sequential([keras.Input(input_shape)] + list(layers))


def conv_bn():
    return _sequential((12, 12, 3), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU())


def conv_bn_swish():
    """Keras 3's swish is a tf.custom_gradient: its frozen ops carry a gradient type to save."""
    return _sequential((12, 12, 3), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(),
                       L.Activation("swish"))


def dilated_conv_bn():
    """A dilated conv is lowered to SpaceToBatchND -> Conv2D -> BatchToSpaceND."""
    return _sequential((16, 16, 3), L.Conv2D(8, 3, dilation_rate=2, padding="same"), L.BatchNormalization())


def dilated_depthwise_bn():
    return _sequential((16, 16, 4), L.DepthwiseConv2D(3, dilation_rate=2), L.BatchNormalization())


def dense_rank3_bn():
    """Dense on a rank-3 input: a MatMul between Reshapes, then the batch norm on the last axis."""
    return _sequential((5, 7), L.Dense(6), L.BatchNormalization())


def pool_bn_conv():
    """A batch norm after a pool, before a conv with VALID padding: only a forward fold reaches it."""
    return _sequential((12, 12, 3), L.MaxPooling2D(), L.BatchNormalization(), L.Conv2D(5, 3))


def mixed_float16_conv_bn():
    """Under mixed_float16 the conv runs in float16 and the batch norm in float32, with Casts between."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return _sequential((12, 12, 3), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU())
    finally:
        keras.mixed_precision.set_global_policy("float32")


def depthwise_bn():
    return _sequential((12, 12, 4), L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
                       L.BatchNormalization(), L.ReLU(6.0))


def separable_bn():
    return _sequential((12, 12, 4), L.SeparableConv2D(6, 3, padding="same"), L.BatchNormalization())


def conv_transpose_bn():
    return _sequential((6, 6, 4), L.Conv2DTranspose(5, 3, strides=2, padding="same"), L.BatchNormalization())


def conv1d_bn():
    return _sequential((12, 3), L.Conv1D(6, 3), L.BatchNormalization())


def dense_bn():
    return _sequential((7,), L.Dense(5), L.BatchNormalization(), L.ReLU())


def conv3d_bn():
    return _sequential((4, 6, 6, 2), L.Conv3D(4, 3, padding="same", use_bias=False), L.BatchNormalization())


def branch_bn():
    """The conv's output feeds a BatchNormalization and a ReLU: folding must not touch the ReLU."""
    inputs = keras.Input((10, 10, 3))
    conv = L.Conv2D(6, 3, padding="same")(inputs)
    return keras.Model(inputs, L.Concatenate()([L.BatchNormalization()(conv), L.ReLU()(conv)]))


def mobilenet_v2_small():
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                          classifier_activation=None)


def resnet50_small():
    return keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10,
                                       classifier_activation=None)


def residual_leaky_relu():
    """conv -> batch norm -> residual add -> LeakyReLU(0.1) (see linear_ops.misfused_by_remapper)."""
    inputs = keras.Input((8, 8, 4))
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))
    return keras.Model(inputs, L.LeakyReLU(negative_slope=0.1)(L.Add()([x, inputs])))


def mixed_float16_float32_output():
    """The Keras mixed-precision guide's model: mixed_float16 layers, a float32 output layer.

    The output is float32, but it is computed in float16: only float16's
    tolerance fits the comparison.
    """
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((12, 12, 3))
        x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(inputs)))
        x = L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(x))
        x = L.Dense(10)(L.GlobalAveragePooling2D()(x))
        outputs = L.Activation("linear", dtype="float32")(x)
        return keras.Model(inputs, outputs)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def dropout_training():
    """Dropout called with training=True: every call drops other units."""
    inputs = keras.Input((12, 12, 3))
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))
    return keras.Model(inputs, L.Dropout(0.5)(x, training=True))


def _embedding_conv_bn(rows):
    inputs = keras.Input((6,), dtype="int32")
    x = L.Embedding(rows, 5)(inputs)
    return keras.Model(inputs, L.BatchNormalization()(L.Conv1D(4, 3, padding="same")(x)))


def embedding4_conv_bn():
    """Embedding(4): ids 0..3 only; the default test ids [0, 8) would be out of range."""
    return _embedding_conv_bn(4)


def embedding1000_conv_bn():
    return _embedding_conv_bn(1000)


MODELS = {f.__name__: f for f in (conv_bn, residual_leaky_relu, mixed_float16_float32_output, dropout_training, embedding4_conv_bn, embedding1000_conv_bn, mixed_float16_conv_bn, pool_bn_conv, dense_rank3_bn, conv_bn_swish, dilated_conv_bn, dilated_depthwise_bn, depthwise_bn, separable_bn, conv_transpose_bn, conv1d_bn, dense_bn,
                                  conv3d_bn, branch_bn, mobilenet_v2_small, resnet50_small)}


def randomize_batch_norms(model, rng):
    count = 0
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels),
                               rng.normal(0, 0.5, channels), rng.uniform(0.2, 2.0, channels)])
            count += 1
    return count


def build(name, out_dir, seed=0):
    """Builds, randomizes and exports one model; returns (path, number of batch norms)."""
    model = MODELS[name]()
    count = randomize_batch_norms(model, np.random.default_rng(seed))
    path = os.path.join(out_dir, name)
    model.export(path, verbose=False)
    return path, count
