"""The Python API: fold a GraphDef, a Keras model or tf.functions in memory (fold, export), or a
SavedModel from disk to disk (fold_saved_model).

fold_saved_model is the sequence of the phases (tf_bnfuse/phases/), each taking the parts it
reads and returning the part it makes: per MetaGraph load, freeze, test inputs, the original's
outputs on them, the passes; then write, verify, TFLite, move into place. saved_model.pb is
parsed once (a failed verification's search for its fold loads it again: the passes may have
released the original's folded kernels, WeightStore.releases).
"""

import contextlib
import dataclasses
import gc
import os

import numpy as np

from tf_bnfuse import config as config_lib
from tf_bnfuse import errors
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import runner
from tf_bnfuse.phases import output
from tf_bnfuse.phases import parts
from tf_bnfuse.phases import prepare
from tf_bnfuse.phases import tflite as tflite_phase
from tf_bnfuse.savedmodel import folded_model
from tf_bnfuse.savedmodel import load as load_lib
from tf_bnfuse.savedmodel import objects as objects_lib
from tf_bnfuse.savedmodel import output_dir as output_dir_lib
from tf_bnfuse.savedmodel import preflight
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.savedmodel import tf1
from tf_bnfuse.savedmodel import write as write_lib

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
    return runner.fold_graph(graph_def, list(outputs), config["pipeline"])


def fold_saved_model(saved_model_dir, output_dir, signature_keys=None, tags=DEFAULT_TAGS,
                     config=None, overwrite=False, verify=True, tflite_output=None,
                     drop_other_metagraphs=False, verify_inputs=None, checkpoint=None, tflite_quantize="none",
                     tflite_io="float", calibration_inputs=None, tflite_max_error=None, explorer_data=None,
                     verbose=False):
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
    on, instead of generated values (see verify/verification_inputs.given_inputs).
    tflite_quantize: none, float16, dynamic or int8 (full-integer, calibrated on
    calibration_inputs, a .npz like verify_inputs with samples along axis 0, else on seeded
    random inputs); tflite_io int8 gives the int8 model integer inputs and outputs. A
    quantized model is measured on held-out inputs beside the converter quantizing the input
    alone; tflite_max_error (relative L2) fails the run when an output is worse.
    explorer_data: with tflite_output, also write Model Explorer node data for the .tflite model
    to this file: each folded op coloured by its check's error over its bound, each batch norm
    left alone by why (docs/tflite.md).
    checkpoint: called with the name of each phase before it starts, then with "moved into
    place"; it may raise to end the run there (the CLI ends on a SIGINT or SIGTERM it
    recorded, so that one TensorFlow swallowed is not lost). After "move into place" the
    output is complete.
    verbose: progress lines on stderr as the run goes, and the summary printed at the end (else
    nothing is printed unless the `tf_bnfuse` logger is configured to show INFO).
    """
    return _called("fold_saved_model", verbose, lambda: _fold_saved_model(
        saved_model_dir, output_dir, signature_keys, tags, config, overwrite, verify, tflite_output,
        drop_other_metagraphs, verify_inputs, checkpoint, tflite_quantize, tflite_io, calibration_inputs,
        tflite_max_error, explorer_data))


def _called(name, verbose, run, report_of=lambda result: result):
    """run() as the API function `name` runs it: its errors in that function's terms, progress
    lines on stderr and the summary printed at the end only with verbose, the caller's root
    logger as it was."""
    with report_lib.root_handlers_as_found(), report_lib.speaking(verbose), errors.speaking_to(name):
        result = run()
    if verbose:
        print(report_of(result))
    return result


def _fold_saved_model(saved_model_dir, output_dir, signature_keys, tags, config, overwrite, verify, tflite_output,
                      drop_other_metagraphs, verify_inputs, checkpoint, tflite_quantize, tflite_io, calibration_inputs,
                      tflite_max_error, explorer_data):
    config = _resolve_config(config)
    preflight.check_all(saved_model_dir, output_dir, overwrite, tflite_output, verify_inputs=verify_inputs)
    preflight.check_tflite_options(tflite_output, tflite_quantize, tflite_io, calibration_inputs, tflite_max_error)
    if explorer_data:
        preflight.check_explorer_data(explorer_data, tflite_output, saved_model_dir, output_dir, overwrite)
    tflite = parts.TfliteOptions(tflite_output, tflite_quantize, tflite_io, calibration_inputs,
                                 tflite_max_error, explorer_data or None) if tflite_output else None
    options = parts.Options(saved_model_dir, output_dir, signature_keys, config, verify, verify_inputs or None, tflite)
    model = load_lib.read(saved_model_dir)  # the one parse of saved_model.pb
    metagraphs, report = _metagraphs(model, tuple(tags) if tags else DEFAULT_TAGS, options, drop_other_metagraphs)
    progress = parts.Progress(report_lib.Timeline(), checkpoint or (lambda boundary: None))
    try:
        with _long_lived_objects_frozen() as frozen:
            _run(model, metagraphs, options, progress, frozen)
    except BaseException as e:  # KeyboardInterrupt too: the CLI reports what was done
        report.phases = progress.timeline.to_list()
        e.run_report = report
        raise
    report.phases = progress.timeline.to_list()
    return report


class _LongLivedObjects:
    """Python's cyclic collector told to leave out the objects alive now (gc.freeze): a loaded
    model is hundreds of thousands of long-lived Python objects, and each automatic full
    collection walked them all (half the time of building a fold-check probe on ResNet50).
    gc.freeze and gc.unfreeze act on the whole process and cannot tell whose objects they
    freeze: where the caller has frozen objects of its own (a pre-fork server does), nothing
    here freezes or unfreezes, so the caller's freeze stays as it was."""

    def __init__(self):
        self.ours = gc.get_freeze_count() == 0

    def freeze(self):
        if self.ours:
            gc.freeze()

    def collect_all(self):
        """A full collection (a released input's cycles), of what this run froze too."""
        if self.ours:
            gc.unfreeze()
        gc.collect()
        self.freeze()

    def release(self):
        if self.ours:
            gc.unfreeze()


