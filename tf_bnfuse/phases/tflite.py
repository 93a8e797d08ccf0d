"""The TFLite phase: the folded model converted to a .tflite file, checked against the original
(float) or measured beside the converter alone (quantized)."""

import dataclasses
import os

from tf_bnfuse import errors
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import promote_float16
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.phases import explorer_data as explorer_data_lib
from tf_bnfuse.phases import prepare
from tf_bnfuse.savedmodel import write as write_lib
from tf_bnfuse.verify import quantize as quantize_lib
from tf_bnfuse.verify import verification_inputs
from tf_bnfuse.verify import tflite as tflite_lib


def convert(built, scratch, folded, options, progress):
    """Converts the --tags MetaGraph's written output (folded, never a releasing one: the original
    runs here) to TFLite, checked (check_and_convert). Returns [(scratch path, final path)] of
    the .tflite file and of its Model Explorer node data (--explorer_data), each written beside
    its final name, so that its rename cannot cross filesystems."""
    keys, tags = list(folded.loaded.functions), folded.metagraph.tags

    def folded_converter(promoted):
        if promoted is None:
            return tflite_lib.saved_model_converter(built, keys, tags)
        promoted_dir = os.path.join(scratch, "float32_for_tflite")
        write_lib.write([write_lib.MetaGraphToWrite(tags, promoted, folded.initializers)], promoted_dir)
        return tflite_lib.saved_model_converter(promoted_dir, keys, tags)

    model_content = check_and_convert(tflite_lib.saved_model_converter(options.saved_model_dir, keys, tags),
                                      folded_converter, folded, options, progress)
    files = [(options.tflite.output, model_content)]
    if options.tflite.explorer_data:
        files.append((options.tflite.explorer_data, node_data(model_content, folded, options.tflite)))
    written = []
    try:
        for path, content in files:
            written.append(("%s.tf_bnfuse-%d.tmp" % (path, os.getpid()), path))
            with open(written[-1][0], "wb") as f:
                f.write(content)
    except BaseException:
        remove_scratch_files(written)
        raise
    return written


def remove_scratch_files(written):
    """Removes what convert wrote and did not move into place."""
    for scratch, _ in written:
        if os.path.exists(scratch):
            os.remove(scratch)


def node_data(model_content, folded, tflite):
    """The Model Explorer node data of the .tflite model's content, recorded in the run's TFLite report."""
    content, (drawn, not_drawn) = explorer_data_lib.node_data(model_content, folded.report)
    folded.report.tflite.explorer_data = report_lib.ExplorerData(tflite.explorer_data, drawn, not_drawn)
    return content


def convert_object(model, folded, options, progress):
    """The .tflite content of a folded object in memory (tf_bnfuse.export), checked the same way;
    the converter alone is given the input object's signature functions (not a Keras model's
    from_keras_model: it exports the model to a SavedModel first, at the cost of a whole export)."""
    loaded = folded.loaded

    def folded_converter(promoted):
        converted = model if promoted is None else write_lib.build(
            [write_lib.MetaGraphToWrite(folded.metagraph.tags, promoted, folded.initializers)]).module
        return tflite_lib.functions_converter({k: converted.signatures[k] for k in loaded.functions}, converted)

    return check_and_convert(tflite_lib.functions_converter(loaded.functions), folded_converter, folded, options,
                             progress)


def check_and_convert(input_converter, folded_converter, folded, options, progress):
    """The folded model's .tflite content, checked against the original (float) or measured beside
    the input converted alone (quantized). folded_converter(promoted signatures or None) makes
    the folded model's TFLiteConverter: float16 compute is first promoted to float32 (TFLite has
    no float16 convolutions). Records the TfliteReport in folded.report.tflite before raising
    VerificationError."""
    tflite, loaded = options.tflite, folded.loaded
    with progress.phase("tflite"):
        references = prepare.original_references(loaded.loaded, loaded.functions, folded.signatures, folded.roots,
                                                 folded.test_inputs)
        promote = any(promote_float16.has_half(sig.graph_def) for sig in folded.folded.values())
        quantization = _quantization(tflite, folded, options)
        # The original's outputs on the CPU that the verification has already: not computed again.
        expected = folded.reference.expected if folded.reference is not None else None
        known = expected.seen if expected is not None and expected.devices[0] == "/device:CPU:0" else None
        model_content, report = tflite_lib.build(
            input_converter, folded_converter(_promoted(folded.folded) if promote else None), tflite.output,
            references, folded.test_inputs.arrays, options.verify_config, quantization, folded.test_inputs.arrays,
            known, progress.timeline.step)
        report.promoted_float16 = promote
        if quantization is not None:
            report.quantization.max_error = tflite.max_error
        folded.report.tflite = report
    _raise_if_failed(report)
    return model_content


def _raise_if_failed(report):
    quantized = report.quantization
    if quantized is not None and not quantized.ok:
        worst = quantized.worst
        raise errors.VerificationError(
            "TFLite %s model: signature %s output %s has relative L2 error %.3g against the original, above "
            "{--tflite_max_error} %g; nothing written" % (quantized.mode, worst.signature, worst.output,
                                                        worst.relative_l2_error, quantized.max_error))
    if not report.ok:
        bad = next(c for c in report.checks if not c.ok)
        raise errors.VerificationError(
            "TFLite check failed: signature %s output %s: max abs error %.3g, max rel error %.3g "
            "(rtol %g, atol %g); nothing written" % (bad.signature, bad.output, bad.max_abs_error,
                                                    bad.max_rel_error, bad.rtol, bad.atol))


def _quantization(tflite, folded, options):
    """The quantize.Quantization of --tflite_quantize, None for a float model. The metrics are
    measured on the verification's test inputs; int8 calibrates on --calibration_inputs, else on
    seeded random inputs drawn apart from them (another seed)."""
    if tflite.quantize == "none":
        return None
    test_inputs = folded.test_inputs
    quantization = quantize_lib.Quantization(
        tflite.quantize, tflite.io, held_out_source=quantize_lib.held_out_source(options.verify_inputs,
                                                                                  test_inputs.arrays))
    if tflite.quantize == "int8":
        # A signature that is the same function as another is calibrated once (tflite keys the
        # samples by the signatures the converter writes).
        verify_config = options.verify_config
        config = dict(verify_config, seed=verify_config.get("seed", 0) + 1, batch_size=quantize_lib.CALIBRATION_SAMPLES)
        quantization.calibration, quantization.calibration_source = quantize_lib.calibration(
            tflite.calibration_inputs,
            {k: s for k, s in test_inputs.input_specs.items() if k not in folded.signatures.same_as},
            lambda specs: verification_inputs.make_inputs(specs, config, test_inputs.vocabulary, test_inputs.bounds,
                                                          None, test_inputs.shapes))
    return quantization


def _promoted(folded):
    """The folded signatures with float16 compute promoted to float32 (TFLite has no float16 convs)."""
    promoted, by_graph = {}, {}
    for key, sig in folded.items():
        if id(sig.graph_def) not in by_graph:  # signatures sharing a graph keep sharing it
            weights = sig.weights.copy()  # the pass retains only what it names; the folded graph names more
            by_graph[id(sig.graph_def)] = (promote_float16.run(PassContext(weights), sig.graph_def,
                                                               sig.output_tensors)[0], weights)
        graph_def, weights = by_graph[id(sig.graph_def)]
        promoted[key] = dataclasses.replace(sig, graph_def=graph_def, weights=weights)
    return promoted
