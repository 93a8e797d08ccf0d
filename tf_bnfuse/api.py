"""The Python API: fold a GraphDef in memory, or a SavedModel from disk to disk.

fold_saved_model is the sequence of the phases (tf_bnfuse/phases/), each taking the parts it
reads and returning the part it makes: per MetaGraph load, freeze, test inputs, the original's
outputs on them, the passes; then write, verify, TFLite, move into place. saved_model.pb is
parsed once (a failed verification's search for its fold loads it again: the passes may have
released the original's folded kernels, WeightStore.releases).
"""

import gc
import os

from tf_bnfuse import config as config_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import runner
from tf_bnfuse.phases import output
from tf_bnfuse.phases import parts
from tf_bnfuse.phases import prepare
from tf_bnfuse.phases import tflite as tflite_phase
from tf_bnfuse.savedmodel import load as load_lib
from tf_bnfuse.savedmodel import output_dir as output_dir_lib
from tf_bnfuse.savedmodel import preflight
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.savedmodel import tf1

DEFAULT_TAGS = ("serve",)


def _resolve_config(config):
    if config is None or isinstance(config, (str, os.PathLike)):
        source = str(config or config_lib.default_config_path())
        config = config_lib.load_config(config)
    else:
        source, config = "config", config_lib.validate_config(config)
    config_lib.check_pass_options(config, source)
    return config


def fold_graph_def(graph_def, outputs=None, config=None):
    """Folds batch norms in a GraphDef; returns (new GraphDef, GraphReport).

    outputs: tensor names the graph must keep computing (e.g. a signature's
    outputs). They protect those tensors from rewrites and anchor the dead-node
    cleanup; by default, the tensors no node reads. graph_def is not modified.
    config: None (configs/default.json), a path, or a dict like that file.
    """
    config = _resolve_config(config)
    if outputs is None:
        outputs = runner.default_outputs(graph_def)
    new_graph_def, pass_reports = runner.run_pipeline(graph_def, list(outputs), config["pipeline"])
    return new_graph_def, report_lib.GraphReport(len(graph_def.node), len(new_graph_def.node), pass_reports)


def fold_saved_model(saved_model_dir, output_dir, signature_keys=None, tags=DEFAULT_TAGS,
                     config=None, overwrite=False, verify=True, tflite_output=None,
                     drop_other_metagraphs=False, verify_inputs=None, checkpoint=None, tflite_quantize="none",
                     tflite_io="float", calibration_inputs=None, tflite_max_error=None):
    """Folds every (or each named) signature of a SavedModel into a new SavedModel.

    The output is built in a temporary folder beside output_dir, verified
    there, and renamed into place only when it passed: on any error nothing is
    left at output_dir (an existing one stays as it was). Returns a RunReport.
    Raises BadInputError (exit code 2) or VerificationError (exit code 1); the
    exception's `run_report` attribute holds what was done until then.

    tflite_output: also convert the folded model with the TFLite converter to
    this file, after checking the .tflite model's outputs against the original
    SavedModel (a failed check writes nothing, SavedModel included).
    verify=False skips the comparison, not the check that the output loads
    and runs every signature on test inputs.
    tags: the MetaGraph whose signatures are named by signature_keys and converted to TFLite.
    drop_other_metagraphs: write only that MetaGraph; without it every MetaGraph of the
    input is folded into the output, under its own tags.
    verify_inputs: a .npz of arrays named INPUT or SIGNATURE/INPUT to verify
    on, instead of generated values (see verify/test_inputs.given_inputs).
    tflite_quantize: none, float16, dynamic or int8 (full-integer, calibrated on
    calibration_inputs, a .npz like verify_inputs with samples along axis 0, else on seeded
    random inputs); tflite_io int8 gives the int8 model integer inputs and outputs. A
    quantized model is measured on held-out inputs beside the converter quantizing the input
    alone; tflite_max_error (relative L2) fails the run when an output is worse.
    checkpoint: called with the name of each phase before it starts, then with "moved into
    place"; it may raise to end the run there (the CLI ends on a SIGINT or SIGTERM it
    recorded, so that one TensorFlow swallowed is not lost). After "move into place" the
    output is complete.
    """
    config = _resolve_config(config)
    preflight.check_all(saved_model_dir, output_dir, overwrite, tflite_output, verify_inputs=verify_inputs)
    preflight.check_tflite_options(tflite_output, tflite_quantize, tflite_io, calibration_inputs, tflite_max_error)
    tflite = parts.TfliteOptions(tflite_output, tflite_quantize, tflite_io, calibration_inputs,
                                 tflite_max_error) if tflite_output else None
    options = parts.Options(saved_model_dir, output_dir, signature_keys, config, verify, verify_inputs, tflite)
    model = load_lib.read(saved_model_dir)  # the one parse of saved_model.pb
    metagraphs, report = _metagraphs(model, tuple(tags) if tags else DEFAULT_TAGS, options, drop_other_metagraphs)
    progress = parts.Progress(report_lib.Timeline(), checkpoint or (lambda boundary: None))
    try:
        _run(model, metagraphs, options, progress)
    except BaseException as e:  # KeyboardInterrupt too: the CLI reports what was done
        report.phases = progress.timeline.to_list()
        e.run_report = report
        raise
    report.phases = progress.timeline.to_list()
    return report