@contextlib.contextmanager
def _long_lived_objects_frozen():
    """Within, the objects alive at entry and at each later freeze() are left out of the cyclic
    collector's work (_LongLivedObjects); on the way out they are collectable again."""
    frozen = _LongLivedObjects()
    frozen.freeze()
    try:
        yield frozen
    finally:
        frozen.release()


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


def _run(model, metagraphs, options, progress, frozen):
    folded = []
    for metagraph, report in metagraphs:
        metagraph_progress = progress.of(metagraph)
        loaded = prepare.load(model, metagraph, options, metagraph_progress)
        frozen.freeze()  # the loaded model lives to the end of its verification
        if metagraph is metagraphs[-1][0]:
            model.close()  # the parsed saved_model.pb: nothing reads it past the last load
        folded.append(_fold_metagraph(loaded, metagraph, options, metagraph_progress, report))
        del loaded  # the FoldedMetaGraph holds it, and lets go of it after the write in a releasing run
    parent = os.path.dirname(os.path.realpath(options.output_dir))
    output_dir_lib.remove_stale_scratch(parent)
    scratch, tflite_files = output_dir_lib.make_scratch(parent), []
    try:
        built = os.path.join(scratch, "saved_model")
        folded, fold_checks = output.write(folded, built, folded[0].metagraph.releases, options, progress)
        # The written module's functions and graphs hold one another in cycles, and with them the
        # weights' variables: freed now, not in the verification, beside the reloaded copy.
        frozen.collect_all()
        for each, checks in zip(folded, fold_checks):
            output.verify(built, each, checks, options, progress.of(each.metagraph))
        if options.tflite:
            tflite_files = tflite_phase.convert(built, scratch, folded[0], options, progress)
        output.move_into_place(built, options.output_dir, scratch, tflite_files, progress)
    finally:
        output_dir_lib.remove_scratch(scratch)
        tflite_phase.remove_scratch_files(tflite_files)


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


class _InMemoryRun:
    """What fold made, kept on the folded object for export: the built model, the folded
    MetaGraph (the input's functions, test inputs, reference outputs) and its fold checks."""

    def __init__(self, built, folded, fold_checks, options):
        self.built, self.folded, self.fold_checks, self.options = built, folded, fold_checks, options


def fold(obj, signatures=None, config=None, verify=True, verify_inputs=None, verbose=False):
    """Folds batch norms in a live object; returns a folded_model.FoldedModel, verified in memory.

    obj: a Keras 3 model (functional, Sequential, or subclassed once called), a tf-keras model,
    a tf.Module (or the object tf.saved_model.load gives) whose tf.functions have input
    signatures, one ConcreteFunction, or a list of them. Its signatures are those saving it the
    usual way writes (savedmodel/objects.py); signatures= overrides them as in
    tf.saved_model.save. Nothing goes to disk: freezing starts from the object's concrete
    functions. obj is not modified: the folded object owns copies of the weights it reads.

    The result has .signatures ({key: ConcreteFunction}, inputs, dtypes, shapes and output keys
    as the input's), is callable (its serving_default signature), carries .report (a RunReport)
    and can be given to tf.saved_model.save(result, path, signatures=result.signatures) and to
    tf.lite.TFLiteConverter.from_concrete_functions(list(result.signatures.values()), result).
    Verified against obj on every visible device as the CLI verifies; raises BadInputError (also
    a ValueError) or VerificationError, with the RunReport as the exception's run_report.
    verbose: progress lines on stderr, and the summary (str(result.report)) printed; by default
    nothing is printed unless the `tf_bnfuse` logger is configured to show INFO.
    """
    return _called("fold", verbose, lambda: _fold_object(obj, signatures, config, verify, verify_inputs).built.module,
                   lambda folded: folded.report)


