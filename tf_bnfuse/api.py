"""The Python API: fold a GraphDef in memory, or a SavedModel from disk to disk.

fold_saved_model is a sequence of phases over one _Run: load, freeze the signatures, make
the test inputs, run the original on them, fold, write, verify, TFLite, move into place.
saved_model.pb is parsed once (a failed verification's search for its fold loads it again:
the passes may have released the original's folded kernels, WeightStore.releases).
"""

import dataclasses
import gc
import os
from typing import Optional

from absl import logging

from tf_bnfuse import config as config_lib
from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib
from tf_bnfuse import report as report_lib
from tf_bnfuse.passes import promote_float16
from tf_bnfuse.passes import runner
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.savedmodel import freeze as freeze_lib
from tf_bnfuse.savedmodel import load as load_lib
from tf_bnfuse.savedmodel import output_dir as output_dir_lib
from tf_bnfuse.savedmodel import preflight
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.savedmodel import root_functions
from tf_bnfuse.savedmodel import tf1
from tf_bnfuse.savedmodel import write as write_lib
from tf_bnfuse.verify import compare as verify_lib
from tf_bnfuse.verify import culprit as culprit_lib
from tf_bnfuse.verify import quantize as quantize_lib
from tf_bnfuse.verify import root_functions as root_function_checks
from tf_bnfuse.verify import test_inputs as test_inputs_lib
from tf_bnfuse.verify import tflite as tflite_lib

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


@dataclasses.dataclass
class _Run:
    """What the phases of one fold_saved_model run share; each phase fills in its part."""
    saved_model_dir: str
    output_dir: str
    signature_keys: Optional[list]
    tags: tuple
    config: dict
    verify: bool
    tflite_output: Optional[str]
    verify_inputs: Optional[str]
    model: Optional[load_lib.SavedModelFile]  # until the load phase is done
    report: report_lib.RunReport
    checkpoint: object  # called at each phase boundary; may raise to end the run
    timeline: report_lib.Timeline = dataclasses.field(default_factory=report_lib.Timeline)
    # The input's other MetaGraphs, each a _Run of its own sharing the timeline and output;
    # in them, metagraph is their tag set ("gpu,serve"), None in the --tags one.
    others: list = dataclasses.field(default_factory=list)
    metagraph: Optional[str] = None
    # --tflite_quantize and what goes with it (preflight.check_tflite_options)
    tflite_quantize: str = "none"
    tflite_io: str = "float"
    calibration_inputs: Optional[str] = None
    tflite_max_error: Optional[float] = None
    # load
    loaded: object = None
    functions: dict = None  # signature key -> ConcreteFunction
    aliases: dict = None  # root function name -> [RootAlias]
    pending_traces: dict = None
    vocabulary: list = None
    input_specs: dict = None  # signature -> {input: TensorSpecInfo}
    given: dict = None  # signature -> {input: array} from --verify_inputs
    # freeze and fold
    state: list = None  # the variables the signatures write; the output saves them from the original
    same_as: dict = dataclasses.field(default_factory=dict)  # signature -> the same function's first signature
    frozen: dict = None  # signature (the first of its function) -> FrozenSignature, until folded
    folded: dict = dataclasses.field(default_factory=dict)  # signature -> FrozenSignature with the folded graph
    bounds: dict = dataclasses.field(default_factory=dict)  # signature -> {input: IndexBound}
    shapes: dict = dataclasses.field(default_factory=dict)  # signature -> {input of unknown rank: shape}
    precisions: dict = dataclasses.field(default_factory=dict)  # signature -> {output: half precision}
    output_specs: dict = None  # signature -> {output: TensorSpecInfo}
    inputs: dict = None  # signature -> {input: array}: the test inputs
    # write
    scratch: Optional[str] = None
    built: Optional[str] = None
    tflite_scratch: Optional[str] = None
    initializers: list = None
    references: dict = None  # signature -> what its output is compared with
    expected: object = None  # compare.Expected: the original's outputs on the test inputs
    expected_roots: dict = None  # root_functions.expected_outputs
    reloaded_original: tuple = None  # (loaded, functions), loaded again after a release (_original)

    @property
    def releases(self):
        """Whether the passes may shrink the original's folded kernels (WeightStore.releases): the
        TFLite phase converts and calls the original after them."""
        return not self.tflite_output

    @property
    def verify_config(self):
        return self.config.get("verify", {})

    def phase(self, name):
        if self.metagraph:
            name = "%s [%s]" % (name, self.metagraph)
        self.checkpoint(name)
        return self.timeline.phase(name)

    def all_metagraphs(self):
        return [self] + self.others


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
    tags = tuple(tags) if tags else DEFAULT_TAGS
    model = load_lib.read(saved_model_dir)  # the one parse of saved_model.pb
    model.check_tags(tags)
    tags = model.stored_tags(tags)  # the output keeps the input's order
    run = _Run(saved_model_dir, output_dir, signature_keys, tags, config, verify, tflite_output, verify_inputs,
               model, report_lib.RunReport(saved_model_dir, output_dir, {}), checkpoint or (lambda boundary: None),
               tflite_quantize=tflite_quantize, tflite_io=tflite_io, calibration_inputs=calibration_inputs,
               tflite_max_error=tflite_max_error)
    others = model.other_tag_sets(tags)
    if drop_other_metagraphs:
        run.report.dropped_metagraphs, others = [",".join(sorted(t)) for t in others], []
    for other_tags in others:
        label = ",".join(sorted(other_tags))
        run.others.append(_Run(saved_model_dir, output_dir, signature_keys, tuple(other_tags), config, verify, None,
                               verify_inputs, model, report_lib.RunReport(saved_model_dir, output_dir, {}),
                               run.checkpoint, run.timeline, metagraph=label))
        run.report.other_metagraphs[label] = run.others[-1].report
    try:
        _run_phases(run)
    except BaseException as e:  # KeyboardInterrupt too: the CLI reports what was done
        run.report.phases = run.timeline.to_list()
        e.run_report = run.report
        raise
    run.report.phases = run.timeline.to_list()
    return run.report


