"""The phases after the passes: write every MetaGraph into one SavedModel, verify what was
written, and move it into place."""

import dataclasses
import logging
import os
import uuid

import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse import graph as graph_lib
from tf_bnfuse.passes import runner
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.phases import prepare
from tf_bnfuse.savedmodel import load as load_lib
from tf_bnfuse.savedmodel import output_dir as output_dir_lib
from tf_bnfuse.savedmodel import probe as probe_lib
from tf_bnfuse.savedmodel import write as write_lib
from tf_bnfuse.verify import compare as verify_lib
from tf_bnfuse.verify import records
from tf_bnfuse.verify import culprit as culprit_lib
from tf_bnfuse.verify import fold_check
from tf_bnfuse.verify import root_function_checks
from tf_bnfuse.verify import verification_inputs

_log = logging.getLogger(__name__)


def build(folded_metagraphs, release_weights, options, progress, own_variables=False):
    """(write_lib.BuiltModel of every MetaGraph's folded signatures, their FoldChecks: None without
    verification): the folded model built in memory, each fold checked by itself (check_folds)."""
    model = _built_model(folded_metagraphs, release_weights, progress, own_variables)
    return model, _checked_folds(model, folded_metagraphs, options, progress)


def write(folded_metagraphs, built, release_weights, options, progress):
    """Writes every MetaGraph's folded signatures into one SavedModel at built, checking each fold
    by itself meanwhile: the write runs in a thread of its own beside the checks (one is I/O and
    checksums, the other compute), and the "write" phase is what is left of it once the checks
    are done. Returns the FoldedMetaGraphs without what a releasing MetaGraph lets go of now (the
    written model holds the weights, and what runs the original after this loads it again:
    OriginalAgain), and their FoldChecks (None without verification)."""
    model = _built_model(folded_metagraphs, release_weights, progress)
    with write_lib.SavingInBackground(model, built) as saving:
        fold_checks = _checked_folds(model, folded_metagraphs, options, progress)
        with progress.phase("write"):
            saving.wait()
    del model
    return [dataclasses.replace(m, loaded=None, folded=None) if m.metagraph.releases else m
            for m in folded_metagraphs], fold_checks


def _built_model(folded_metagraphs, release_weights, progress, own_variables=False):
    with progress.phase("build"):
        # Without TFLite nothing writes the folded signatures again: each kernel leaves them as it is built.
        return write_lib.build([write_lib.MetaGraphToWrite(m.metagraph.tags, m.folded, m.initializers,
                                                           m.roots.aliases) for m in folded_metagraphs],
                               release_weights=release_weights, own_variables=own_variables)


def _checked_folds(model, folded_metagraphs, options, progress):
    return [check_folds(graphs, m, options, progress.of(m.metagraph)) if options.verify else None
            for graphs, m in zip(model.graphs, folded_metagraphs)]


def check_folds(graphs, folded, options, progress):
    """The FoldChecks of one MetaGraph (verify/fold_check.check_signatures): each signature's
    folded graph, as built (graphs: {key: (GraphDef without weights, weights)}), run once beside
    the original chain of every fold. The original's weights, pinned until now, are let go of.
    A failed or unchecked fold is recorded in the report's verification and raised, naming it."""
    with progress.phase("check folds"):
        checks = fold_check.check_signatures(
            graphs, folded.reference.originals, folded.folded,
            {key: folded.report.signatures[key].folds for key in folded.reference.originals},
            folded.test_inputs, folded.signatures.state, options.verify_config)
    for key in folded.reference.originals:
        folded.report.signatures[key].weights_peak_bytes = folded.folded[key].weights.peak_bytes
    if not checks.ok or checks.not_checked:
        folded.report.verification = records.VerificationReport(devices=[checks.device], folds=checks)
        fold_check.raise_if_failed(checks, options.verify_config)
    return checks


def verify(built, folded, fold_checks, options, progress):
    """Loads the written output at `built` and verifies it (verify_object)."""
    with progress.phase("verify"):
        # Even unverified, the output is loaded and run: a model that cannot run is never written.
        verify_object(load_written(built, folded.metagraph.tags), folded, fold_checks, options, progress)
    if not options.verify:
        _log.warning("verification skipped: the output of %s ran on test inputs but was NOT "
                     "compared with the input", options.output_dir)


