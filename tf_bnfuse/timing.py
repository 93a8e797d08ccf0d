"""Phase timing through absl logging."""

import contextlib
import time

from absl import logging


@contextlib.contextmanager
def phase(name):
    started = time.perf_counter()
    logging.info("%s ...", name)
    yield
    logging.info("%s done in %.2f s", name, time.perf_counter() - started)
