"""The human-readable summary the CLI prints."""


def format_run(report):
    lines = ["tf_bnfuse: %s -> %s" % (report.saved_model_dir, report.output_dir)]
    if report.kept_functions:
        lines.append("functions of the input's root object kept, running the folded signatures that compute them: %s"
                     % ", ".join(report.kept_functions))
    for name, reason in report.dropped_functions.items():
        part = "only in part, NOT KEPT" if name in report.kept_functions else "NOT KEPT"
        lines.append("function %s of the input's root object %s: %s (call the output through its "
                     "signatures: %s)" % (name, part, reason, ", ".join(report.signatures)))
    for tags in report.dropped_metagraphs:
        lines.append("MetaGraph %s: DROPPED (--drop_other_metagraphs); the output does not have it" % tags)
    for key, graph in report.signatures.items():
        if graph.same_as:
            lines.append("signature %s: the same function as %s, folded with it: %d -> %d nodes" % (
                key, graph.same_as, graph.nodes_before, graph.nodes_after))
            continue
        lines.append("signature %s: %d -> %d nodes, %d folded, %d left alone" % (
            key, graph.nodes_before, graph.nodes_after, len(graph.folds), len(graph.skips)))
        for pass_report in graph.passes:
            extra = "; %d lowered" % len(pass_report.lowered) if pass_report.lowered else ""
            extra += "; " + pass_report.note if pass_report.note else ""
            lines.append("  pass %s: %d folded, %d left alone%s" % (
                pass_report.pass_name, len(pass_report.folds), len(pass_report.skips), extra))
            for fold in pass_report.folds:
                lines.append("    folded  %s (%s) into %s (%s)" % (
                    fold.node, fold.op, fold.linear_node, fold.linear_op))
            for skip in pass_report.skips:
                lines.append("    left    %s (%s): %s" % (skip.node, skip.op, skip.reason))
            for lowered in pass_report.lowered:
                lines.append("    lowered %s (%s) to a constant per-channel %s" % (
                    lowered.node, lowered.op, lowered.into))
    verification = report.verification
    if verification is None:
        lines.append("verification: SKIPPED -- the output ran every signature on test inputs, but was NOT "
                     "compared with the input")
    else:
        lines.append("verification on %s: %s" % (", ".join(verification.devices),
                                                  "passed" if verification.ok else "FAILED"))
        for where, how in verification.inputs.items():
            lines.append("  test values of %s: %s" % (where, how))
        for where, reason in verification.not_run.items():
            lines.append("  %s: not compared, the original does not run there: %s" % (where, reason))
        for c in verification.checks:
            if c.random:
                lines.append("  %s/%s on %s: RANDOM (the original differs between two calls on the same input): "
                             "not compared" % (c.signature, c.output, c.device))
                continue
            lines.append("  %s/%s on %s: max abs error %.3g, max rel error %.3g (rtol %g, atol %g: %s) %s" % (
                c.signature, c.output, c.device, c.max_abs_error, c.max_rel_error, c.rtol, c.atol, c.precision,
                "ok" if c.ok else "FAILED"))
        for where, difference in verification.grappler_differs.items():
            lines.append("  WARNING: %s: TensorFlow's Grappler computes the INPUT otherwise than its graph says (a "
                         "TensorFlow bug, such as oneDNN's LeakyRelu fusion); the output computes the graph as "
                         "written, and differs from the input as TensorFlow runs it by up to %.3g"
                         % (where, difference))
        if verification.checks and not verification.compared:
            lines.append("  WARNING: every output is random: nothing could be compared")
    tflite = report.tflite
    if tflite is not None:
        def ops(counts):
            return ", ".join("%s %d" % kv for kv in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append("tflite %s (%d bytes): %d ops: %s" % (tflite.path, tflite.size_bytes,
                                                           sum(tflite.ops_after.values()), ops(tflite.ops_after)))
        if tflite.promoted_float16:
            lines.append("  float16 compute promoted to float32 for TFLite (it has no float16 conv kernels); "
                         "signature dtypes kept")
        lines.append("  batch-norm MUL/ADD left after a conv or fully connected op: %d"
                     % tflite.batch_norm_ops_after)
        if tflite.ops_before is not None:
            lines.append("  converting the input directly: %d ops: %s; batch-norm MUL/ADD left after a conv or "
                         "fully connected op: %d" % (sum(tflite.ops_before.values()), ops(tflite.ops_before),
                                                     tflite.batch_norm_ops_before))
        else:
            lines.append("  converting the input directly fails: %s" % tflite.before_error)
        for c in tflite.checks:
            lines.append("  %s/%s in the TFLite interpreter: max abs error %.3g, max rel error %.3g "
                         "(rtol %g, atol %g) %s" % (c.signature, c.output, c.max_abs_error, c.max_rel_error,
                                                    c.rtol, c.atol, "ok" if c.ok else "FAILED"))
    return "\n".join(lines)
