"""The drivers the fold passes share: walk every candidate, fold the chains found, report the rest."""

import numpy as np

from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import chain
from tf_bnfuse.passes import grammar
from tf_bnfuse.passes import linear_ops
from tf_bnfuse.passes.emit import emit, fold_weights
from tf_bnfuse.passes.grammar import NoMatch

LEFT_OUT = "left out (PassContext.left_out), to find which fold a failed verification comes from"


def fold_backward(context, graph_def, outputs, pass_name, root_ops, report_every_root):
    """Folds every chain `linear op -> ... -> root` whose root op is in root_ops; returns
    (graph_def, PassReport).

    Each live root is walked; of the chains that end at one linear op (they nest: every
    tensor inside one has one consumer), the longest folds. A root that cannot fold is
    reported when report_every_root, when it scales (Mul, RealDiv: a batch norm's scale left
    in place), or when its walk had reached a linear op; other Adds of a constant (a
    positional embedding after an activation, say) are simply not chains.
    """
    index = context.index(graph_def, outputs)
    editor = context.editor(graph_def, outputs)
    report = report_lib.PassReport(pass_name, nodes_before=len(graph_def.node))
    longest, failures = {}, []
    for node in graph_def.node:
        if node.op not in root_ops or node.name not in index.live:
            continue
        try:
            found = chain.walk_backward(index, node)
        except NoMatch as reason:
            failures.append((node, chain.detached(reason)))
            continue
        if found is not None:
            if found.key not in longest or len(found.nodes) > len(longest[found.key].nodes):
                longest[found.key] = found
    covered = {n.name for found in longest.values() for n in found.nodes}
    for found in longest.values():
        if context.leaves_out(found.nodes):
            report.skips.append(report_lib.Skip(found.root.name, found.root.op, LEFT_OUT))
            continue
        try:
            folded = fold_weights(found, context.weights.new_array)
        except NoMatch as reason:
            failures.append((found.root, chain.detached(chain.reached(reason))))
            continue
        check = found.check_point()  # read before emit rewires the chain
        emit(editor, index, found, folded)
        del folded  # the new kernel is in the store now; not held while the next one is computed
        report.folds.append(report_lib.Fold(found.root.name, found.root.op, *found.linear_description,
                                            absorbed=found.absorbed, check=check))
    if report_every_root:
        report.skips.extend(unreached_in_functions(index))
    roots = {found.root.name for found in longest.values()}
    reported = _reported_failures(index, failures, covered - roots, report_every_root)
    report.skips.extend(report_lib.Skip(node.name, node.op, str(reason)) for node, reason in failures
                        if node.name in reported)
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report


def _check_forward(found):
    """What a forward chain must also satisfy: MaxPools see positive scales, and a shift
    reaches the linear op's output as a per-channel constant."""
    chain.check_positive_scales(found.nodes, found.step_scales, forward=True)
    linear = found.match.linear
    blocked = found.match.spec.shift_blocked(linear, found.match.kernel_shape) if np.any(found.shift != 0) else None
    if blocked:
        raise NoMatch("feeds %s %s, which %s" % (linear.op, linear.name, blocked))


def unreached_in_functions(index):
    """Skips for the function calls (While/If bodies and branches, calls) whose functions still
    hold a linear op and a batch norm (or the Rsqrt of one computed from its variables) after
    fold_in_functions.

    One Skip per live calling node. A call that computes one linear op and nothing else is
    itself a linear op (linear_ops.linear_op_of) and is not listed.
    """
    skips, functions = [], graph_lib.functions_by_name(index.graph_def)
    for node in index.graph_def.node:
        if node.name not in index.live or linear_ops.linear_op_of(index, node) is not None:
            continue
        names = graph_lib.called_function_names(node)
        if not names:
            continue
        seen = graph_lib.function_closure(functions, names)
        inner_ops = [inner.op for name in seen for inner in functions[name].node_def]
        linear = sum(op in grammar.LINEAR_OPS for op in inner_ops)
        # Rsqrt: a batch norm computed from its variables (Keras 3, tf.nn.batch_normalization)
        affine = sum(op in grammar.BATCH_NORM_OPS or op == "Rsqrt" for op in inner_ops)
        if linear and affine:
            skips.append(report_lib.Skip(node.name, node.op, (
                "its functions (%s) still hold %d linear ops and %d batch norms: only the body or branch of one "
                "While/If whose kernel is a constant or loop-invariant argument is folded (fold_in_functions)" % (
                    ", ".join(sorted(seen)), linear, affine))))
    return skips


