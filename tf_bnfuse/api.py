"""The Python API: fold a GraphDef in memory, or a SavedModel from disk to disk."""

import dataclasses
import os

from absl import logging

from tf_bnfuse import config as config_lib
from tf_bnfuse import errors
from tf_bnfuse.savedmodel import output_dir as output_dir_lib
from tf_bnfuse.passes import runner as pipeline_lib
from tf_bnfuse.savedmodel import preflight
from tf_bnfuse import report as report_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.savedmodel import root_functions
from tf_bnfuse.savedmodel import write as savedmodel
from tf_bnfuse.verify import compare as verify_lib
from tf_bnfuse.verify import test_inputs as test_inputs_lib
from tf_bnfuse import timing
from tf_bnfuse.verify import tflite as tflite_lib
from tf_bnfuse.passes import promote_float16

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
        outputs = pipeline_lib.default_outputs(graph_def)
    new_graph_def, pass_reports = pipeline_lib.run_pipeline(graph_def, list(outputs), config["pipeline"])
    return new_graph_def, report_lib.GraphReport(len(graph_def.node), len(new_graph_def.node), pass_reports)


def _promoted(folded):
    """The folded signatures with float16 compute promoted to float32 (TFLite has no float16 convs)."""
    promoted, by_graph = {}, {}
    for key, sig in folded.items():
        if id(sig.graph_def) not in by_graph:  # signatures sharing a graph keep sharing it
            by_graph[id(sig.graph_def)] = promote_float16.run(sig.graph_def, sig.output_tensors)[0]
        promoted[key] = dataclasses.replace(sig, graph_def=by_graph[id(sig.graph_def)])
    return promoted


def _check_metagraphs(saved_model_dir, tags, drop_other_metagraphs):
    """Refuses up front to drop MetaGraphs silently: the output holds one, for `tags`."""
    others = [t for t in savedmodel.read_tag_sets(saved_model_dir) if t != sorted(tags)]
    if others and not drop_other_metagraphs:
        raise errors.BadInputError(
            "SavedModel %s has %d other MetaGraph(s) (tags %s) besides %s; the output holds one MetaGraph, "
            "so they would be dropped: fold each with --tags into its own output, or pass "
            "--drop_other_metagraphs" % (saved_model_dir, len(others), "; ".join(",".join(t) or "(none)"
                                                                            for t in others), ",".join(tags)))
    return others


