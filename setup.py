import re

from setuptools import setup

with open("tf_bnfuse/__init__.py") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="tf_bnfuse",
    version=VERSION,
    description="Fold inference batch normalization into convolutions and matmuls of a TensorFlow SavedModel.",
    packages=["tf_bnfuse", "tf_bnfuse.graph", "tf_bnfuse.passes", "tf_bnfuse.savedmodel", "tf_bnfuse.verify",
              "tf_bnfuse.phases", "tf_bnfuse.configs"],
    package_dir={"tf_bnfuse.configs": "configs"},
    package_data={"tf_bnfuse.configs": ["*.json"]},
    python_requires=">=3.9",
    # tqdm: the calibration progress bar in a terminal (issue 37)
    install_requires=["tensorflow>=2.16", "numpy", "absl-py", "tqdm"],
    # pyflakes: the lint .ci/run runs before the tests (unused names and imports, undefined names)
    extras_require={"test": ["pytest", "tf-keras", "hypothesis", "ai-edge-litert", "pyflakes"],
                    "litert": ["ai-edge-litert"],
                    "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["tf_bnfuse = tf_bnfuse.cli:run"]},
)
