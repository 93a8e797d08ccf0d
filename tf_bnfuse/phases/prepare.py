"""The phases of one MetaGraph up to its folded signatures: load, freeze, test inputs, the
original's outputs on them, and the passes."""

import dataclasses
import logging

from tf_bnfuse import graph as graph_lib
from tf_bnfuse.passes import runner
from tf_bnfuse.passes.context import PassContext
from tf_bnfuse.phases import parts
from tf_bnfuse.savedmodel import freeze as freeze_lib
from tf_bnfuse.savedmodel import load as load_lib
from tf_bnfuse.savedmodel import objects as objects_lib
from tf_bnfuse.savedmodel import resources
from tf_bnfuse.savedmodel import root_functions
from tf_bnfuse.verify import compare as verify_lib
from tf_bnfuse.verify import tolerance as tolerance_lib
from tf_bnfuse.verify import quantize as quantize_lib
from tf_bnfuse.verify import root_function_checks
from tf_bnfuse.verify import verification_inputs

_log = logging.getLogger(__name__)


def load(model, metagraph, options, progress):
    """The LoadedSignatures of one MetaGraph of a SavedModelFile."""
    with progress.phase("load"):
        # Before the load: it prunes the proto's function library.
        vocabulary = verification_inputs.model_vocabulary(options.saved_model_dir, model.proto)
        loaded, checkpoint = load_lib.load_with_checkpoint_keys(model, metagraph.tags)
        functions = freeze_lib.select_signatures(loaded, options.signature_keys, options.saved_model_dir,
                                                 metagraph.label)
        aliases, dropped, pending = root_functions.find(loaded, functions)
    input_specs = {k: freeze_lib.signature_inputs(f) for k, f in functions.items()}
    given = _given_inputs_checked(options, input_specs)
    return parts.LoadedSignatures(loaded, functions, aliases, dropped, pending, vocabulary, input_specs, given,
                                  checkpoint)


def _given_inputs_checked(options, input_specs):
    """The verification inputs given ({signature: {input: array}}, none: {}), and the int8
    calibration samples checked against the signatures (names, dtypes, shapes, sample counts)
    before any work: a wrong one is refused here, not after the folding."""
    given = ({} if options.verify_inputs is None
             else verification_inputs.given_inputs(options.verify_inputs, input_specs))
    check_calibration(options.tflite, input_specs)
    return given


def check_calibration(tflite, input_specs):
    """BadInputError for calibration samples (TfliteOptions.calibration_inputs) that name no input
    of these signatures, or that the inputs do not take (dtype, shape, sample counts)."""
    if tflite is not None and tflite.calibration_inputs is not None:
        for arrays in verification_inputs.given_inputs(tflite.calibration_inputs, input_specs,
                                                   "{--calibration_inputs}").values():
            quantize_lib.sample_count(arrays)


def from_object(root, functions, options, progress):
    """The LoadedSignatures of a live object's signature functions (savedmodel/objects.py): what
    load gives for a SavedModel, with no vocabulary file to read test strings from."""
    aliases, dropped, pending = {}, {}, {}
    if objects_lib.has_root_functions(root):
        aliases, dropped, pending = root_functions.find(root, functions)
    input_specs = {k: freeze_lib.signature_inputs(f) for k, f in functions.items()}
    return parts.LoadedSignatures(root, functions, aliases, dropped, pending, [], input_specs,
                                  _given_inputs_checked(options, input_specs))


def freeze_signatures(loaded, metagraph, progress):
    """({first signature of each function: FrozenSignature}, Signatures): each signature frozen; one
    that is the same function as an earlier one (Keras 3's serve and serving_default) is frozen
    and folded once and shares the result. The frozen graphs are the passes' to take over."""
    owners = resources.resource_owners(loaded.loaded)
    written = freeze_lib.written_handles(loaded.functions.values())
    same_as, first_with = {}, {}  # signature fingerprint -> the first signature key that has it
    for key, function in loaded.functions.items():
        first = first_with.setdefault(freeze_lib.signature_fingerprint(function), key)
        if first != key:
            same_as[key] = first
            _log.info("signature %s is the same function as %s: folded once", key, first)
    distinct = list(first_with.values())
    # What more than one signature reads stays whole in the original (WeightStore.releases).
    shared = freeze_lib.shared_variables([loaded.functions[k] for k in distinct]) if metagraph.releases else None
    graphs, bounds, shapes = {}, {}, {}
    for key in distinct:
        with progress.phase("freeze %s" % key):
            frozen = freeze_lib.freeze(key, loaded.functions[key], owners, graph_lib.WeightStore(), written, shared,
                                       loaded.checkpoint)
            bounds[key] = verification_inputs.index_bounds(frozen.graph_def, frozen.inputs)
            shapes[key] = verification_inputs.input_shapes(frozen.graph_def, frozen.inputs)
        graphs[key] = frozen
    for key, first in same_as.items():
        bounds[key], shapes[key] = bounds[first], shapes[first]
    output_specs = {k: graphs[same_as.get(k, k)].outputs for k in loaded.functions}
    return graphs, parts.Signatures(same_as, resources.variables_of(owners, written), bounds, shapes, output_specs)


