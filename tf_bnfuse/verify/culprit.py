"""Which fold made a verification fail: leave folds out by halves until one (or the smallest set
found) explains the difference.

Tools that cross-check a converted model (Polygraphy, OpenVINO's) compare layer by layer; here
the suspects are the folds themselves, each of which tf_bnfuse can undo by running its
pipeline again with that fold left out.
"""

import dataclasses
import math
from typing import List, Optional

import numpy as np
import tensorflow as tf

from tf_bnfuse.verify import tolerance as tolerance_lib


@dataclasses.dataclass
class Culprit:
    """The folds that explain a failed check, and the failed output's error with and without them."""
    signature: str
    output: str
    device: str
    folds: List[dict]  # report.Fold as dicts: node, op, linear_node, linear_op; [] when no fold explains it
    error_before: float  # max rel error of the failed output, every fold in place
    error_without: Optional[float]  # the same with `folds` left out (None: not found)
    checks: int  # pipeline re-runs spent
    # Where no fold explains it: the first pass of the pipeline after which the output fails,
    # every fold left out (None: not found)
    pass_name: Optional[str] = None

    def describe(self):
        if not self.folds:
            found = ("" if self.pass_name is None else
                     "; caused by pass %s: the pipeline up to it fails, the one before it passes" % self.pass_name)
            return ("not caused by a fold: with every fold left out the output still differs (max rel error %.3g)%s"
                    % (self.error_without, found))
        what = " and ".join("the fold of %s (%s) into %s (%s)" % (f["node"], f["op"], f["linear_node"],
                                                                  f["linear_op"]) for f in self.folds)
        return "caused by %s: max rel error %.3g with it, %.3g without" % (what, self.error_before,
                                                                          self.error_without)


def max_checks(count):
    """The most re-checks bisect spends on `count` folds: 2 * log2(count) + 2."""
    return 2 * math.ceil(math.log2(max(count, 1))) + 2


def bisect(folds, check_without):
    """(the folds that explain the failure, (passes, error) with them left out, checks spent), by
    halving; ([], that check, 1) if leaving every fold out does not make it pass.

    check_without(folds left out) -> (passes, error). Assumes one culprit, as a broken fold
    usually is; when each half alone still fails, the culprits span both halves and the
    smallest set found so far is returned. At most max_checks(len(folds)) calls.
    """
    calls = [0]

    def check(left_out):
        calls[0] += 1
        return check_without(left_out)

    passed, error = check(folds)
    if not passed or not folds:
        return [], (passed, error), calls[0]
    candidates, found = list(folds), (passed, error)
    while len(candidates) > 1:
        first, second = candidates[:len(candidates) // 2], candidates[len(candidates) // 2:]
        result = check(first)
        if result[0]:
            candidates, found = first, result
            continue
        result = check(second)
        if result[0]:
            candidates, found = second, result
            continue
        break
    return candidates, found, calls[0]


def first_failing(count, fails):
    """The smallest k in 1..count with fails(k), by halving, given that fails(count) and that a
    failure, once there, stays for larger k (a pass's change to an output is not undone by a
    later pass); None where fails(count) is false. (k, calls of fails)."""
    calls = 1
    if not fails(count):
        return None, calls
    low, high = 0, count  # fails(high); not known to fail at low (0: nothing run)
    while high - low > 1:
        middle = (low + high) // 2
        calls += 1
        if fails(middle):
            high = middle
        else:
            low = middle
    return high, calls


def recheck(function, expected, inputs, failed):
    """(passes, max rel error) of one output of `function` against the original's (expected: its
    value there, compare.Expected), as the failed check judged it: same device, the folded graph
    run as that check reported it (with Grappler: a check failed as written failed with it
    too), held to the bound that failed (a tolerance's, or the models' own spread's)."""
    with tf.device(failed.device):
        actual = function(**{k: tf.constant(v) for k, v in inputs.items()})[failed.output].numpy()
    _, max_rel, _ = tolerance_lib.compare(np.asarray(expected), np.asarray(actual), {"rtol": 0.0, "atol": 0.0})
    return bool(max_rel <= failed.bound), max_rel