def verify_object(model, folded, fold_checks, options, progress):
    """Runs every signature and kept root function of one FoldedMetaGraph on the test inputs, as
    `model` (the written output loaded, or the folded object in memory) has them, comparing them
    with the original's unless verification is off. Records the VerificationReport in
    folded.report.verification (a failed one with the fold it comes from) before raising
    VerificationError."""
    test_inputs, reference = folded.test_inputs, folded.reference
    functions = {k: model.signatures[k] for k in test_inputs.input_specs}
    if options.verify:
        verification = verify_lib.verify(
            reference.expected, functions, test_inputs.arrays, folded.signatures.output_specs,
            options.verify_config, folded.precisions,
            original_again=lambda: prepare.original_references(*folded.original.get(), folded.signatures,
                                                               folded.roots, test_inputs),
            evaluated_again=OriginalEvaluatedAgain(folded))
        verification.folds = fold_checks
        verification.inputs = verification_inputs.describe_integer_inputs(test_inputs.input_specs,
                                                                      test_inputs.bounds, test_inputs.given)
        folded.report.verification = verification
        if not verification.ok:
            verification.culprit = find_culprit(verification.failures()[0], folded, options, progress)
        verify_lib.raise_if_failed(verification)  # the signatures first: a root function only calls one
    else:
        verify_lib.smoke_test(functions, test_inputs.arrays)
    root_function_checks.check(reference.expected_roots if reference else None, model, folded.roots.aliases,
                               test_inputs.arrays, options.verify_config if options.verify else None,
                               folded.precisions, original_again=lambda: folded.original.get()[0],
                               accepted=verify_lib.spread_bounds(folded.report.verification, reference.expected)
                               if options.verify else None)
    if options.verify and not folded.report.verification.compared:
        _log.warning("verification compared NOTHING: every output is random (it differs between two "
                     "calls of the original on the same input): %s", ", ".join(
                         folded.report.verification.random_outputs()))


class OriginalEvaluatedAgain:
    """signature -> [(the original's {output: value} evaluated otherwise, how)]: in float64 where
    its graph can be widened, and as written in float32. On demand, once per signature: the
    input frozen again from what OriginalAgain loads, called on the first device on the
    signature's test inputs (verify/compare.py)."""

    def __init__(self, folded):
        self.folded, self.cache = folded, {}

    def __call__(self, key):
        if key not in self.cache:
            self.cache[key] = self._evaluate(key)
        return self.cache[key]

    def _evaluate(self, key):
        folded = self.folded
        frozen = folded.original.frozen(folded.signatures.first(key))
        tensors = {k: graph_lib.tensor_name(*graph_lib.canonical_tensor(v.tensor)) for k, v in frozen.outputs.items()}
        found = []
        arrays = folded.test_inputs.arrays[key]
        for float64, what in ((True, "in float64"), (False, "as written in float32")):
            probe = probe_lib.probe_callable(frozen, sorted(set(tensors.values())), float64=float64)
            if probe is None:
                continue
            try:
                values = fold_check.run_as_written(probe, folded.test_inputs.input_specs[key], arrays,
                                                   state=folded.signatures.state)["full"]
            except tf.errors.OpError as e:  # an op without a float64 kernel, say
                _log.info("the original cannot be evaluated %s: %s", what, errors.most_specific_line(e))
                continue
            found.append(({k: values[t].numpy() for k, t in tensors.items() if t in values}, what))
        return found


def load_written(built, tags):
    """The written output, loaded as a user loads it. It failing is tf_bnfuse's fault, not the
    input's: an internal error (exit 3), never "bad input" (exit 2)."""
    try:
        return load_lib.load(load_lib.read(built), tags)
    except errors.BadInputError as e:
        raise errors.BnFuseError("the folded model does not load, a tf_bnfuse bug (nothing written): %s" % e)


def find_culprit(failed, folded, options, progress):
    """The culprit.Culprit of a failed check: its signature's pipeline runs again with folds left
    out, by halves, each result called in memory as the written model would be; where leaving
    every fold out does not help, with every fold left out and the pipeline cut short, by
    halves, to the first pass after which the output fails."""
    key = folded.signatures.first(failed.signature)
    expected = folded.reference.expected.calls[(failed.signature, failed.device)][0][failed.output]
    pipeline = options.config["pipeline"]
    with progress.phase("find the failing fold"):
        frozen = folded.original.frozen(key)

        def check_without(left_out, passes=pipeline):
            names = [name for fold in left_out for name in [fold.node] + list(fold.absorbed)]
            weights = frozen.weights.copy()  # each re-run retains its own: the frozen graph names them all
            graph_def, _ = runner.run_pipeline(frozen.graph_def, frozen.output_tensors, list(passes),
                                               context=PassContext(weights, left_out=names), weights_out=True)
            # Its own names for the functions it rewrote: a process registers a function name once.
            graph_def = graph_lib.renamed_functions(graph_def, "_culprit_%s" % uuid.uuid4().hex[:12])
            function = write_lib.signature_callable(dataclasses.replace(frozen, graph_def=graph_def, weights=weights))
            return culprit_lib.recheck(function, expected, folded.test_inputs.arrays[failed.signature], failed)

        folds = folded.report.signatures[key].folds
        found, (_, error), checks = culprit_lib.bisect(folds, check_without)
        pass_name = None
        if not found:
            first, calls = culprit_lib.first_failing(
                len(pipeline), lambda count: not check_without(folds, pipeline[:count])[0])
            checks += calls
            if first is not None:
                entry = pipeline[first - 1]
                pass_name = entry["pass"] if isinstance(entry, dict) else entry
    return culprit_lib.Culprit(failed.signature, failed.output, failed.device, [dataclasses.asdict(f) for f in found],
                               failed.max_rel_error, error, checks, pass_name)


def move_into_place(built, output_dir, scratch, files, progress):
    """The SavedModel at `built` renamed to output_dir, then files [(scratch path, final path)]."""
    with progress.phase("move into place"):
        output_dir_lib.move_into_place(built, output_dir, scratch)
        for file_scratch, path in files:
            os.replace(file_scratch, path)
    progress.checkpoint("moved into place")
