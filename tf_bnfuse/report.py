"""What a run did: plain records that print and serialize, the phase timeline, and the summary
the CLI prints. Imports nothing of tf_bnfuse, so that every layer may use it."""

import contextlib
import dataclasses
import logging
import os
import resource
import sys
import time
from typing import List, Optional

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class CheckPoint:
    """Where a fold can be checked by itself: the tensors its chain starts from and the tensor that
    holds its result, named the same before and after the fold (verify/fold_check.py)."""
    inputs: List[str]
    output: str
    terms: Optional[int]  # products each output element of the linear op sums (its rounding grows with them)
    dtype: str  # the linear op's
    # The called function (a While body, an If branch) whose tensors these name; None: the signature's graph
    function: Optional[str] = None
    # Nodes the fold leaves with their names but other values (a backward fold's linear op): no
    # check may start from them
    changed: List[str] = dataclasses.field(default_factory=list)
    # A tensor that holds the output's value too, where the output may be bypassed (an Identity of it)
    output_alias: Optional[str] = None
    # Backward: the tensor the new bias is added to, which holds the output less its value at a
    # zero input: where a later fold took the bias away, the fold is checked there
    unbiased: Optional[str] = None


@dataclasses.dataclass
class Fold:
    """One affine node (batch norm or Mul/Add chain) folded into a linear op."""
    node: str
    op: str
    linear_node: str
    linear_op: str
    absorbed: List[str] = dataclasses.field(default_factory=list)
    check: Optional[CheckPoint] = None


@dataclasses.dataclass
class Skip:
    """One candidate left alone, and why."""
    node: str
    op: str
    reason: str


@dataclasses.dataclass
class LeftAlone:
    """One batch norm (or affine chain) that did not fold: its name scope, the reason a user reads,
    and the ops the passes left alone in it, each with its own reason (passes/left_alone.py)."""
    name: str
    reason: str
    ops: List[Skip] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ExplorerData:
    """The Model Explorer node data written for a .tflite model (phases/explorer_data.py): how many
    folds and batch norms left alone it draws, and how many name no op of the model."""
    path: str
    drawn: int
    not_drawn: int