def _run_phases(run):
    for each in run.all_metagraphs():
        _load(each)
        _freeze_signatures(each)
        with resources.values_restored(each.state):  # calling the original advances them
            _make_test_inputs(each)
            _run_original(each)
        _fold_signatures(each)
    parent = os.path.dirname(os.path.realpath(run.output_dir))
    output_dir_lib.remove_stale_scratch(parent)
    run.scratch = output_dir_lib.make_scratch(parent)
    try:
        _write(run)
        for each in run.all_metagraphs():
            _verify(each)
        if run.tflite_output:
            _convert_to_tflite(run)
        _move_into_place(run)
    finally:
        output_dir_lib.remove_scratch(run.scratch)
        if run.tflite_scratch and os.path.exists(run.tflite_scratch):
            os.remove(run.tflite_scratch)


def _load(run):
    with run.phase("load"):
        # Before the load: it prunes the proto's function library.
        run.vocabulary = test_inputs_lib.model_vocabulary(run.saved_model_dir, run.model.proto)
        run.loaded = load_lib.load(run.model, run.tags)
        run.functions = freeze_lib.select_signatures(run.loaded, run.signature_keys, run.saved_model_dir,
                                                     run.metagraph)
        run.aliases, run.report.dropped_functions, run.pending_traces = root_functions.find(
            run.loaded, run.functions)
    run.model = None  # the parsed saved_model.pb: nothing reads it past the load
    run.input_specs = {k: freeze_lib.signature_inputs(f) for k, f in run.functions.items()}
    run.given = test_inputs_lib.given_inputs(run.verify_inputs, run.input_specs) if run.verify_inputs else {}


