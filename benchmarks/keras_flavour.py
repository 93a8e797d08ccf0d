"""Shared by the scripts that build keras.applications models: pick a Keras, randomize batch norms.

tf-keras and Keras 3 cannot share a process, and TF_USE_LEGACY_KERAS must be
set before TensorFlow is imported, so import_keras is called first thing.
"""

import os


def import_keras(flavour):
    """The keras module of a flavour ("keras3" or "tf_keras"); call before importing TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if flavour == "tf_keras":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tf_keras as keras
    else:
        import keras
    return keras


def batch_norm_layers(keras, model):
    layers = model._flatten_layers() if hasattr(model, "_flatten_layers") else model.submodules
    return [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]


def randomize_batch_norms(keras, model, rng):
    """Random gamma, beta, moving mean and variance for every BatchNormalization (so every fold
    changes the weights); returns how many there are."""
    layers = batch_norm_layers(keras, model)
    for layer in layers:
        c = layer.moving_mean.shape[0]
        weights = []
        if layer.gamma is not None:
            weights.append(rng.uniform(0.5, 1.5, c))
        if layer.beta is not None:
            weights.append(rng.normal(0, 0.5, c))
        layer.set_weights(weights + [rng.normal(0, 0.5, c), rng.uniform(0.2, 2.0, c)])
    return len(layers)
