"""The graph layer's one helper per primitive: Identity walks, post-order qualification, the
call closure and function-body sources, control inputs. Hand-built protos; what each must
return is read off the proto by hand."""

import pytest
import tensorflow as tf

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.passes.context import PassContext

pytestmark = pytest.mark.quick  # the quick tier (scripts/test.sh --quick)


def _graph(*nodes):
    """A GraphDef of (name, op, inputs) triples; attrs are not needed by the walks."""
    graph_def = tf.compat.v1.GraphDef()
    for name, op, inputs in nodes:
        graph_def.node.add(name=name, op=op, input=inputs)
    return graph_def


def test_forwarded_input_follows_identities_and_maps_identity_n_ports():
    graph_def = _graph(("x", "Placeholder", []), ("y", "Placeholder", []), ("n", "IdentityN", ["x", "y", "^c"]),
                       ("i", "Identity", ["n:1", "^x"]), ("c", "NoOp", []))
    nodes = {n.name: n for n in graph_def.node}
    assert graph_lib.forwarded_input("i", nodes.get) == "y"  # i reads n:1, which forwards y
    assert graph_lib.forwarded_input("n", nodes.get) == "x"
    assert graph_lib.forwarded_input("i", nodes.get, ops=("Identity",)) == "n:1"  # IdentityN not looked through
    assert graph_lib.forwarded_input("i", nodes.get, stop_before=lambda s: s == "y") == "n:1"
    assert graph_lib.forwarded_input("missing:2", nodes.get) == "missing:2"


def test_forwarded_input_stops_where_a_cycle_closes():
    graph_def = _graph(("a", "Identity", ["b"]), ("b", "Identity", ["a"]))
    nodes = {n.name: n for n in graph_def.node}
    assert graph_lib.forwarded_input("a", nodes.get) in ("a", "b")


def test_qualifying_nodes_needs_every_input_and_refuses_cycles():
    graph_def = _graph(("c", "Const", []), ("i", "Identity", ["c"]), ("wait", "NoOp", ["^i"]),
                       ("p", "Placeholder", []), ("mixed", "Identity", ["c", "^p"]),
                       ("loop_a", "Identity", ["loop_b"]), ("loop_b", "Identity", ["loop_a"]),
                       ("dangling", "Identity", ["nowhere"]))
    assert graph_lib.constant_only_nodes(graph_def) == {"c", "i", "wait"}


def test_function_closure_follows_attrs_and_functions_called_by_name():
    library = tf.compat.v1.GraphDef().library
    for name, calls in [("outer", [("call", "PartitionedCall", "inner")]), ("inner", [("own", "leaf", None)]),
                        ("leaf", []), ("unused", [])]:
        function = library.function.add()
        function.signature.name = name
        for node_name, op, target in calls:
            node = function.node_def.add(name=node_name, op=op)
            if target:
                node.attr["f"].func.name = target
    functions = {f.signature.name: f for f in library.function}
    assert graph_lib.function_closure(functions, ["outer", "not_a_function"]) == {"outer", "inner", "leaf"}


def test_body_source_reads_through_identities_of_a_function_body():
    by_name = {n.name: n for n in _graph(("id1", "Identity", ["arg"]), ("id2", "Identity", ["id1:output:0"]),
                                         ("conv", "Conv2D", ["id2:output:0", "kernel"])).node}
    assert graph_lib.body_source(by_name, "id2:output:0") == ("arg", "")
    assert graph_lib.body_source(by_name, "conv:output:0") == ("conv", "output:0")


def test_call_counts_count_callers_in_the_graph_and_in_functions():
    graph_def = _graph(("w", "While", []), ("c", "StatefulPartitionedCall", []))
    graph_def.node[0].attr["body"].func.name = "body"
    graph_def.node[0].attr["cond"].func.name = "cond"
    graph_def.node[1].attr["f"].func.name = "body"
    assert graph_lib.call_counts(graph_def) == {"body": 2, "cond": 1}
    assert graph_lib.called_functions(graph_def.node[0], {}) == (("body", "cond"), 0)