def _freeze_signatures(run):
    """Freezes each signature; one that is the same function as an earlier one (Keras 3's serve and
    serving_default) is frozen and folded once and shares the result."""
    owners = resources.resource_owners(run.loaded)
    written = freeze_lib.written_handles(run.functions.values())
    run.state = resources.variables_of(owners, written)
    first_with = {}  # signature fingerprint -> the first signature key that has it
    for key, function in run.functions.items():
        first = first_with.setdefault(freeze_lib.signature_fingerprint(function), key)
        if first != key:
            run.same_as[key] = first
            logging.info("signature %s is the same function as %s: folded once", key, first)
    distinct = list(first_with.values())
    # What more than one signature reads stays whole in the original (WeightStore.releases).
    shared = freeze_lib.shared_variables([run.functions[k] for k in distinct]) if run.releases else None
    run.frozen = {}
    for key in distinct:
        with run.phase("freeze %s" % key):
            frozen = freeze_lib.freeze(key, run.functions[key], owners, graph_lib.WeightStore(), written, shared)
            run.bounds[key] = test_inputs_lib.index_bounds(frozen.graph_def, frozen.inputs)
            run.shapes[key] = test_inputs_lib.input_shapes(frozen.graph_def, frozen.inputs)
        run.frozen[key] = frozen
    for key, first in run.same_as.items():
        run.bounds[key], run.shapes[key] = run.bounds[first], run.shapes[first]
    run.output_specs = {k: run.frozen[run.same_as.get(k, k)].outputs for k in run.functions}


def _fold_signatures(run):
    """Runs the passes over each frozen signature into run.folded."""
    reports = {}
    for key, frozen in run.frozen.items():
        frozen.weights.releases = run.releases  # the original's outputs are known by now
        with run.phase("passes %s" % key):
            nodes_before = len(frozen.graph_def.node)
            graph_def, pass_reports = runner.run_pipeline(
                frozen.release_graph_def(), frozen.output_tensors, run.config["pipeline"], owns_input=True,
                context=PassContext(frozen.weights), weights_out=True)
            run.precisions[key] = verify_lib.output_precisions(graph_def, frozen.outputs)
        run.folded[key] = dataclasses.replace(frozen, graph_def=graph_def)
        reports[key] = report_lib.GraphReport(nodes_before, len(graph_def.node), pass_reports)
    run.frozen = None
    for key, first in run.same_as.items():
        run.folded[key] = dataclasses.replace(run.folded[first], key=key)
        reports[key] = dataclasses.replace(reports[first], same_as=first)
        run.precisions[key] = run.precisions[first]
    run.report.signatures.update((k, reports[k]) for k in run.functions)


def _make_test_inputs(run):
    run.inputs = test_inputs_lib.make_inputs(run.input_specs, run.verify_config, run.vocabulary, run.bounds,
                                             run.given, run.shapes)
    if run.pending_traces:
        with run.phase("match root functions"):
            root_function_checks.match_by_value(run.loaded, run.functions, run.pending_traces, run.aliases,
                                                run.report.dropped_functions, run.inputs, run.verify_config)
    run.report.kept_functions = sorted(run.aliases)


def _run_original(run):
    """The original's outputs on the test inputs, which verification compares the output with:
    computed before the passes, which may release its folded kernels."""
    if not run.verify:
        return
    with run.phase("reference outputs"):
        run.references = _references(run, run.loaded, run.functions)
        deterministic = {k for k in run.functions
                         if graph_lib.is_deterministic(run.frozen[run.same_as.get(k, k)].graph_def)}
        run.expected = verify_lib.expected_outputs(run.references, run.inputs, deterministic=deterministic)
        run.expected_roots = root_function_checks.expected_outputs(run.loaded, run.aliases, run.inputs,
                                                                   run.expected.seen)


def _original(run):
    """(loaded, signature functions) of the input, for what runs it after the passes (a check as
    written, the culprit search): the run's own load, or, where the passes may have released
    folded kernels of it, the input loaded again."""
    if not run.releases:
        return run.loaded, run.functions
    if run.reloaded_original is None:
        loaded = load_lib.load(load_lib.read(run.saved_model_dir), run.tags)
        functions = freeze_lib.select_signatures(loaded, run.signature_keys, run.saved_model_dir, run.metagraph)
        run.reloaded_original = (loaded, functions)
    return run.reloaded_original