def fold_saved_model(saved_model_dir, output_dir, signature_keys=None, tags=DEFAULT_TAGS,
                     config=None, overwrite=False, verify=True, tflite_output=None,
                     drop_other_metagraphs=False, verify_inputs=None):
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
    drop_other_metagraphs: allow an input with MetaGraphs for other tag sets
    (they are not in the output); without it such an input is refused.
    verify_inputs: a .npz of arrays named INPUT or SIGNATURE/INPUT to verify
    on, instead of generated values (see verify_inputs.given_inputs).
    """
    config = _resolve_config(config)
    preflight.check_all(saved_model_dir, output_dir, overwrite, tflite_output, verify_inputs=verify_inputs)
    tags = tuple(tags) if tags else DEFAULT_TAGS
    savedmodel.check_tags(saved_model_dir, tags)
    run = report_lib.RunReport(saved_model_dir, output_dir, {})
    run.dropped_metagraphs = [",".join(t) for t in _check_metagraphs(saved_model_dir, tags, drop_other_metagraphs)]
    timeline = timing.Timeline()
    try:
        _fold_saved_model(run, timeline, saved_model_dir, output_dir, signature_keys, tags, config, verify,
                          tflite_output, verify_inputs)
    except BaseException as e:  # KeyboardInterrupt too: the CLI reports what was done
        run.phases = timeline.to_list()
        e.run_report = run
        raise
    run.phases = timeline.to_list()
    return run


def _fold_saved_model(run, timeline, saved_model_dir, output_dir, signature_keys, tags, config, verify,
                      tflite_output, verify_inputs):
    """fold_saved_model's work; fills `run` (a RunReport) as it goes."""
    phase = timeline.phase
    verify_config = config.get("verify", {})
    with phase("load"):
        loaded = savedmodel.load(saved_model_dir, tags)
        functions = savedmodel.select_signatures(loaded, signature_keys, saved_model_dir)
        owners = resources.resource_owners(loaded)
        aliases, run.dropped_functions, pending_traces = root_functions.find(loaded, functions)
    input_specs = {k: savedmodel.signature_inputs(f) for k, f in functions.items()}
    given = test_inputs_lib.given_inputs(verify_inputs, input_specs) if verify_inputs else {}
    folded, reports = {}, run.signatures
    bounds, precisions = {}, {}  # signature -> {input: IndexBound}, {output: half precision}
    first_with = {}  # signature fingerprint -> the first signature key that has it
    for key, function in functions.items():
        fingerprint = savedmodel.signature_fingerprint(function)
        if fingerprint in first_with:
            first = first_with[fingerprint]
            folded[key] = dataclasses.replace(folded[first], key=key)
            reports[key] = dataclasses.replace(reports[first], same_as=first)
            bounds[key], precisions[key] = bounds[first], precisions[first]
            logging.info("signature %s is the same function as %s: folded once", key, first)
            continue
        first_with[fingerprint] = key
        with phase("freeze %s" % key):
            frozen = savedmodel.freeze(key, function, owners)
            bounds[key] = test_inputs_lib.index_bounds(frozen.graph_def, frozen.inputs)
        with phase("passes %s" % key):
            nodes_before = len(frozen.graph_def.node)
            graph_def, pass_reports = pipeline_lib.run_pipeline(
                frozen.release_graph_def(), frozen.output_tensors, config["pipeline"], owns_input=True)
            precisions[key] = verify_lib.output_precisions(graph_def, frozen.outputs)
        reports[key] = report_lib.GraphReport(nodes_before, len(graph_def.node), pass_reports)
        folded[key] = dataclasses.replace(frozen, graph_def=graph_def)
        del frozen, graph_def  # the frozen weights: only the folded ones are needed from here on
    output_specs = {k: sig.outputs for k, sig in folded.items()}
    inputs = test_inputs_lib.make_inputs(input_specs, verify_config, test_inputs_lib.model_vocabulary(saved_model_dir),
                                         bounds, given)

    if pending_traces:
        with phase("match root functions"):
            root_functions.match_by_value(loaded, functions, pending_traces, aliases, run.dropped_functions, inputs,
                                          verify_config)
    run.kept_functions = sorted(aliases)

    parent = os.path.dirname(os.path.realpath(output_dir))
    output_dir_lib.remove_stale_scratch(parent)
    scratch = output_dir_lib.make_scratch(parent)
    # The .tflite is written beside its final name, so that its rename cannot cross filesystems.
    tflite_scratch = "%s.tf_bnfuse-%d.tmp" % (tflite_output, os.getpid()) if tflite_output else None
    try:
        built = os.path.join(scratch, "saved_model")
        initializers = savedmodel.initializers_to_keep(loaded)  # a TF1 model's main op, rebuilt once
        with phase("write"):
            savedmodel.write(folded, built, tags, initializers, aliases)
        if not tflite_output:
            folded = None  # the written model holds the weights now
        # A signature found to be the same function as another (same graph, same
        # variables) is checked against that one's original: its own copy would
        # compute the same values and only cost a first call.
        # A signature that only wraps a kept root function is compared with the original's
        # root function (root_functions.references).
        wrapped = root_functions.references(loaded, aliases, input_specs)
        references = {}
        for key in functions:
            reference_key = reports[key].same_as or key
            references[key] = wrapped.get(reference_key) or functions[reference_key]
        with phase("verify"):
            # Even unverified, the output is loaded and run: a model that cannot run is never written.
            reloaded = savedmodel.load(built, tags)
            reloaded_functions = {k: reloaded.signatures[k] for k in functions}
            if verify:
                run.verification = verify_lib.verify(references, reloaded_functions, inputs, output_specs,
                                                     verify_config, precisions)
                run.verification.inputs = test_inputs_lib.describe_integer_inputs(input_specs, bounds, given)
            else:
                verify_lib.smoke_test(reloaded_functions, inputs)
            _raise_if_failed(run.verification)  # the signatures first: a root function only calls one
            root_functions.check(loaded, reloaded, aliases, inputs, verify_config if verify else None, precisions)
        if not verify:
            logging.warning("verification skipped: the output of %s ran on test inputs but was NOT "
                            "compared with the input", output_dir)
        elif not run.verification.compared:
            logging.warning("verification compared NOTHING: every output is random (it differs between two "
                            "calls of the original on the same input): %s", ", ".join(
                                run.verification.random_outputs()))
        if tflite_output:
            with phase("tflite"):
                convert_dir = built
                if any(promote_float16.has_half(sig.graph_def) for sig in folded.values()):
                    convert_dir = os.path.join(scratch, "float32_for_tflite")
                    savedmodel.write(_promoted(folded), convert_dir, tags, initializers)
                model_content, run.tflite = tflite_lib.build(
                    saved_model_dir, convert_dir, tflite_output, list(functions), tags, references,
                    inputs, verify_config)
                run.tflite.promoted_float16 = convert_dir != built
            if not run.tflite.ok:
                bad = next(c for c in run.tflite.checks if not c.ok)
                raise errors.VerificationError(
                    "TFLite check failed: signature %s output %s: max abs error %.3g, max rel error %.3g "
                    "(rtol %g, atol %g); nothing written" % (bad.signature, bad.output, bad.max_abs_error,
                                                            bad.max_rel_error, bad.rtol, bad.atol))
            with open(tflite_scratch, "wb") as f:
                f.write(model_content)
        with phase("move into place"):
            output_dir_lib.move_into_place(built, output_dir, scratch)
            if tflite_output:
                os.replace(tflite_scratch, tflite_output)
    finally:
        output_dir_lib.remove_scratch(scratch)
        if tflite_scratch and os.path.exists(tflite_scratch):
            os.remove(tflite_scratch)


def _raise_if_failed(verification):
    if verification is None or verification.ok:
        return
    bad = verification.failures()[0]
    raise errors.VerificationError(
        "verification failed: signature %s output %s on %s: max abs error %.3g, max rel error %.3g "
        "(rtol %g, atol %g, set by %s); nothing written" % (
            bad.signature, bad.output, bad.device, bad.max_abs_error, bad.max_rel_error, bad.rtol, bad.atol,
            bad.precision))
