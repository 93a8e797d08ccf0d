"""Walks over a GraphDef's edges: through Identities, down to what outputs need, and cleanup."""

from tf_bnfuse.graph import names
from tf_bnfuse.graph.names import IDENTITY_OPS, parse_input


def forwarded_input(input_str, node_of, ops=IDENTITY_OPS, stop_before=None):
    """The input string that `input_str` reads once the nodes of `ops` on its way up are
    looked through (an IdentityN forwards its input k to its output k, the others input 0).

    node_of(name): the NodeDef of a name, or None (a node it does not give is not looked
    through). stop_before(input string): whether to stop before reading that input. Control
    inputs of the nodes passed are ignored; a cycle stops where it closes.
    """
    seen = set()
    while True:
        name, port, _ = parse_input(input_str)
        node = node_of(name)
        if node is None or node.op not in ops or name in seen:
            return input_str
        seen.add(name)
        data = names.data_inputs(node)
        position = port if node.op == "IdentityN" else 0
        if position >= len(data) or (stop_before is not None and stop_before(data[position])):
            return input_str
        input_str = data[position]


def qualifying_nodes(graph_def, decide):
    """Names of the nodes that qualify, by an iterative post-order walk (frozen graphs can hold
    long chains): decide(node) says True or False, or None for "when all of its inputs
    (control inputs included) qualify". A name without a node does not qualify, nor does a
    node on a cycle back to itself."""
    nodes = {node.name: node for node in graph_def.node}
    result = {}
    for start in nodes:
        stack, on_stack = [start], {start}
        while stack:
            current = stack[-1]
            node = nodes.get(current)
            if node is None or current in result:  # no node, or reached twice before its first visit finished
                result.setdefault(current, False)
            else:
                decided = decide(node)
                if decided is None:
                    sources = {parse_input(i)[0] for i in node.input}
                    # (Not `sources - result.keys()`: that walks all of result each time.)
                    pending = {s for s in sources if s not in result and s not in on_stack}
                    if pending:
                        stack.extend(pending)
                        on_stack |= pending
                        continue
                    decided = all(result.get(s, False) for s in sources)
                result[current] = decided
            stack.pop()
            on_stack.discard(current)
    return {name for name in nodes if result.get(name)}


def constant_only_nodes(graph_def):
    """Names of nodes that only yield constants and cannot fail or have effects:
    Const, Identity-like nodes of those, and NoOps that only wait for those."""
    def decide(node):
        return None if node.op == "Const" or node.op in IDENTITY_OPS or node.op == "NoOp" else False
    return qualifying_nodes(graph_def, decide)


def reachable(starts, successors):
    """Every name reached from `starts` by an iterative depth-first walk: successors(name) gives
    the names it leads to, or None for a name that is not there to reach (it is left out)."""
    stack, reached = list(starts), set()
    while stack:
        name = stack.pop()
        if name in reached:
            continue
        following = successors(name)
        if following is None:
            continue
        reached.add(name)
        stack.extend(following)
    return reached


def live_nodes(graph_def, outputs, keep_ops=("Placeholder",), ignored_control_inputs=frozenset()):
    """Names of the nodes an output reads through data or control edges (and keep_ops nodes).

    Control edges from nodes in ignored_control_inputs are not followed.
    """
    nodes = {node.name: node for node in graph_def.node}

    def sources(name):
        if name not in nodes:
            return None
        inputs = (parse_input(i) for i in nodes[name].input)
        return [source for source, _, is_control in inputs if not (is_control and source in ignored_control_inputs)]

    starts = [names.canonical_tensor(t)[0] for t in outputs] + [n.name for n in graph_def.node if n.op in keep_ops]
    return reachable(starts, sources)


def cone(node_of, tensors):
    """Names of the nodes the given tensors are computed from (control inputs included); a name
    node_of(name) gives no node for (another graph's) is left out and not walked through."""
    def sources(name):
        node = node_of(name)
        return None if node is None else [parse_input(i)[0] for i in node.input]
    return reachable([parse_input(t)[0] for t in tensors], sources)