def test_data_and_control_inputs_and_set_data_input_keep_control_edges_in_place():
    graph_def = _graph(("x", "Placeholder", []), ("y", "Placeholder", []),
                       ("add", "AddV2", ["^y", "x", "x:0"]))
    add = graph_def.node[2]
    assert graph_lib.data_inputs(add) == ["x", "x:0"] and graph_lib.control_inputs(add) == ["^y"]
    editor = graph_lib.GraphEditor(graph_def)
    editor.set_data_input("add", 1, "y")
    assert list(next(n for n in editor.graph_def.node if n.name == "add").input) == ["^y", "x", "y"]
    assert list(add.input) == ["^y", "x", "x:0"]  # the source graph is not modified


def test_a_nested_context_has_a_store_of_its_own_with_the_same_threshold():
    outer = PassContext(graph_lib.WeightStore(min_bytes=4), left_out=["body/bn", "other/bn", "bn"])
    inner = outer.nested("body")
    assert inner.weights is not outer.weights and inner.weights.min_bytes == 4
    # What the outer report names "body/bn" is "bn" inside the body.
    assert inner.left_out == {"bn"}


def test_renamed_nodes_follow_into_inputs_ports_control_edges_and_colocation():
    graph_def = _graph(("unknown", "Placeholder", []), ("n", "IdentityN", ["unknown", "unknown:0"]),
                       ("add", "AddV2", ["n:1", "unknown", "^unknown"]), ("other", "NoOp", []))
    graph_def.node[2].attr["_class"].list.s.extend([b"loc:@unknown", b"loc:@other"])
    renamed = graph_lib.renamed_nodes(graph_def, {"unknown": "unknown_frozen", "n": "m"})
    assert [n.name for n in renamed.node] == ["unknown_frozen", "m", "add", "other"]
    assert list(renamed.node[1].input) == ["unknown_frozen", "unknown_frozen"]
    assert list(renamed.node[2].input) == ["m:1", "unknown_frozen", "^unknown_frozen"]
    assert list(renamed.node[2].attr["_class"].list.s) == [b"loc:@unknown_frozen", b"loc:@other"]
    assert graph_def.node[0].name == "unknown" and list(graph_def.node[2].input) == ["n:1", "unknown", "^unknown"]


def test_computed_from_stops_at_the_boundary_looks_through_identities_and_refuses_other_sources():
    # y = bn(conv(x, k)) where the conv reads x through a custom gradient's IdentityN, whose other
    # inputs reach the model's input; the batch norm's scale is a Const behind an Identity.
    graph_def = _graph(("input", "Placeholder", []), ("x", "Relu", ["input"]), ("k", "Const", []),
                       ("n", "IdentityN", ["x", "input", "k"]), ("conv", "Conv2D", ["n", "k"]),
                       ("s", "Const", []), ("s_read", "Identity", ["s"]), ("bn", "Mul", ["conv", "s_read", "^input"]),
                       ("out", "Identity", ["bn"]))
    nodes = {n.name: n for n in graph_def.node}
    output, chain = graph_lib.computed_from(nodes.get, "out", ["x"], 10)
    assert output == "bn"  # out is an Identity of bn
    assert chain == {"bn": ["conv", "s"], "conv": ["x", "k"], "k": [], "s": []}  # control inputs dropped
    assert graph_lib.computed_from(nodes.get, "bn", ["input"], 10) is not None  # n forwards x, which reads input
    assert graph_lib.computed_from(nodes.get, "bn", [], 10) is None  # reaches the Placeholder
    assert graph_lib.computed_from(nodes.get, "bn", ["x"], 3) is None  # 4 nodes
    assert graph_lib.computed_from(nodes.get, "missing", ["x"], 10) is None
