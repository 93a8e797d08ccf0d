"""Builds the small example SavedModel that the README's first command folds.

    python examples/build_example_model.py OUT_DIR

A tf.Module of raw TensorFlow ops with random weights and random batch-norm
statistics (so every fold changes the weights), and two signatures:

- serving_default(image) -> {logits, embedding}:
  Conv2D+BiasAdd -> FusedBatchNormV3 -> Relu
  -> DepthwiseConv2dNative (multiplier 2) -> FusedBatchNormV3 -> Relu6
  -> Conv2DBackpropInput (transposed conv) -> FusedBatchNormV2
  -> a Conv2D whose output feeds both a FusedBatchNorm and a Relu: that batch
     norm must be left alone, because folding it would change the Relu branch.
- embedding(image) -> {embedding}: the first two blocks only, sharing variables.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class BatchNorm(tf.Module):
    def __init__(self, channels, rng, name):
        super().__init__(name=name)
        self.gamma = tf.Variable(rng.uniform(0.5, 1.5, channels).astype(np.float32), name="gamma")
        self.beta = tf.Variable(rng.normal(0, 0.5, channels).astype(np.float32), name="beta")
        self.mean = tf.Variable(rng.normal(0, 0.5, channels).astype(np.float32), name="moving_mean")
        self.variance = tf.Variable(rng.uniform(0.2, 2.0, channels).astype(np.float32),
                                    name="moving_variance")

    def __call__(self, x, op=tf.raw_ops.FusedBatchNormV3):
        return op(x=x, scale=self.gamma, offset=self.beta, mean=self.mean, variance=self.variance,
                  epsilon=1e-3, is_training=False)[0]


def _weight(rng, shape, name):
    fan_in = np.prod(shape[:-1])
    return tf.Variable((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name=name)


class ExampleNet(tf.Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.conv1 = _weight(rng, (3, 3, 3, 8), "conv1")
        self.bias1 = tf.Variable(rng.normal(0, 0.1, 8).astype(np.float32), name="bias1")
        self.bn1 = BatchNorm(8, rng, "bn1")
        self.depthwise = _weight(rng, (3, 3, 8, 2), "depthwise")
        self.bn2 = BatchNorm(16, rng, "bn2")
        self.deconv = _weight(rng, (3, 3, 8, 16), "deconv")  # [h, w, out, in]
        self.bn3 = BatchNorm(8, rng, "bn3")
        self.conv4 = _weight(rng, (1, 1, 8, 4), "conv4")
        self.bn4 = BatchNorm(4, rng, "bn4")
        self.dense = _weight(rng, (8, 10), "dense")

    def _features(self, image):
        x = tf.nn.conv2d(image, self.conv1, 1, "SAME")
        x = tf.nn.relu(self.bn1(tf.nn.bias_add(x, self.bias1)))
        x = tf.raw_ops.DepthwiseConv2dNative(input=x, filter=self.depthwise, strides=[1, 2, 2, 1],
                                             padding="SAME")
        return tf.nn.relu6(self.bn2(x))

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")])
    def serve(self, image):
        features = self._features(image)
        batch = tf.shape(features)[0]
        x = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.stack([batch, 16, 16, 8]),
                                           filter=self.deconv, out_backprop=features,
                                           strides=[1, 2, 2, 1], padding="SAME")
        x = self.bn3(x, op=tf.raw_ops.FusedBatchNormV2)
        branch = tf.nn.conv2d(x, self.conv4, 1, "SAME")
        # `branch` has two consumers: this batch norm must not be folded.
        mixed = tf.concat([self.bn4(branch, op=tf.raw_ops.FusedBatchNorm), tf.nn.relu(branch)], -1)
        pooled = tf.reduce_mean(mixed, axis=[1, 2])
        return {"logits": tf.matmul(pooled, self.dense), "embedding": tf.reduce_mean(features, [1, 2])}

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="image")])
    def embed(self, image):
        return {"embedding": tf.reduce_mean(self._features(image), [1, 2])}


def build(path, seed=0):
    net = ExampleNet(seed)
    tf.saved_model.save(net, path, signatures={"serving_default": net.serve, "embedding": net.embed})
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_example_model.py OUT_DIR")
    build(sys.argv[1])
    print("example SavedModel written to %s" % sys.argv[1])
