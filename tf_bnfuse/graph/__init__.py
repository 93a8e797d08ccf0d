"""The graph layer: GraphDef plumbing shared by the passes, the SavedModel I/O and verification.

    names     tensor names, node inputs and attributes, new GraphDefs
    weights   the WeightStore: big Consts held outside the proto while passes run
    index     GraphIndex: nodes by name, consumers by tensor, Const values
    editor    GraphEditor: a pass's edits collected into a new GraphDef
    walks     through Identities, what outputs need, cleanup
    library   function calls, their arguments and closure
    const_eval  numpy evaluation of small constant subgraphs
    float64   a float64 copy of a graph's float32 arithmetic (verification's near-exact answer)

The names below are the layer's interface; `from tf_bnfuse import graph as graph_lib`.
"""

from tf_bnfuse.graph.editor import GraphEditor
from tf_bnfuse.graph.float64 import in_float64
from tf_bnfuse.graph.index import GraphIndex
from tf_bnfuse.graph.library import (CALL_ARGUMENTS, CALL_OPS, FORWARDING_OPS, IF_OPS, WHILE_OPS, body_source,
                                     call_counts, called_function_names, called_functions, forwarded_call,
                                     function_closure, functions_by_name, is_deterministic, renamed_functions)
from tf_bnfuse.graph.names import (IDENTITY_OPS, attr_string, canonical_tensor, cast_node_def, control_inputs,
                                   copy_graph_def, const_node_def, data_inputs, data_positions, is_control,
                                   new_graph_def, node_def, node_dtype, parse_input, renamed_input, renamed_nodes,
                                   set_inputs, stable_function_name, string_attr, tensor_name, type_attr)
from tf_bnfuse.graph.walks import (cleanup, computed_from, cone, constant_only_nodes, drop_dangling_colocation,
                                   forwarded_input, live_nodes, nearest_kept, qualifying_nodes)
from tf_bnfuse.graph.weights import WEIGHT_KEY_ATTR, WeightStore, const_array, const_nbytes

__all__ = [
    "CALL_ARGUMENTS",
    "CALL_OPS",
    "FORWARDING_OPS",
    "GraphEditor",
    "GraphIndex",
    "IDENTITY_OPS",
    "in_float64",
    "IF_OPS",
    "WEIGHT_KEY_ATTR",
    "const_nbytes",
    "const_array",
    "WeightStore",
    "WHILE_OPS",
    "attr_string",
    "body_source",
    "call_counts",
    "called_function_names",
    "called_functions",
    "canonical_tensor",
    "cast_node_def",
    "cleanup",
    "computed_from",
    "const_node_def",
    "cone",
    "constant_only_nodes",
    "control_inputs",
    "copy_graph_def",
    "data_inputs",
    "data_positions",
    "drop_dangling_colocation",
    "forwarded_input",
    "forwarded_call",
    "function_closure",
    "functions_by_name",
    "is_deterministic",
    "is_control",
    "live_nodes",
    "nearest_kept",
    "new_graph_def",
    "node_def",
    "node_dtype",
    "parse_input",
    "qualifying_nodes",
    "renamed_input",
    "renamed_functions",
    "renamed_nodes",
    "set_inputs",
    "stable_function_name",
    "string_attr",
    "tensor_name",
    "type_attr",
]
