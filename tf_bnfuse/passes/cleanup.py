"""cleanup: removes the nodes that no graph output needs (dead after folding)."""

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib

NAME = "cleanup"


def run(context, graph_def, outputs):  # pylint: disable=unused-argument
    result = graph_lib.cleanup(graph_def, outputs)
    removed = len(graph_def.node) - len(result.node)
    return result, report_lib.PassReport(
        NAME, nodes_before=len(graph_def.node), nodes_after=len(result.node),
        note="removed %d dead nodes" % removed)