def _write(run):
    """Writes every MetaGraph's folded signatures into one SavedModel."""
    run.built = os.path.join(run.scratch, "saved_model")
    for each in run.all_metagraphs():
        each.built = run.built
        each.initializers = tf1.initializers_to_keep(each.loaded)  # a TF1 model's main op, rebuilt once
    with run.phase("write"):
        # Without TFLite nothing writes the folded signatures again: each kernel leaves them as it is saved.
        write_lib.write([write_lib.MetaGraphToWrite(each.tags, each.folded, each.initializers, each.aliases)
                         for each in run.all_metagraphs()], run.built, release_weights=run.releases)
    for each in run.all_metagraphs():
        if each.releases:  # the written model holds the weights now; what runs the original loads it again
            each.folded = each.loaded = each.functions = each.references = each.pending_traces = None
    # The written module's functions and graphs hold one another in cycles, and with them the
    # weights' variables: freed now, not in the verification, beside the reloaded copy.
    gc.collect()


def _verify(run):
    """Loads the written output and runs every signature and kept root function on the test
    inputs, comparing them with the original's unless verification is off."""
    if run.tflite_output and run.references is None:
        run.references = _references(run, run.loaded, run.functions)  # what TFLite compares with
    with run.phase("verify"):
        # Even unverified, the output is loaded and run: a model that cannot run is never written.
        reloaded = _load_written(run)
        reloaded_functions = {k: reloaded.signatures[k] for k in run.input_specs}
        if run.verify:
            run.report.verification = verify_lib.verify(
                run.expected, reloaded_functions, run.inputs, run.output_specs, run.verify_config, run.precisions,
                original_again=lambda: _references(run, *_original(run)))
            run.report.verification.inputs = test_inputs_lib.describe_integer_inputs(
                run.input_specs, run.bounds, run.given)
        else:
            verify_lib.smoke_test(reloaded_functions, run.inputs)
        if run.report.verification is not None and not run.report.verification.ok:
            run.report.verification.culprit = _find_culprit(run, run.report.verification.failures()[0])
        verify_lib.raise_if_failed(run.report.verification)  # the signatures first: a root function only calls one
        root_function_checks.check(run.expected_roots, reloaded, run.aliases, run.inputs,
                                   run.verify_config if run.verify else None, run.precisions,
                                   original_again=lambda: _original(run)[0])
    if not run.verify:
        logging.warning("verification skipped: the output of %s ran on test inputs but was NOT "
                        "compared with the input", run.output_dir)
    elif not run.report.verification.compared:
        logging.warning("verification compared NOTHING: every output is random (it differs between two "
                        "calls of the original on the same input): %s", ", ".join(
                            run.report.verification.random_outputs()))


def _load_written(run):
    """The written output, loaded as a user loads it. It failing is tf_bnfuse's fault, not the
    input's: an internal error (exit 3), never "bad input" (exit 2)."""
    try:
        return load_lib.load(load_lib.read(run.built), run.tags)
    except errors.BadInputError as e:
        raise errors.BnFuseError("the folded model does not load, a tf_bnfuse bug (nothing written): %s" % e)


def _references(run, loaded, functions):
    """{signature: what its outputs are compared with}. A signature found to be the same function
    as another (same graph, same variables) is checked against that one's original: its own copy
    would compute the same values and only cost a first call. A signature that only wraps a kept
    root function is compared with the original's root function (root_functions.references)."""
    wrapped = root_function_checks.references(loaded, run.aliases, run.input_specs)
    references = {}
    for key in functions:
        reference_key = run.same_as.get(key, key)
        references[key] = wrapped.get(reference_key) or functions[reference_key]
    return references