def _fold_object(obj, signatures, config, verify, verify_inputs, tflite=None):
    """The _InMemoryRun of fold; tflite: export's TfliteOptions, whose calibration samples the load
    phase checks before any work."""
    config = _resolve_config(config)
    options = parts.Options(None, None, None, config, verify, verify_inputs, tflite)
    root, functions, input_order = objects_lib.signatures_of(obj, signatures)
    metagraph = parts.MetaGraph(DEFAULT_TAGS, None, releases=False)  # the input object stays whole
    report = report_lib.RunReport("(in memory: %s)" % objects_lib.described(obj), "(in memory)", {})
    progress = parts.Progress(report_lib.Timeline(), lambda boundary: None)
    try:
        with _long_lived_objects_frozen():
            run = _fold_in_memory(root, functions, metagraph, options, progress, report)
    except BaseException as e:
        report.phases = progress.timeline.to_list()
        e.run_report = report
        raise
    report.phases = progress.timeline.to_list()
    run.built.module.attach_run(report, run, objects_lib.returns_tensor(obj, functions), input_order)
    return run


def _fold_in_memory(root, functions, metagraph, options, progress, report):
    """The _InMemoryRun of a live object's signature functions."""
    loaded = prepare.from_object(root, functions, options, progress)
    folded = _fold_metagraph(loaded, metagraph, options, progress, report)
    built, [fold_checks] = output.build([folded], False, options, progress, own_variables=True)
    with progress.phase("verify"):
        output.verify_object(built.module, folded, fold_checks, options, progress)
    return _InMemoryRun(built, folded, fold_checks, options)


EXPORT_FORMATS = ("tf_saved_model", "litert")


def export(obj, path, format=None, signatures=None, config=None, verify=None,  # noqa: A002 (Keras' name)
           verify_inputs=None, quantize="none", io="float", calibration=None, max_error=None, overwrite=False,
           explorer_data=None, verbose=False):
    """Writes a folded model to `path`, as Keras' model.export(path, format=...) writes one.

    obj: what fold takes, or what it returned (then fold's own options apply and the fold is
    not repeated: signatures, config, verify and verify_inputs are fold's, and are refused here).
    format: by path's suffix when not given (".tflite": "litert", else "tf_saved_model"); a
    suffix that contradicts it is refused. "tf_saved_model": a SavedModel folder with every signature, loaded
    again and verified before it is moved into place (as the CLI writes one). "litert": a
    .tflite file, converted with TFLiteConverter.from_concrete_functions and checked against
    the input (quantize none, float16, dynamic or int8; io int8 for integer inputs and outputs;
    calibration: {input or signature/input: samples along axis 0}, a .npz of them, or one array
    for a model of one input; max_error:
    the relative L2 error a quantized output may have; explorer_data: a file for Model Explorer
    node data drawn on the .tflite model, docs/tflite.md), measured beside the converter given
    the input alone. A wrong option raises ValueError before any work. verbose: progress lines
    on stderr (each step of the TFLite conversion and measurement too) and the run's summary
    printed (the CLI's, with the side-by-side TFLite table); else nothing is printed unless the
    `tf_bnfuse` logger is configured to show INFO. Returns the RunReport (str() is the summary).
    """
    return _called("export", verbose, lambda: _export(obj, path, format, signatures, config, verify, verify_inputs,
                                                      quantize, io, calibration, max_error, overwrite, explorer_data))


