"""Phase timing and memory through absl logging, also kept as records for the report."""

import contextlib
import dataclasses
import os
import resource
import time
from typing import List

from absl import logging


def rss_mb():
    """The process's resident set size now, in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb():
    """The process's peak resident set size so far, in MB (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclasses.dataclass
class PhaseRecord:
    name: str
    seconds: float
    rss_mb: float  # at the end of the phase
    peak_rss_mb: float  # of the process up to the end of the phase


@dataclasses.dataclass
class Timeline:
    phases: List[PhaseRecord] = dataclasses.field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name):
        started = time.perf_counter()
        logging.info("%s ...", name)
        yield
        record = PhaseRecord(name, time.perf_counter() - started, rss_mb(), peak_rss_mb())
        self.phases.append(record)
        logging.info("%s done in %.2f s (RSS %.0f MB, peak %.0f MB)", name, record.seconds,
                     record.rss_mb, record.peak_rss_mb)

    def to_list(self):
        return [dataclasses.asdict(p) for p in self.phases]
