"""What the verification found: each output's check and the report of a run's verification."""

import dataclasses
from typing import Dict, List, Optional

@dataclasses.dataclass
class OutputCheck:
    signature: str
    output: str
    device: str
    dtype: str
    max_abs_error: float
    max_rel_error: float  # max abs error / max |original|
    rtol: float
    atol: float
    ok: bool
    precision: str = ""  # what set the tolerance: "float32 output", "float16 compute", ...
    random: bool = False  # the original gives other values on a second call: not compared
    # Where the tolerance did not suffice: max |original - itself evaluated otherwise| / max
    # |original| (in float64, as written in float32): the original's own spread (None: not measured)
    own_spread: Optional[float] = None
    bound: Optional[float] = None  # on max_rel_error
    bound_source: str = ""  # what set it: the tolerance's precision, or the original's own spread


    def describe_bound(self):
        """What the check held the output to, for the summary and the error."""
        bound = "bound %.3g: rtol %g, atol %g, set by %s" % (
            self.bound if self.bound is not None else float("nan"), self.rtol, self.atol, self.bound_source or self.precision)
        return bound if self.own_spread is None else "%s; the models' own spread %.3g" % (bound, self.own_spread)

@dataclasses.dataclass
class VerificationReport:
    devices: List[str]
    checks: List[OutputCheck] = dataclasses.field(default_factory=list)
    # "signature on device" -> why the ORIGINAL cannot run there (nothing to compare with)
    not_run: Dict[str, str] = dataclasses.field(default_factory=dict)
    # "signature/input" -> how integer test values were chosen
    inputs: Dict[str, str] = dataclasses.field(default_factory=dict)
    # "signature on device" -> max abs difference between the folded model and the original as
    # TensorFlow runs it, where the folded model matched only the original as written (a
    # TensorFlow bug in Grappler; module docstring)
    grappler_differs: Dict[str, float] = dataclasses.field(default_factory=dict)
    # The fold that explains the first failed check (verify/culprit.Culprit), when one failed
    culprit: object = None
    folds: object = None  # fold_check.FoldChecks: every fold checked by itself

    @property
    def ok(self):
        return all(c.ok for c in self.checks) and (self.folds is None or self.folds.ok)

    @property
    def compared(self):
        return [c for c in self.checks if not c.random]

    def random_outputs(self):
        return sorted({"%s/%s" % (c.signature, c.output) for c in self.checks if c.random})

    def failures(self):
        return [c for c in self.checks if not c.ok]

    def to_dict(self):
        result = dict(dataclasses.asdict(self), ok=self.ok)
        result["random_outputs"] = self.random_outputs()
        result["folds"] = self.folds.to_dict() if self.folds is not None else None
        return result