def _convert_to_tflite(run):
    with run.phase("tflite"):
        convert_dir = run.built
        if any(promote_float16.has_half(sig.graph_def) for sig in run.folded.values()):
            convert_dir = os.path.join(run.scratch, "float32_for_tflite")
            write_lib.write([write_lib.MetaGraphToWrite(run.tags, _promoted(run.folded), run.initializers)],
                            convert_dir)
        quantization = _quantization(run)
        model_content, run.report.tflite = tflite_lib.build(
            run.saved_model_dir, convert_dir, run.tflite_output, list(run.functions), run.tags, run.references,
            run.inputs, run.verify_config, quantization, run.inputs)
        run.report.tflite.promoted_float16 = convert_dir != run.built
        if quantization is not None:
            run.report.tflite.quantization.max_error = run.tflite_max_error
    quantized = run.report.tflite.quantization
    if quantized is not None and not quantized.ok:
        worst = quantized.worst
        raise errors.VerificationError(
            "TFLite %s model: signature %s output %s has relative L2 error %.3g against the original, above "
            "--tflite_max_error %g; nothing written" % (quantized.mode, worst.signature, worst.output,
                                                        worst.relative_l2_error, quantized.max_error))
    if not run.report.tflite.ok:
        bad = next(c for c in run.report.tflite.checks if not c.ok)
        raise errors.VerificationError(
            "TFLite check failed: signature %s output %s: max abs error %.3g, max rel error %.3g "
            "(rtol %g, atol %g); nothing written" % (bad.signature, bad.output, bad.max_abs_error,
                                                    bad.max_rel_error, bad.rtol, bad.atol))
    # Written beside its final name, so that its rename cannot cross filesystems.
    run.tflite_scratch = "%s.tf_bnfuse-%d.tmp" % (run.tflite_output, os.getpid())
    with open(run.tflite_scratch, "wb") as f:
        f.write(model_content)


def _quantization(run):
    """The quantize.Quantization of --tflite_quantize, None for a float model. The metrics are
    measured on the verification's test inputs; int8 calibrates on --calibration_inputs, else on
    seeded random inputs drawn apart from them (another seed)."""
    if run.tflite_quantize == "none":
        return None
    quantization = quantize_lib.Quantization(
        run.tflite_quantize, run.tflite_io, held_out_source=quantize_lib.held_out_source(run.verify_inputs, run.inputs))
    if run.tflite_quantize == "int8":
        # A signature that is the same function as another is calibrated once (tflite keys the
        # samples by the signatures the converter writes).
        config = dict(run.verify_config, seed=run.verify_config.get("seed", 0) + 1,
                      batch_size=quantize_lib.CALIBRATION_SAMPLES)
        quantization.calibration, quantization.calibration_source = quantize_lib.calibration(
            run.calibration_inputs, {k: s for k, s in run.input_specs.items() if k not in run.same_as},
            lambda specs: test_inputs_lib.make_inputs(specs, config, run.vocabulary, run.bounds, None, run.shapes))
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


def _move_into_place(run):
    with run.phase("move into place"):
        output_dir_lib.move_into_place(run.built, run.output_dir, run.scratch)
        if run.tflite_output:
            os.replace(run.tflite_scratch, run.tflite_output)
    run.checkpoint("moved into place")


def _find_culprit(run, failed):
    """The culprit.Culprit of a failed check: its signature's pipeline runs again with folds left
    out, by halves, each result called in memory as the written model would be."""
    key = run.same_as.get(failed.signature, failed.signature)
    expected = run.expected.calls[(failed.signature, failed.device)][0][failed.output]
    with run.phase("find the failing fold"):
        loaded, functions = _original(run)
        frozen = freeze_lib.freeze(key, functions[key], resources.resource_owners(loaded), graph_lib.WeightStore(),
                                   freeze_lib.written_handles(functions.values()))

        def check_without(left_out):
            names = [name for fold in left_out for name in [fold.node] + list(fold.absorbed)]
            weights = frozen.weights.copy()  # each re-run retains its own: the frozen graph names them all
            graph_def, _ = runner.run_pipeline(frozen.graph_def, frozen.output_tensors, run.config["pipeline"],
                                               context=PassContext(weights, left_out=names), weights_out=True)
            function = write_lib.signature_callable(dataclasses.replace(frozen, graph_def=graph_def, weights=weights))
            return culprit_lib.recheck(function, expected, run.inputs[failed.signature], failed)

        found, (_, error), checks = culprit_lib.bisect(run.report.signatures[key].folds, check_without)
    return culprit_lib.Culprit(failed.signature, failed.output, failed.device, [dataclasses.asdict(f) for f in found],
                               failed.max_rel_error, error, checks)