def _metagraphs(model, tags, options, drop_other_metagraphs):
    """([(MetaGraph, its RunReport)] with the --tags one first, the run's RunReport)."""
    model.check_tags(tags)
    tags = model.stored_tags(tags)  # the output keeps the input's order
    report = report_lib.RunReport(options.saved_model_dir, options.output_dir, {})
    metagraphs = [(parts.MetaGraph(tags, None, releases=options.tflite is None), report)]
    others = model.other_tag_sets(tags)
    if drop_other_metagraphs:
        report.dropped_metagraphs, others = [",".join(sorted(t)) for t in others], []
    for other_tags in others:
        label = ",".join(sorted(other_tags))
        report.other_metagraphs[label] = report_lib.RunReport(options.saved_model_dir, options.output_dir, {})
        metagraphs.append((parts.MetaGraph(tuple(other_tags), label, releases=True), report.other_metagraphs[label]))
    return metagraphs, report


def _run(model, metagraphs, options, progress):
    folded = []
    for metagraph, report in metagraphs:
        metagraph_progress = progress.of(metagraph)
        loaded = prepare.load(model, metagraph, options, metagraph_progress)
        if metagraph is metagraphs[-1][0]:
            model.close()  # the parsed saved_model.pb: nothing reads it past the last load
        folded.append(_fold_metagraph(loaded, metagraph, options, metagraph_progress, report))
        del loaded  # the FoldedMetaGraph holds it, and lets go of it after the write in a releasing run
    parent = os.path.dirname(os.path.realpath(options.output_dir))
    output_dir_lib.remove_stale_scratch(parent)
    scratch, tflite_scratch = output_dir_lib.make_scratch(parent), None
    try:
        built = os.path.join(scratch, "saved_model")
        folded, fold_checks = output.write(folded, built, folded[0].metagraph.releases, options, progress)
        # The written module's functions and graphs hold one another in cycles, and with them the
        # weights' variables: freed now, not in the verification, beside the reloaded copy.
        gc.collect()
        for each, checks in zip(folded, fold_checks):
            output.verify(built, each, checks, options, progress.of(each.metagraph))
        if options.tflite:
            tflite_scratch = tflite_phase.convert(built, scratch, folded[0], options, progress)
        output.move_into_place(built, options.output_dir, scratch, tflite_scratch,
                               options.tflite.output if options.tflite else None, progress)
    finally:
        output_dir_lib.remove_scratch(scratch)
        if tflite_scratch and os.path.exists(tflite_scratch):
            os.remove(tflite_scratch)


def _fold_metagraph(loaded, metagraph, options, progress, report):
    """One MetaGraph from its loaded signatures to its folded graphs, the original's outputs on
    the test inputs computed on the way. Records each phase's share of the report."""
    report.dropped_functions = loaded.dropped_functions  # what a run that fails before the match reports
    graphs, signatures = prepare.freeze_signatures(loaded, metagraph, progress)
    with resources.values_restored(signatures.state):  # calling the original advances them
        test_inputs = prepare.make_test_inputs(loaded, signatures, options.verify_config)
        roots = prepare.match_root_functions(loaded, test_inputs, options.verify_config, progress)
        report.dropped_functions, report.kept_functions = roots.dropped, roots.kept
        reference = (prepare.run_original(loaded, graphs, signatures, roots, test_inputs, progress)
                     if options.verify else None)
    folded = prepare.fold_signatures(graphs, signatures, metagraph, options.config["pipeline"], progress)
    report.signatures.update(folded.reports)
    return parts.FoldedMetaGraph(metagraph, loaded, signatures, test_inputs, roots, reference, folded.signatures,
                                 folded.precisions, tf1.initializers_to_keep(loaded.loaded),
                                 parts.OriginalAgain(options, metagraph, loaded), report)
