"""Builds keras.applications SavedModels for the benchmark, one Keras flavour per process.

    python benchmarks/build_models.py --keras keras3 --out build/bench/models ResNet50 MobileNetV2

weights=None (nothing is downloaded) and every BatchNormalization gets random
statistics, so that each fold changes the weights. Keras 3 models are written
with model.export (the form TF Serving and the TFLite converter take), tf-keras
models with model.save(save_format="tf"). A model already built is kept.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--keras", choices=["keras3", "tf_keras"], required=True)
parser.add_argument("--out", required=True, help="folder to write <keras>_<model> SavedModels into")
parser.add_argument("--input_size", type=int, default=224)
parser.add_argument("models", nargs="+")
args = parser.parse_args()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if args.keras == "tf_keras":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow loads

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402,F401

if args.keras == "tf_keras":
    import tf_keras as keras  # noqa: E402
else:
    import keras  # noqa: E402


def randomize_batch_norms(model, rng):
    layers = model._flatten_layers() if hasattr(model, "_flatten_layers") else model.submodules
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0] if layer.gamma is not None else layer.moving_mean.shape[0]
            weights = []
            if layer.gamma is not None:
                weights.append(rng.uniform(0.5, 1.5, c))
            if layer.beta is not None:
                weights.append(rng.normal(0, 0.5, c))
            weights += [rng.normal(0, 0.5, c), rng.uniform(0.2, 2.0, c)]
            layer.set_weights(weights)


def main():
    rng = np.random.default_rng(0)
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        path = os.path.join(args.out, "%s_%s" % (args.keras, name))
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            continue
        size = args.input_size
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
        randomize_batch_norms(model, rng)
        scratch = path + ".partial"
        if args.keras == "tf_keras":
            model.save(scratch, save_format="tf")
        else:
            model.export(scratch, verbose=False)
        os.replace(scratch, path)
        print("built", path)
        sys.stdout.flush()
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
