"""What the passes did: plain records that print and serialize."""

import dataclasses
from typing import List, Optional


@dataclasses.dataclass
class Fold:
    """One affine node (batch norm or Mul/Add chain) folded into a linear op."""
    node: str
    op: str
    linear_node: str
    linear_op: str
    absorbed: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Skip:
    """One candidate left alone, and why."""
    node: str
    op: str
    reason: str


@dataclasses.dataclass
class Lowered:
    """A batch norm that did not fold, rewritten as simpler ops (lower_batch_norm)."""
    node: str
    op: str
    into: str


@dataclasses.dataclass
class PassReport:
    pass_name: str
    nodes_before: int = 0
    nodes_after: int = 0
    folds: List[Fold] = dataclasses.field(default_factory=list)
    skips: List[Skip] = dataclasses.field(default_factory=list)
    lowered: List[Lowered] = dataclasses.field(default_factory=list)
    note: Optional[str] = None

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GraphReport:
    """What a pipeline did to one graph (one signature)."""
    nodes_before: int
    nodes_after: int
    passes: List[PassReport] = dataclasses.field(default_factory=list)
    # Another signature with the very same function: this one was folded with it, once.
    same_as: Optional[str] = None

    @property
    def folds(self):
        return [f for p in self.passes for f in p.folds]

    @property
    def skips(self):
        return [s for p in self.passes for s in p.skips]

    @property
    def lowered(self):
        return [x for p in self.passes for x in p.lowered]

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunReport:
    """What fold_saved_model did: per signature graph reports and the verification."""
    saved_model_dir: str
    output_dir: str
    signatures: dict = dataclasses.field(default_factory=dict)  # key -> GraphReport
    verification: object = None  # verify.VerificationReport, or None when skipped
    phases: list = dataclasses.field(default_factory=list)  # timing.PhaseRecord dicts, in order
    tflite: object = None  # tflite.TfliteReport with --tflite_output, else None
    # Tag sets of the input's other MetaGraphs, not in the output (--drop_other_metagraphs)
    dropped_metagraphs: list = dataclasses.field(default_factory=list)
    # tf.functions of the input's root object besides its signatures: kept (calling the folded
    # signature that wraps them), and not kept {name: why}
    kept_functions: list = dataclasses.field(default_factory=list)
    dropped_functions: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        return {
            "saved_model_dir": self.saved_model_dir,
            "output_dir": self.output_dir,
            "signatures": {k: v.to_dict() for k, v in self.signatures.items()},
            "verification": self.verification.to_dict() if self.verification else None,
            "phases": self.phases,
            "tflite": dataclasses.asdict(self.tflite) if self.tflite else None,
            "dropped_metagraphs": self.dropped_metagraphs,
            "kept_functions": self.kept_functions,
            "dropped_functions": self.dropped_functions,
        }