def computed_from(node_of, tensor, boundary, max_nodes, readable=None):
    """(the tensor `tensor` reads through Identity-like nodes, {name: its data inputs, each read
    through them}) of the nodes that compute it from the `boundary` tensors and Consts alone
    (and any output of a node readable(name) says may be read as it is: a shape computed from
    elsewhere); None where it reads anything else (a node with no data input that is not a
    Const: a Placeholder, a variable), or needs more than max_nodes nodes. Identity-like nodes
    are looked through: an IdentityN (a custom gradient's) reads more than the port it
    forwards. node_of(name): the NodeDef, or None."""
    stop = {names.canonical_tensor(t) for t in boundary}
    stop_nodes = {name for name, _ in stop}
    readable = readable or (lambda name: False)

    def read(input_str):
        return forwarded_input(input_str, lambda name: None if name in stop_nodes or readable(name) else
                               node_of(name))

    def outside(input_str):
        return names.canonical_tensor(input_str) in stop or readable(parse_input(input_str)[0])
    result = read(tensor)
    found, stack = {}, [parse_input(result)[0]]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        node = node_of(name)
        if node is None or len(found) >= max_nodes or (node.op != "Const" and not names.data_inputs(node)):
            return None
        found[name] = [read(i) for i in names.data_inputs(node)]
        stack.extend(parse_input(i)[0] for i in found[name] if not outside(i))
    return result, found


def nearest_kept(node_of, tensors, kept, max_nodes):
    """The tensors nearest above `tensors` (themselves where they are) whose nodes are named in
    `kept`, walking data inputs; Consts on the way are left where they are. None where a walk
    reaches a node with no data input that is neither (a Placeholder) or passes max_nodes nodes.
    node_of(name): the NodeDef, or None."""
    found, found_tensors, seen, stack = [], set(), set(), list(tensors)
    while stack:
        tensor = stack.pop()
        name = parse_input(tensor)[0]
        if name in kept:
            if names.canonical_tensor(tensor) not in found_tensors:
                found_tensors.add(names.canonical_tensor(tensor))
                found.append(tensor)
            continue
        if name in seen:
            continue
        seen.add(name)
        node = node_of(name)
        if node is None or len(seen) > max_nodes or (node.op != "Const" and not names.data_inputs(node)):
            return None
        stack.extend(names.data_inputs(node))
    return found


def cleanup(graph_def, outputs, keep_ops=("Placeholder",)):
    """Returns a copy of graph_def without the nodes that no output needs.

    First, control edges from constant-only nodes are dropped: they order
    nothing. (A frozen tf.function keeps its automatic control dependencies
    on variable reads, which are Identity-of-Const after freezing and would
    otherwise keep every replaced weight alive.) Then a node stays when an
    output reads it through data or control edges. Placeholders always stay:
    they are signature inputs even when folding leaves one unused. Only the
    nodes that stay are copied, so the dead weights are never copied.
    """
    constant_only = constant_only_nodes(graph_def)
    needed = live_nodes(graph_def, outputs, keep_ops, ignored_control_inputs=constant_only)
    result = names.new_graph_def(graph_def)
    result.node.extend(node for node in graph_def.node if node.name in needed)
    for node in result.node:
        kept = [i for i in node.input if not (names.is_control(i) and i[1:] in constant_only)]
        if len(kept) != len(node.input):
            names.set_inputs(node, kept)
        drop_dangling_colocation(node, needed)
    return result


def drop_dangling_colocation(node, kept_names):
    """Removes `_class: loc:@X` entries of a node whose X is not in `kept_names`.

    Import refuses a node colocated with a node the graph no longer has, and
    a removed node constrains nothing.
    """
    if "_class" not in node.attr:
        return
    entries = list(node.attr["_class"].list.s)
    kept = [e for e in entries if not e.startswith(b"loc:@") or e[len(b"loc:@"):].decode() in kept_names]
    if len(kept) == len(entries):
        return
    if kept:
        del node.attr["_class"].list.s[:]
        node.attr["_class"].list.s.extend(kept)
    else:
        del node.attr["_class"]
