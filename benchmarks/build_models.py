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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keras_flavour import import_keras, randomize_batch_norms  # noqa: E402

keras = import_keras(args.keras)  # before TensorFlow loads

import numpy as np  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        path = os.path.join(args.out, "%s_%s" % (args.keras, name))
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            continue
        size = args.input_size
        model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
        randomize_batch_norms(keras, model, rng)
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