def _export(obj, path, format, signatures, config, verify, verify_inputs, quantize, io, calibration,  # noqa: A002
            max_error, overwrite, explorer_data):
    path = os.fspath(path)
    format = _export_format(path, format)  # noqa: A001
    explorer_data = os.fspath(explorer_data) if explorer_data is not None else None
    _check_export_options(path, format, quantize, io, calibration, max_error, overwrite, explorer_data)
    tflite = parts.TfliteOptions(path, quantize, io, calibration, max_error, explorer_data) \
        if format == "litert" else None
    run = getattr(obj, "in_memory_run", None) if isinstance(obj, folded_model.FoldedModel) else None
    if run is None:
        run = _fold_object(obj, signatures, config, True if verify is None else verify, verify_inputs, tflite)
    else:
        _refuse_fold_options(signatures=signatures, config=config, verify=verify, verify_inputs=verify_inputs)
        prepare.check_calibration(tflite, run.folded.loaded.input_specs)  # before the conversion starts
    report, progress = run.folded.report, parts.Progress(report_lib.Timeline(), lambda boundary: None)
    try:
        if format == "litert":
            options = dataclasses.replace(run.options, tflite=tflite)
            content = tflite_phase.convert_object(run.built.module, run.folded, options, progress)
            output_dir_lib.write_file_atomically(path, content)
            if explorer_data:
                output_dir_lib.write_file_atomically(explorer_data,
                                                     tflite_phase.node_data(content, run.folded, tflite))
        else:
            _export_saved_model(run, path, progress)
    finally:
        report.phases = report.phases + progress.timeline.to_list()
    report.output_dir = path
    return report


def _export_saved_model(run, path, progress):
    """The folded model written at a scratch folder beside path, loaded again and verified there as
    the CLI's output is, then moved into place."""
    options = dataclasses.replace(run.options, output_dir=path)
    parent = os.path.dirname(os.path.realpath(path))
    scratch = output_dir_lib.make_scratch(parent)
    try:
        written = os.path.join(scratch, "saved_model")
        with progress.phase("write"):
            write_lib.save(run.built, written)
        output.verify(written, run.folded, run.fold_checks, options, progress)
        output.move_into_place(written, path, scratch, [], progress)
    finally:
        output_dir_lib.remove_scratch(scratch)


def _export_format(path, format):  # noqa: A002
    """format, or the one path's suffix says; ValueError where they disagree."""
    suffix = "litert" if path.lower().endswith(".tflite") else None
    if format is None:
        return suffix or "tf_saved_model"
    if suffix == "litert" and format == "tf_saved_model":
        raise ValueError("path %s ends in .tflite, but format=\"tf_saved_model\" writes a SavedModel folder: "
                         "give format=\"litert\" (or leave format out), or another path" % path)
    return format


def _refuse_fold_options(**given):
    """ValueError naming fold's options given to export with a model fold already made: they
    would change nothing."""
    named = [name for name, value in given.items() if value is not None]
    if named:
        raise ValueError("%s: fold's option%s, which export of an already folded model cannot apply; pass %s to "
                         "tf_bnfuse.fold, or give export the original model" % (
                             ", ".join(named), "s" if len(named) > 1 else "", "them" if len(named) > 1 else "it"))


def _check_export_options(path, format, quantize, io, calibration, max_error, overwrite,  # noqa: A002
                          explorer_data):
    """ValueError for a wrong export option, before any work."""
    if format not in EXPORT_FORMATS:
        raise ValueError("format=%r: one of %s" % (format, ", ".join(EXPORT_FORMATS)))
    if explorer_data is not None:
        if format != "litert":
            raise ValueError("explorer_data is for format=\"litert\": the node data is drawn on the .tflite model "
                             "(Model Explorer numbers a SavedModel's nodes by position)")
        preflight.check_explorer_data(explorer_data, path, None, None, overwrite)
    if format != "litert" and (quantize != "none" or io != "float" or calibration is not None
                               or max_error is not None):
        raise ValueError("quantize, io, calibration and max_error are for format=\"litert\"")
    if quantize not in preflight.QUANTIZE_MODES:
        raise ValueError("quantize=%r: one of %s" % (quantize, ", ".join(preflight.QUANTIZE_MODES)))
    if io not in preflight.TFLITE_IO:
        raise ValueError("io=%r: one of %s" % (io, ", ".join(preflight.TFLITE_IO)))
    if (io != "float" or calibration is not None) and quantize != "int8":
        raise ValueError("io and calibration are for quantize=\"int8\"")
    if max_error is not None and (quantize == "none" or not max_error > 0):
        raise ValueError("max_error=%r: a relative L2 error above 0, for a quantized model" % (max_error,))
    if isinstance(calibration, (str, os.PathLike)):
        preflight.check_npz(calibration, "{--calibration_inputs}")
    elif calibration is not None and not isinstance(calibration, (dict, np.ndarray)):
        raise ValueError("calibration: a .npz path, a dict of arrays, or one array; got %s" % type(calibration).__name__)
    if os.path.lexists(path) and not overwrite:
        raise ValueError("%s exists; pass overwrite=True to replace it" % path)
    if format == "litert" and os.path.isdir(path):
        raise ValueError("%s is a folder; format=\"litert\" writes a .tflite file" % path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError("the folder of %s does not exist" % path)
