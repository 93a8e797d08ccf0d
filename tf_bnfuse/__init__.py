"""tf_bnfuse: fold inference batch norm into the convolutions and matmuls that feed it.

    from tf_bnfuse import fold, export, fold_saved_model, fold_graph_def

The API is imported lazily so that `python -m tf_bnfuse` can quiet TensorFlow's
start-up logging before TensorFlow loads.
"""

import logging

# A library speaks only when asked: the caller's logging configuration (or verbose=True) decides.
logging.getLogger("tf_bnfuse").addHandler(logging.NullHandler())

__version__ = "0.2.0"
__all__ = ["fold", "export", "fold_saved_model", "fold_graph_def"]


def __getattr__(name):
    if name in __all__:
        from tf_bnfuse import api
        return getattr(api, name)
    raise AttributeError("module 'tf_bnfuse' has no attribute %r" % name)
