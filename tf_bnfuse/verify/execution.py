"""How the models are run for the verification: on every visible device, and where the
original must be taken as written, without Grappler (compare.py's docstring says why)."""

import contextlib

import tensorflow as tf

@contextlib.contextmanager
def as_written():
    """Functions first called inside run their graphs without Grappler (a function called under
    another optimizer config than before is instantiated again).

    The setting is the process's: a function another thread first calls meanwhile is built
    without Grappler too. The caller's own setting comes back on exit."""
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})

def unless_accepted_as_written(first, attempt, accepted):
    """(result, as_written): first, with False, when accepted(first); else attempt() run again
    under as_written(), with True, when accepted(that); else first, with False.

    first is attempt()'s result as TensorFlow runs the original (with Grappler). The one
    fallback every comparison with the original makes (module docstring).
    """
    if accepted(first):
        return first, False
    with as_written():
        again = attempt()
    return (again, True) if accepted(again) else (first, False)

def visible_devices():
    """Every logical CPU and GPU device TensorFlow can see, CPU first."""
    return [d.name for d in tf.config.list_logical_devices("CPU") + tf.config.list_logical_devices("GPU")]