@dataclasses.dataclass
class Lowered:
    """A batch norm that did not fold, rewritten as the one form every runtime takes (lower_batch_norm)."""
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
    # The skips of the passes, by the batch norm or chain they belong to
    left_alone: List[LeftAlone] = dataclasses.field(default_factory=list)
    # The other signatures with this very function (their same_as names this one)
    shared_by: List[str] = dataclasses.field(default_factory=list)
    # The most bytes of weight values its weight store kept alive through the passes and the fold
    # checks (graph/weights.py, WeightStore.held_bytes): one copy of each kernel and one in flight
    weights_peak_bytes: Optional[int] = None

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
        """Its fields; a signature folded with another (same_as) points there instead of repeating
        its passes."""
        if self.same_as:
            return {"nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "same_as": self.same_as}
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunReport:
    """What fold_saved_model did: per signature graph reports and the verification."""
    saved_model_dir: str
    output_dir: str
    signatures: dict = dataclasses.field(default_factory=dict)  # key -> GraphReport
    verification: object = None  # verify.VerificationReport, or None when skipped
    phases: list = dataclasses.field(default_factory=list)  # PhaseRecord dicts, in order
    tflite: object = None  # tflite.TfliteReport with --tflite_output, else None
    # Tag sets of the input's other MetaGraphs, not in the output (--drop_other_metagraphs)
    dropped_metagraphs: list = dataclasses.field(default_factory=list)
    # The input's other MetaGraphs, kept: tag set ("gpu,serve") -> its RunReport (signatures, verification)
    other_metagraphs: dict = dataclasses.field(default_factory=dict)
    # tf.functions of the input's root object besides its signatures: kept (calling the folded
    # signature that wraps them), and not kept {name: why}
    kept_functions: list = dataclasses.field(default_factory=list)
    dropped_functions: dict = dataclasses.field(default_factory=dict)
    # The signal (SIGINT, SIGTERM) that arrived once the output was being moved into place, if any
    interrupted_after_output: Optional[str] = None

    def __str__(self):
        return format_run(self)

    def to_dict(self):
        return {
            "saved_model_dir": self.saved_model_dir,
            "output_dir": self.output_dir,
            "signatures": {k: v.to_dict() for k, v in self.signatures.items()},
            "verification": self.verification.to_dict() if self.verification else None,
            "phases": self.phases,
            "tflite": _tflite_dict(self.tflite) if self.tflite else None,
            "dropped_metagraphs": self.dropped_metagraphs,
            "other_metagraphs": {k: v.to_dict() for k, v in self.other_metagraphs.items()},
            "kept_functions": self.kept_functions,
            "dropped_functions": self.dropped_functions,
            "interrupted_after_output": self.interrupted_after_output,
        }


def _tflite_dict(tflite):
    result = dataclasses.asdict(tflite)
    result["ok"] = tflite.ok
    if tflite.quantization is not None:
        result["quantization"]["ok"] = tflite.quantization.ok
    return result


# --- Phases: time and memory, logged and kept for the report ---------------------------------

PACKAGE_LOGGER = "tf_bnfuse"  # the parent of every module's logger; quiet unless the caller asks


class ProgressFormatter(logging.Formatter):
    """'tf_bnfuse [  3.1 s] message': progress lines with the time since `started` (monotonic)."""

    def __init__(self, started):
        super().__init__()
        self.started = started

    def format(self, record):
        level = "" if record.levelno == logging.INFO else record.levelname + ": "
        return "tf_bnfuse [%5.1f s] %s%s" % (time.monotonic() - self.started, level, record.getMessage())


@contextlib.contextmanager
def speaking(verbose):
    """Within, with verbose, tf_bnfuse's progress lines go to stderr (a Python call's verbose=True),
    unless the caller's own logging configuration shows them already; the logger is left as it was."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not verbose or logger.isEnabledFor(logging.INFO) and _has_real_handler(logger):
        yield
        return
    level, propagate = logger.level, logger.propagate
    handlers = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(ProgressFormatter(time.monotonic()))
    if propagate and _has_real_handler(logger.parent):
        # The caller's handlers above get what they got before, not the INFO lines as well.
        handlers.append(_Propagating(logger.parent, logger.getEffectiveLevel()))
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)  # (setLevel: the loggers cache what is enabled)
        logger.propagate = propagate


class _Propagating(logging.Handler):
    """Hands the records of its level and above to `parent`'s handlers and those above them, as
    propagation does."""

    def __init__(self, parent, level):
        super().__init__(level)
        self.parent = parent

    def emit(self, record):
        self.parent.callHandlers(record)


@contextlib.contextmanager
def root_handlers_as_found():
    """TensorFlow's SavedModel and signature code logs through absl, whose first message calls
    logging.basicConfig() where the root logger has no handler: every warning of the caller's
    process would then print otherwise. A root logger without handlers is left without."""
    root = logging.getLogger()
    had_none = not root.handlers
    try:
        yield
    finally:
        if had_none:
            for handler in list(root.handlers):
                root.removeHandler(handler)


def _has_real_handler(logger):
    """Whether a record of this logger reaches a handler other than a NullHandler."""
    while logger is not None:
        if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def progress_bar(iterable, total, description):
    """iterable, shown as a progress bar (tqdm) on stderr where stderr is a terminal and progress is
    being shown; elsewhere the step's own log line is all (no line per item)."""
    if not (sys.stderr.isatty() and _log.isEnabledFor(logging.INFO) and _has_real_handler(_log)):
        return iterable
    import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm.tqdm(iterable, total=total, desc="tf_bnfuse %s" % description, leave=False, file=sys.stderr)

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
        _log.info("%s ...", name)
        yield
        record = PhaseRecord(name, time.perf_counter() - started, rss_mb(), peak_rss_mb())
        self.phases.append(record)
        _log.info("%s done in %.2f s (RSS %.0f MB, peak %.0f MB)", name, record.seconds,
                  record.rss_mb, record.peak_rss_mb)

    def step(self, what):
        """A step inside the phase that is running (a TFLite conversion, a measurement), logged as it starts."""
        _log.info("  %s ...", what)

    def to_list(self):
        return [dataclasses.asdict(p) for p in self.phases]


# --- The human-readable summary the CLI prints ------------------------------------------------

def format_run(report):
    """The summary of a RunReport, one line per fact."""
    lines = ["tf_bnfuse: %s -> %s" % (report.saved_model_dir, report.output_dir)]
    lines += _kept_and_dropped_lines(report)
    for key, graph in report.signatures.items():
        lines += _signature_lines(key, graph)
    lines += _verification_lines(report.verification)
    for tags, other in report.other_metagraphs.items():
        lines.append("MetaGraph %s, kept beside the --tags one:" % tags)
        lines += ["  " + line for line in _kept_and_dropped_lines(other)]
        for key, graph in other.signatures.items():
            lines += ["  " + line for line in _signature_lines(key, graph)]
        lines += ["  " + line for line in _verification_lines(other.verification)]
    if report.tflite is not None:
        lines += _tflite_lines(report.tflite)
    if report.interrupted_after_output:
        lines.append("%s arrived after the output was moved into place: the output is complete and verified"
                     % report.interrupted_after_output)
    return "\n".join(lines)


def _kept_and_dropped_lines(report):
    lines = []
    if report.kept_functions:
        lines.append("functions of the input's root object kept, running the folded signatures that compute them: %s"
                     % ", ".join(report.kept_functions))
    for name, reason in report.dropped_functions.items():
        part = "only in part, NOT KEPT" if name in report.kept_functions else "NOT KEPT"
        lines.append("function %s of the input's root object %s: %s (call the output through its "
                     "signatures: %s)" % (name, part, reason, ", ".join(report.signatures)))
    for tags in report.dropped_metagraphs:
        lines.append("MetaGraph %s: DROPPED (--drop_other_metagraphs); the output does not have it" % tags)
    return lines


def _signature_lines(key, graph):
    if graph.same_as:
        return ["signature %s: the same function as %s, folded with it: %d -> %d nodes" % (
            key, graph.same_as, graph.nodes_before, graph.nodes_after)]
    lines = ["signature %s: %d -> %d nodes, %d folded, %d left alone%s" % (
        key, graph.nodes_before, graph.nodes_after, len(graph.folds), len(graph.left_alone),
        " (the function of signature%s %s too)" % ("s" if len(graph.shared_by) > 1 else "", ", ".join(graph.shared_by))
        if graph.shared_by else "")]
    for pass_report in graph.passes:
        extra = "; %d rewritten" % len(pass_report.lowered) if pass_report.lowered else ""
        extra += "; " + pass_report.note if pass_report.note else ""
        lines.append("  pass %s: %d folded%s" % (pass_report.pass_name, len(pass_report.folds), extra))
        for fold in pass_report.folds:
            lines.append("    folded  %s (%s) into %s (%s)" % (fold.node, fold.op, fold.linear_node, fold.linear_op))
        for lowered in pass_report.lowered:
            lines.append("    rewritten %s (%s) as %s, not folded" % (lowered.node, lowered.op, lowered.into))
    for entry in graph.left_alone:
        lines.append("  left alone %s: %s" % (entry.name, entry.reason))
        lines += ["    %s (%s): %s" % (skip.node, skip.op, skip.reason) for skip in entry.ops]
    return lines


def _verification_lines(verification):
    if verification is None:
        return ["verification: SKIPPED -- the output ran every signature on test inputs, but was NOT "
                "compared with the input"]
    lines = ["verification on %s: %s" % (", ".join(verification.devices), "passed" if verification.ok else "FAILED")]
    for where, how in verification.inputs.items():
        lines.append("  test values of %s: %s" % (where, how))
    for where, reason in verification.not_run.items():
        lines.append("  %s: not compared, the original does not run there: %s" % (where, reason))
    for c in verification.checks:
        if c.random:
            lines.append("  %s/%s on %s: RANDOM (the original differs between two calls on the same input): "
                         "not compared" % (c.signature, c.output, c.device))
            continue
        lines.append("  %s/%s on %s: max abs error %.3g, max rel error %.3g (%s) %s" % (
            c.signature, c.output, c.device, c.max_abs_error, c.max_rel_error, c.describe_bound(),
            "ok" if c.ok else "FAILED"))
    lines += _fold_check_lines(verification.folds)
    for where, difference in verification.grappler_differs.items():
        lines.append("  WARNING: %s: TensorFlow's Grappler computes the INPUT otherwise than its graph says (a "
                     "TensorFlow bug, such as oneDNN's LeakyRelu fusion); the output computes the graph as "
                     "written, and differs from the input as TensorFlow runs it by up to %.3g" % (where, difference))
    if verification.culprit is not None:
        lines.append("  the first failed output: %s (%d pipeline re-runs)" % (verification.culprit.describe(),
                                                                           verification.culprit.checks))
    if verification.checks and not verification.compared:
        lines.append("  WARNING: every output is random: nothing could be compared")
    return lines


def _fold_check_lines(folds):
    if folds is None or not folds.total:
        return []
    worst = folds.worst
    outcome = "ok" if folds.ok else "%d FAILED" % len(folds.failures())
    if worst is not None:
        outcome += "; the worst %s at %.3g of its bound (max rel error %.3g, bound %.3g)" % (
            worst.node, worst.excess, worst.max_rel_error, worst.bound)
    cropped = sum(c.compared_rows is not None for c in folds.checks)
    if cropped:
        outcome += "; %d of them on their input's first rows" % cropped
    lines = ["  %d of %d folds checked by themselves on %s, each beside its original chain on the same input, %s" % (
        len(folds.checks), folds.total, folds.device, outcome)]
    for where, why in sorted(folds.not_checked.items()):
        lines.append("  fold %s: not checked by itself: %s" % (where, why))
    return lines


def _op_list(counts):
    return ", ".join("%s %d" % kv for kv in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _tflite_lines(tflite):
    lines = ["tflite %s (%d bytes): %d ops: %s" % (tflite.path, tflite.size_bytes, sum(tflite.ops.values()),
                                                   _op_list(tflite.ops)),
             "  run on %s" % tflite.runtime]
    if tflite.promoted_float16:
        lines.append("  float16 compute promoted to float32 for TFLite (it has no float16 conv kernels); "
                     "signature dtypes kept")
    lines.append("  batch-norm MUL/ADD left next to a conv or fully connected op: %d" % tflite.batch_norm_ops)
    if tflite.converter_alone_ops is not None:
        alone = tflite.converter_alone_ops
        lines.append("  converting the input directly: %d ops: %s; batch-norm MUL/ADD left next to a conv or "
                     "fully connected op: %d" % (sum(alone.values()), _op_list(alone),
                                                 tflite.converter_alone_batch_norm_ops))
    else:
        lines.append("  converting the input directly fails: %s" % tflite.converter_alone_error)
    if tflite.quantization is not None:
        lines += _quantization_lines(tflite)
    for c in tflite.checks:
        lines.append("  %s/%s on the TFLite runtime: max abs error %.3g, max rel error %.3g "
                     "(rtol %g, atol %g) %s" % (c.signature, c.output, c.max_abs_error, c.max_rel_error,
                                                c.rtol, c.atol, "ok" if c.ok else "FAILED"))
    if tflite.explorer_data is not None:
        data = tflite.explorer_data
        lines.append("  Model Explorer node data %s: %d folds and batch norms left alone drawn%s; open with "
                     "model-explorer %s --node_data_paths=%s" % (
                         data.path, data.drawn, ", %d name no op of the model" % data.not_drawn if data.not_drawn
                         else "", tflite.path, data.path))
    return lines


def _quantization_lines(tflite):
    """The quantized model beside the converter quantizing the input alone, as one table."""
    q = tflite.quantization
    lines = ["  quantized %s%s; calibration: %s; measured on %s" % (
        q.mode, " with int8 input and output" if q.io == "int8" else "", q.calibration or "none needed", q.held_out)]
    alone = {(m.signature, m.output, m.logits_of): m for m in q.converter_alone_metrics}

    def cell(metric):
        if metric is None:
            return "-"
        top1 = "" if metric.top1_agreement is None else ", top-1 agree %.2f" % metric.top1_agreement
        return "rel L2 %.3g, SNR %.1f dB%s" % (metric.relative_l2_error, metric.snr_db, top1)

    rows = [("", "tf_bnfuse", "converter alone"),
            ("size", "%d bytes" % tflite.size_bytes,
             "-" if tflite.converter_alone_size_bytes is None else "%d bytes" % tflite.converter_alone_size_bytes),
            ("ops", str(sum(tflite.ops.values())),
             "-" if tflite.converter_alone_ops is None else str(sum(tflite.converter_alone_ops.values()))),
            ("batch-norm MUL/ADD", str(tflite.batch_norm_ops),
             "-" if tflite.converter_alone_batch_norm_ops is None else str(tflite.converter_alone_batch_norm_ops))]
    rows += [("%s/%s%s" % (m.signature, m.output, " logits" if m.logits_of else ""), cell(m),
              cell(alone.get((m.signature, m.output, m.logits_of)))) for m in q.metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += ["  | %s |" % " | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    if tflite.converter_alone_error:
        lines.append("  the converter alone fails: %s" % tflite.converter_alone_error)
    softmax = sorted({"%s/%s" % (m.signature, m.output) for m in q.metrics if m.logits_of})
    if softmax:
        lines.append("  %s: a softmax; its row's top-1 compares quantized probabilities, which tie when they are "
                     "close, the logits row the order of the softmax's input (log of the original's probabilities, "
                     "both less their row mean): read the logits row" % ", ".join(softmax))
    if q.max_error is not None:
        worst = q.worst
        lines.append("  --tflite_max_error %g: %s (worst: %s/%s, %.3g)" % (
            q.max_error, "ok" if q.ok else "EXCEEDED", worst.signature, worst.output, worst.relative_l2_error))
    return lines
