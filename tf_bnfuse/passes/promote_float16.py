"""promote_float16: float16/bfloat16 compute -> float32, signature dtypes kept.

Not in the default pipeline. The TFLite converter has no float16 kernels for
conv or matmul, so a mixed_float16 model does not convert; --tflite_output
runs this pass on a copy of the folded graphs before converting. Every
float16/bfloat16 type attribute becomes float32 and every such constant is
converted; a float16 signature input is cast to float32 where it enters, and
a float16 signature output gets a Cast back under its own name (the op that
computed it is renamed), so inputs and outputs keep their dtypes. Graphs with
a function library are left alone: their functions would need the same
rewrite.
"""

import numpy as np
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib

NAME = "promote_float16"
HALF_TYPES = frozenset({tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum})
_FLOAT = tf.float32.as_datatype_enum


def has_half(graph_def):
    """Whether any node computes in float16 or bfloat16."""
    return any(_has_half(node) for node in graph_def.node)


def _has_half(node):
    return any(value.type in HALF_TYPES or any(t in HALF_TYPES for t in value.list.type)
               for value in node.attr.values())


def _output_dtypes(graph_def, tensors):
    """The dtype of each tensor, read from the graph as TensorFlow builds it."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return {t: graph.get_tensor_by_name("%s:%d" % graph_lib.canonical_tensor(t)).dtype for t in tensors}


def run(context, graph_def, outputs):
    report = report_lib.PassReport(NAME, nodes_before=len(graph_def.node), nodes_after=len(graph_def.node))
    if not any(_has_half(node) for node in graph_def.node):
        return graph_def, report
    if graph_def.library.function:
        report.note = "not promoted: the graph has a function library"
        return graph_def, report
    index = context.index(graph_def, outputs)
    half_outputs = {graph_lib.canonical_tensor(t): dtype for t, dtype in _output_dtypes(graph_def, outputs).items()
                    if dtype.as_datatype_enum in HALF_TYPES}
    if any(port != 0 for _, port in half_outputs):
        report.note = "not promoted: a float16 output is not the first output of its op"
        return graph_def, report
    editor = context.editor(graph_def)
    promoted = 0
    for original in graph_def.node:
        if not _has_half(original):
            continue
        promoted += 1
        node = editor.node(original.name)
        if node.op == "Placeholder":  # stays float16 (a signature input); its readers get float32
            cast = editor.unique_name(node.name + "/to_float32")
            for consumer, position in index.data_consumers(node.name, 0):
                editor.node(consumer).input[position] = cast
            editor.add_node(cast, "Cast", [node.name], {
                "SrcT": graph_lib.type_attr(node.attr["dtype"].type), "DstT": graph_lib.type_attr(tf.float32)})
            continue
        if node.op == "Const":
            value = index.const_array(node).astype(np.float32)
            node.attr.pop(graph_lib.WEIGHT_KEY_ATTR, None)
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        for value in node.attr.values():
            if value.type in HALF_TYPES:
                value.type = _FLOAT
            if any(t in HALF_TYPES for t in value.list.type):
                types = [_FLOAT if t in HALF_TYPES else t for t in value.list.type]
                del value.list.type[:]
                value.list.type.extend(types)
    # A float16 output becomes a Cast of the float32 value under the op's name;
    # the op is renamed and everything inside the graph reads it directly.
    for (name, _), dtype in sorted(half_outputs.items()):
        computed = editor.unique_name(name + "/float32")
        editor.rename_node(name, computed)
        for port in index.ports_in_use(name):
            for consumer, position in index.data_consumers(name, port):
                editor.node(consumer).input[position] = graph_lib.tensor_name(computed, port)
        for consumer in index.control_consumers(name):
            target = editor.node(consumer)
            target.input[list(target.input).index("^" + name)] = "^" + computed
        editor.add_node(name, "Cast", [computed], {"SrcT": graph_lib.type_attr(tf.float32),
                                                   "DstT": graph_lib.type_attr(dtype)})
    report.nodes_after = len(editor.graph_def.node)
    report.note = "%d nodes promoted to float32" % promoted
    return editor.graph_def, report