def _reported_failures(index, failures, folded_within, report_every_root):
    """Names of the failed roots to report. One is reportable where it scales (Mul, RealDiv: a
    batch norm's scale left in place), where its walk reached a linear op, or anywhere with
    report_every_root; not inside a chain that folded (folded_within). A run of steps, each
    failing as the one above it did (a Keras batch norm's Mul and Add), is reported once: at
    its first reportable step, which a step above that is not reportable (a bias after an
    activation) does not hide."""
    failed = {node.name: (node, str(reason)) for node, reason in failures}
    reportable = {node.name for node, reason in failures if node.name not in folded_within and (
        report_every_root or reason.reached_linear or grammar.STEPS[node.op].scales)}

    def first_of_its_run(name):
        node, reason = failed[name]
        seen = {name}
        above = _step_above(index, node)
        while above in failed and failed[above][1] == reason and above not in seen:
            if above in reportable:
                return False
            seen.add(above)
            above = _step_above(index, failed[above][0])
        return True

    return {name for name in reportable if first_of_its_run(name)}


def _step_above(index, node):
    """The name of the step a step reads, through pass-throughs; None if there is none."""
    above, _ = index.producer(grammar.STEPS[node.op].data_input(index, node))
    while above is not None and above.op in grammar.PASS_THROUGHS:
        above, _ = index.producer(grammar.data_inputs(above)[0])
    return above.name if above is not None and above.op in grammar.STEPS else None


def fold_forward(context, graph_def, outputs, pass_name):
    """Folds every chain `x -> ... -> linear op` into the linear op; returns (graph_def, PassReport).

    A chain that cannot fold is reported at its step nearest the linear op; a walk stopped
    by a batch norm or scaling step that cannot be passed is reported at that step.
    """
    index = context.index(graph_def, outputs)
    editor = context.editor(graph_def, outputs)
    report = report_lib.PassReport(pass_name, nodes_before=len(graph_def.node))
    for linear in graph_def.node:
        if linear.op not in grammar.LINEAR_OPS or linear.name not in index.live:
            continue
        data_input = grammar.data_inputs(linear)[grammar.LINEAR_OPS[linear.op].data_input]
        head, _ = index.skip_identities(data_input)
        if head is None or chain.next_input(index, head) is None:
            continue  # the common case, decided without reading the kernel
        try:
            found, stop = chain.walk_forward(index, linear)
            if found is None:
                if stop is not None and grammar.STEPS.get(stop[0].op, _NOT_A_STEP).scales:
                    report.skips.append(report_lib.Skip(stop[0].name, stop[0].op, str(stop[1])))
                continue
            head = found.near_linear
            if context.leaves_out(found.nodes):
                raise NoMatch(LEFT_OUT)
            _check_forward(found)
            folded = fold_weights(found, context.weights.new_array)
        except NoMatch as reason:
            report.skips.append(report_lib.Skip(head.name, head.op, str(reason)))
            continue
        check = found.check_point()  # read before emit rewires the chain
        emit(editor, index, found, folded)
        del folded
        report.folds.append(report_lib.Fold(head.name, head.op, linear.name, linear.op, found.absorbed, check))
    report.nodes_after = len(editor.graph_def.node)
    return editor.graph_def, report


_NOT_A_STEP = grammar.Step(None, None, scales=False)