def make_test_inputs(loaded, signatures, verify_config):
    """The TestInputs every signature runs on."""
    arrays = verification_inputs.make_inputs(loaded.input_specs, verify_config, loaded.vocabulary, signatures.bounds,
                                         loaded.given, signatures.shapes)
    return parts.TestInputs(arrays, loaded.input_specs, signatures.bounds, signatures.shapes, loaded.given,
                            loaded.vocabulary)


def match_root_functions(loaded, test_inputs, verify_config, progress):
    """RootFunctions: those a signature wraps, and the pending traces that compute a signature's
    outputs on its test inputs (root_functions.match_by_value)."""
    if not loaded.pending_traces:
        return parts.RootFunctions({name: list(group) for name, group in loaded.aliases.items()},
                                   dict(loaded.dropped_functions))
    with progress.phase("match root functions"):
        return parts.RootFunctions(*root_function_checks.match_by_value(
            loaded.loaded, loaded.functions, loaded.pending_traces, loaded.aliases, loaded.dropped_functions,
            test_inputs.arrays, verify_config))


def run_original(loaded, graphs, signatures, roots, test_inputs, progress):
    """The Reference: the original's outputs on the test inputs, which verification compares the
    output with; computed before the passes, which may release its folded kernels."""
    with progress.phase("reference outputs"):
        references = original_references(loaded.loaded, loaded.functions, signatures, roots, test_inputs)
        deterministic = {k for k in loaded.functions if graph_lib.is_deterministic(graphs[signatures.first(k)].graph_def)}
        expected = verify_lib.expected_outputs(references, test_inputs.arrays, deterministic=deterministic)
        expected_roots = root_function_checks.expected_outputs(loaded.loaded, roots.aliases, test_inputs.arrays,
                                                               expected.seen, deterministic)
    return parts.Reference(expected, expected_roots, {key: keep_original(frozen) for key, frozen in graphs.items()})


def keep_original(frozen):
    """A copy of a frozen signature's graph as before the passes, its weights pinned in its store
    until the fold checks have computed each fold's original chain from them
    (verify/fold_check.py): the copy names them, it does not hold them."""
    frozen.weights.pin(frozen.graph_def)
    return graph_lib.copy_graph_def(frozen.graph_def)


def original_references(loaded, functions, signatures, roots, test_inputs):
    """{signature: what its outputs are compared with}. A signature found to be the same function
    as another (same graph, same variables) is checked against that one's original: its own copy
    would compute the same values and only cost a first call. A signature that only wraps a kept
    root function is compared with the original's root function (root_functions.references)."""
    wrapped = root_function_checks.references(loaded, roots.aliases, test_inputs.input_specs)
    references = {}
    for key in functions:
        reference_key = signatures.first(key)
        references[key] = wrapped.get(reference_key) or functions[reference_key]
    return references


def fold_signatures(graphs, signatures, metagraph, pipeline, progress):
    """FoldedSignatures: the passes run over each frozen graph, which they take over."""
    folded, precisions, reports = {}, {}, {}
    for key, signature in graphs.items():
        signature.weights.releases = metagraph.releases  # the original's outputs are known by now
        with progress.phase("passes %s" % key):
            graph_def, reports[key] = runner.fold_graph(
                signature.release_graph_def(), signature.output_tensors, pipeline, owns_input=True,
                context=PassContext(signature.weights), weights_out=True)
            precisions[key] = tolerance_lib.output_precisions(graph_def, signature.outputs)
        folded[key] = dataclasses.replace(signature, graph_def=graph_def)
    for key, first in signatures.same_as.items():
        reports[first].shared_by.append(key)
        folded[key] = dataclasses.replace(folded[first], key=key)
        reports[key] = dataclasses.replace(reports[first], same_as=first, shared_by=[])
        precisions[key] = precisions[first]
    return parts.FoldedSignatures(folded, precisions, {k: reports[k] for k in signatures.output_specs})
