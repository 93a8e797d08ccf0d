"""Builds tf-keras (Keras 2) SavedModels for the tests, in a process of its own.

    TF_USE_LEGACY_KERAS=1 python tests/build_tf_keras_models.py OUT_DIR NAME [NAME ...]

tf-keras and Keras 3 cannot share a process, so the tests run this script in a
subprocess. Every BatchNormalization gets random gamma, beta, moving mean and
moving variance, so every fold changes the weights. No weights are downloaded.
"""

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

L = keras.layers


def _sequential(input_shape, *layers):
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def conv_bn():
    return _sequential((12, 12, 3), L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU())


def conv_no_bias_bn():
    return _sequential((12, 12, 3), L.Conv2D(8, 3, strides=2, use_bias=False), L.BatchNormalization())


def dense_rank3_bn():
    """Dense on a rank-3 input: a MatMul between Reshapes, then the batch norm on the last axis."""
    return _sequential((5, 7), L.Dense(6), L.BatchNormalization())


def pool_bn_conv():
    """A batch norm after a pool, before a conv with VALID padding: only a forward fold reaches it."""
    return _sequential((12, 12, 3), L.MaxPooling2D(), L.BatchNormalization(), L.Conv2D(5, 3))


def depthwise_bn():
    return _sequential((12, 12, 4), L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
                       L.BatchNormalization(), L.ReLU(6.0))


def separable_bn():
    return _sequential((12, 12, 4), L.SeparableConv2D(6, 3, padding="same"), L.BatchNormalization())


def conv_transpose_bn():
    return _sequential((6, 6, 4), L.Conv2DTranspose(5, 3, strides=2, padding="same"), L.BatchNormalization())


def dilated_conv_bn():
    """A dilated conv is lowered to SpaceToBatchND -> Conv2D -> BatchToSpaceND."""
    return _sequential((16, 16, 3), L.Conv2D(8, 3, dilation_rate=2, padding="same"), L.BatchNormalization())


def dilated_depthwise_bn():
    return _sequential((16, 16, 4), L.DepthwiseConv2D(3, dilation_rate=2), L.BatchNormalization())


def conv3d_bn():
    return _sequential((4, 6, 6, 2), L.Conv3D(4, 3, padding="same"), L.BatchNormalization())


def channels_first_bn():
    return _sequential((3, 10, 10), L.Conv2D(6, 3, padding="same", data_format="channels_first"),
                       L.BatchNormalization(axis=1))


def conv1d_bn():
    return _sequential((12, 3), L.Conv1D(6, 3), L.BatchNormalization())


def dense_bn():
    """tf-keras exports this batch norm (on a rank-2 input) as Mul/Add, not FusedBatchNormV3."""
    return _sequential((7,), L.Dense(5), L.BatchNormalization(), L.ReLU())


def branch_bn():
    """The conv's output feeds a BatchNormalization and a ReLU: folding must not touch the ReLU."""
    inputs = keras.Input((10, 10, 3), name="image")
    conv = L.Conv2D(6, 3, padding="same")(inputs)
    return keras.Model(inputs, L.Concatenate()([L.BatchNormalization()(conv), L.ReLU()(conv)]))


def residual_leaky_relu():
    """conv -> batch norm -> residual add -> LeakyReLU(0.1): folded naively, TF's oneDNN
    remapper fuses it with the default alpha 0.2 (see linear_ops.misfused_by_remapper)."""
    inputs = keras.Input((8, 8, 4), name="image")
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(inputs))
    return keras.Model(inputs, L.LeakyReLU(alpha=0.1)(L.Add()([x, inputs])))


def leaky_residual_then_bn():
    """conv with bias -> residual add -> LeakyReLU(0.1) in the INPUT (what TF's oneDNN remapper
    computes with alpha 0.2), then conv -> batch norm to fold."""
    inputs = keras.Input((8, 8, 4), name="image")
    x = L.LeakyReLU(alpha=0.1)(L.Add()([L.Conv2D(4, 3, padding="same")(inputs), inputs]))
    return keras.Model(inputs, L.BatchNormalization()(L.Conv2D(6, 3, padding="same")(x)))


def lstm_dense_bn():
    """LSTM (return_sequences) -> Dense -> BatchNormalization: a While loop, then a foldable MatMul."""
    return _sequential((5, 3), L.LSTM(4, return_sequences=True), L.Dense(6), L.BatchNormalization())


def gru_dense_bn():
    return _sequential((5, 3), L.GRU(4, return_sequences=True), L.Dense(6), L.BatchNormalization())


def grouped_conv_bn():
    """Conv2D(groups=4): tf-keras runs it in a jit_compile function."""
    return _sequential((8, 8, 8), L.Conv2D(8, 3, groups=4, padding="same"), L.BatchNormalization())


def mobilenet_v2_small():
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                          classifier_activation=None)


def resnet50():
    return keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=10,
                                       classifier_activation=None)


def mobilenet_v2():
    return keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=10,
                                          classifier_activation=None)


MODELS = {f.__name__: f for f in (conv_bn, residual_leaky_relu, leaky_residual_then_bn, lstm_dense_bn, gru_dense_bn, grouped_conv_bn, pool_bn_conv, dense_rank3_bn, conv_no_bias_bn, dilated_conv_bn, dilated_depthwise_bn, depthwise_bn, separable_bn, conv_transpose_bn,
                                  conv3d_bn, channels_first_bn, conv1d_bn, dense_bn, branch_bn, mobilenet_v2_small, resnet50,
                                  mobilenet_v2)}


def randomize_batch_norms(model, rng):
    count = 0
    for layer in model.submodules:
        if isinstance(layer, L.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels),
                               rng.normal(0, 0.5, channels), rng.uniform(0.2, 2.0, channels)])
            count += 1
    return count


def main(out_dir, names):
    rng = np.random.default_rng(0)
    for name in names:
        keras.backend.clear_session()
        model = MODELS[name]()
        if randomize_batch_norms(model, rng) == 0:
            raise SystemExit("%s has no BatchNormalization" % name)
        model.save(os.path.join(out_dir, name), save_format="tf")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
