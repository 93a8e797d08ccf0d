"""The one pass runner: a list of passes over a GraphDef, for the pipeline and for function bodies.

The argument is never modified.
"""

import contextlib
import gc
import logging
import time

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import passes as passes_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import left_alone
from tf_bnfuse.passes.context import PassContext


def default_outputs(graph_def):
    """Tensors of the nodes nothing reads: the graph's outputs when none are given."""
    index = graph_lib.GraphIndex(graph_def)
    return [node.name for node in graph_def.node
            if node.op not in ("NoOp", "Const", "Placeholder")
            and not index.ports_in_use(node.name)
            and not index.control_consumers(node.name)]


def run_pipeline(graph_def, outputs, pipeline, owns_input=False, context=None, weights_out=False):
    """Returns (new graph_def, [PassReport]) after every pass in `pipeline`.

    A pass never modifies the GraphDef it is given, and returns that same
    object when it changes nothing. owns_input=True says the caller gives
    graph_def away, so it may come back as the result uncopied. While the
    passes run, big weights are held outside the proto (context.weights).
    context: the PassContext to run in (a new one by default; graph_def may name weights
    of its store). weights_out=True leaves them there: the result's stored Consts name
    context.weights (the writer takes them from it), and what the passes read of a
    variable is forgotten.
    """
    context = context if context is not None else PassContext()
    weights = context.weights
    reports = []
    with _cyclic_gc_paused():
        current = weights.strip(graph_def)
        if owns_input:
            graph_def = None  # so the input is freed as soon as it has been replaced
        for name, options in passes_lib.pass_entries(pipeline):
            started = time.perf_counter()
            result, report = passes_lib.REGISTRY[name](context, current, outputs, **options)
            if result is not current:
                context.graph_changed()  # and with it the last reference to the replaced graph
                weights.retain(result)
            current = result
            logging.getLogger(__name__).debug(
                "pass %s: %d -> %d nodes, %d folded, %d skipped (%.3f s)", name, report.nodes_before,
                report.nodes_after, len(report.folds), len(report.skips), time.perf_counter() - started)
            reports.append(report)
        context.graph_changed()
        if current is graph_def:  # the result is never the caller's argument itself
            current = graph_lib.copy_graph_def(graph_def)
        if weights_out:
            weights.forget_read_variables()
        else:
            weights.restore(current)  # current is this function's own graph by now
    _drop_skips_folded_later(reports)
    return current, reports


def fold_graph(graph_def, outputs, pipeline, **kwargs):
    """(new graph_def, GraphReport): run_pipeline(graph_def, outputs, pipeline, **kwargs), and what
    it left alone grouped by batch norm (read from graph_def before the passes take it over)."""
    nodes_before, scopes = len(graph_def.node), left_alone.batch_statistics_scopes(graph_def)
    new_graph_def, pass_reports = run_pipeline(graph_def, outputs, pipeline, **kwargs)
    return new_graph_def, report_lib.GraphReport(nodes_before, len(new_graph_def.node), pass_reports,
                                                 left_alone=left_alone.grouped(scopes, pass_reports))


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic collector off while the passes run.

    A pass makes a dict and lists per node (GraphIndex) and few reference cycles; the
    collector's full scans of all those objects made the per-node time grow with the
    graph, far less with it paused (measured side by side when this was added on graphs of
    1k to 100k nodes). Reference counting still frees everything as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _drop_skips_folded_later(reports):
    """A node one pass left alone and a later pass folded (fold_forward reaches what
    fold_affine cannot) is reported as folded only; the earlier pass's note says so."""
    for k, later in enumerate(reports):
        folded = {name for fold in later.folds for name in [fold.node] + list(fold.absorbed)}
        if not folded:
            continue
        for earlier in reports[:k]:
            kept = [skip for skip in earlier.skips if skip.node not in folded]
            if len(kept) != len(earlier.skips):
                note = "%d left alone here, folded by %s" % (len(earlier.skips) - len(kept), later.pass_name)
                earlier.note = "%s; %s" % (earlier.note, note) if earlier.note else note
                earlier.skips = kept
