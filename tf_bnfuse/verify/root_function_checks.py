"""The checks of the root functions the output keeps (savedmodel/root_functions.py).

A trace no signature calls is kept when, on the signature's test inputs, it computes the
signature's outputs (match_by_value); every kept function of the written output is called
and compared with the original's before anything is moved into place (check).
"""

import logging

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors
from tf_bnfuse.savedmodel import root_functions
from tf_bnfuse.verify import execution
from tf_bnfuse.verify import tolerance as tolerance_lib

_log = logging.getLogger(__name__)


def match_by_value(loaded, signatures, pending, aliases, dropped, inputs, verify_config):
    """Keeps a pending trace that computes what a signature computes, by value.

    For each signature whose inputs the trace's tensor arguments are (by name,
    or the one input of each), both run on the signature's test inputs; each of
    the trace's outputs must equal one signature output within that output's
    tolerance. The trace then calls that signature in the output, like a
    wrapped one; check() compares it with the original again after writing.
    Returns new (aliases, dropped): those given with the traces kept and the ones not kept
    added; the arguments are left as they are.
    """
    aliases = {name: list(group) for name, group in aliases.items()}
    dropped = dict(dropped)
    for name, traces in sorted(pending.items()):
        parameters = root_functions.parameters_of(getattr(loaded, name))
        for concrete in traces:
            alias = None
            for key, signature in sorted(signatures.items()):
                alias = _alias_by_value(loaded, name, concrete, key, signature, inputs[key], verify_config)
                if alias is not None:
                    break
            if alias is None:
                root_functions.not_kept(dropped, name, concrete, "no folded signature computes it")
                continue
            alias.parameters = parameters
            aliases.setdefault(name, []).append(alias)
    return aliases, dropped


def _alias_by_value(loaded, name, concrete, key, signature, feeds, verify_config):
    specs = [s for s in tf.nest.flatten(concrete.structured_input_signature) if isinstance(s, tf.TensorSpec)]
    signature_specs = signature.structured_input_signature[1]
    if all(s.name in signature_specs for s in specs):
        arg_keys = [s.name for s in specs]
    elif len(specs) == len(signature_specs) == 1:
        arg_keys = list(signature_specs)
    else:
        return None
    if sorted(set(arg_keys)) != sorted(signature_specs) or len(set(arg_keys)) != len(arg_keys):
        return None
    if any(s.dtype != signature_specs[k].dtype or not s.shape.is_compatible_with(signature_specs[k].shape)
           for s, k in zip(specs, arg_keys)):
        return None
    tensors = {k: tf.constant(v) for k, v in feeds.items()}
    probe = root_functions.RootAlias(name, concrete.structured_input_signature, key, arg_keys, [],
                                     concrete.structured_outputs, {})

    def output_keys_by_value():
        flat = [np.asarray(v) for v in root_functions.call_tensors(getattr(loaded, name), probe, tensors)]
        expected = {k: np.asarray(v) for k, v in signature(**tensors).items()}
        return _matching_outputs(flat, expected, verify_config)
    try:
        # Grappler can compute two graphs of one model differently (a TensorFlow bug,
        # compare.py); as written, both compute what the model says.
        output_keys, _ = execution.unless_accepted_as_written(output_keys_by_value(), output_keys_by_value,
                                                               lambda keys: keys is not None)
    except (tf.errors.OpError, ValueError, TypeError):
        return None
    if output_keys is None:
        return None
    ports = {k: i for i, k in reversed(list(enumerate(output_keys)))}
    return root_functions.RootAlias(name, concrete.structured_input_signature, key, arg_keys, output_keys,
                     concrete.structured_outputs, ports, by_value=True)


def _matching_outputs(flat, expected, verify_config):
    """For each value of flat, the key of an expected output it equals within tolerance; None if
    one has none."""
    output_keys = []
    for value in flat:
        match = None
        for output_key, reference in sorted(expected.items()):
            if reference.dtype != value.dtype or reference.shape != value.shape:
                continue
            tolerance, _ = tolerance_lib.tolerance_for(tf.as_dtype(reference.dtype), verify_config or {})
            if tolerance_lib.compare(reference, value, tolerance)[2]:
                match = output_key
                break
        if match is None:
            return None
        output_keys.append(match)
    return output_keys


def references(original, aliases, input_specs):
    """{signature key: callable(**inputs) -> {output: tensor}} that runs the original's root
    function a signature wraps, for the signatures whose every input it takes.

    Verification then compares each such signature with the root function (what the
    signature computes, by its graph), so the original's function is made ready to run once,
    for the signature and for check() (a first call costs a third of a second on MobileNetV2).
    input_specs: {signature key: {input key: ...}}, the signatures verified.
    """
    found = {}
    for name, group in sorted(aliases.items()):
        for alias in group:
            if alias.signature not in found and alias.signature in input_specs and _stands_in(
                    alias, input_specs[alias.signature]):
                found[alias.signature] = _reference(getattr(original, name), alias)
    return found


def _stands_in(alias, signature_inputs):
    """Whether the original's root function of `alias` is called for its signature's reference
    (references): it runs what the signature runs (not matched by value: a by-value alias is
    checked against the original) and takes every one of its inputs."""
    return not alias.by_value and sorted(set(alias.arg_keys)) == sorted(signature_inputs)


def _reference(function, alias):
    def call(**feeds):
        flat = root_functions.call_tensors(function, alias, feeds)
        return {k: flat[port] for k, port in alias.output_ports.items()}
    return call


def _call_flat(function, alias, feeds):
    """Calls a root function with a signature's test inputs in its own positional structure."""
    return [np.asarray(v) for v in root_functions.call_tensors(function, alias, feeds)]


def expected_outputs(original, aliases, inputs, seen, deterministic=()):
    """{(root function name, trace index): the original's flat outputs of each call} of every kept
    root function, called as check() compares them, before the passes run (which may release the
    original's folded kernels). seen: compare.Expected.seen. A trace that stands in for its
    signature's reference (references), where the signature has no state (deterministic, as for
    compare.expected_outputs) is not called again: that reference was its call, on the same
    inputs, and its outputs by port are the trace's (on a model whose signature wraps its
    `serve`, a forward pass less). A trace running a signature whose outputs repeat is called
    once, the others twice."""
    expected = {}
    for name, group in sorted(aliases.items()):
        for i, alias in enumerate(group):
            if alias.signature in deterministic and alias.signature in seen and _stands_in(
                    alias, inputs[alias.signature]):
                by_port = {port: seen[alias.signature][k] for k, port in alias.output_ports.items()}
                expected[(name, i)] = [[by_port[port] for port in range(len(by_port))]]
                continue
            feeds = {k: tf.constant(v) for k, v in inputs[alias.signature].items()}
            calls = 1 if not alias.by_value and alias.signature in seen else 2
            expected[(name, i)] = [_call_flat(getattr(original, name), alias, feeds) for _ in range(calls)]
    return expected


def check(expected, reloaded, aliases, inputs, verify_config=None, precisions=None, original_again=None,
          accepted=None):
    """Calls each kept root function of the reloaded output on its signature's test inputs, but
    one that, by its graph, runs what its signature runs (root_functions.runs_signature): the
    signature was called and compared already, and the original's function is its signature's
    (not by value), so a call would only run the same function again.

    With verify_config (verification on), compares each output with the
    original's (expected_outputs), at the tolerance its signature output has. An
    output that changes between the original's two calls is compared only where
    the output reproduces both calls (a counter), not where it is random. Where
    they differ, the original (original_again(), the loaded model) runs again as
    written (compare.py). Without verify_config, the call must only succeed.
    accepted: {signature: {output: the max abs error its check accepted}} where the models' own
    spread set it (compare.spread_bounds): a root function's output computing it is held to that.
    Raises VerificationError.
    """
    for name, group in sorted(aliases.items()):
        for i, alias in enumerate(group):
            if not alias.by_value and root_functions.runs_signature(getattr(reloaded, name), alias,
                                                                    reloaded.signatures[alias.signature]):
                # Its signature ran (and was compared) already: a call would run the same function again.
                _log.info("%s%s runs signature %s's function, by its graph: not called again", name,
                          root_functions.describe(alias.input_signature), alias.signature)
                continue
            feeds = {k: tf.constant(v) for k, v in inputs[alias.signature].items()}
            described = name + root_functions.describe(alias.input_signature)

            def call_reloaded():
                try:
                    return _call_flat(getattr(reloaded, name), alias, feeds)
                except (tf.errors.OpError, ValueError, TypeError) as e:
                    raise errors.VerificationError("the folded model cannot run: %s fails on test inputs: %s; "
                                                   "nothing written" % (described, errors.most_specific_line(e)))

            if verify_config is None:
                call_reloaded()
                continue
            first = expected[(name, i)]
            actual = [call_reloaded() for _ in first]
            own_error = (accepted or {}).get(alias.signature, {})
            mismatch = _first_mismatch([(first[0], actual[0]), (first[-1], actual[-1])], alias, verify_config,
                                       precisions, own_error)

            def mismatch_with_original_again():
                original = getattr(original_again(), name)
                calls = [(_call_flat(original, alias, feeds), call_reloaded()) for _ in range(2)]
                return _first_mismatch(calls, alias, verify_config, precisions, own_error)
            if original_again is not None:
                mismatch, _ = execution.unless_accepted_as_written(
                    mismatch, mismatch_with_original_again, lambda found: found is None)
            if mismatch is not None:
                raise errors.VerificationError(
                    "verification failed: %s output %d differs from the input's (max abs error %.3g); "
                    "nothing written" % ((described,) + mismatch))


def _first_mismatch(calls, alias, verify_config, precisions, accepted):
    """(output index, max abs error) of the first output outside its tolerance of the original's
    (or the error its signature output's check accepted, {output: max abs}), or None. calls: [(original's outputs, output's outputs)] of two calls in turn; an output the
    original gives otherwise on its second call is compared only if both calls match."""
    (first, actual), (second, again) = calls
    for i, expected in enumerate(first):
        precision = (precisions or {}).get(alias.signature, {}).get(alias.output_keys[i])
        tolerance, _ = tolerance_lib.tolerance_for(expected.dtype, verify_config, precision)
        max_abs, _, ok = tolerance_lib.compare(expected, actual[i], tolerance)
        if not ok and alias.output_keys[i] in accepted:
            ok = bool(max_abs <= accepted[alias.output_keys[i]])
        if np.array_equal(expected, second[i]):
            if not ok:
                return i, max_abs
        elif ok and not tolerance_lib.compare(second[i], again[i], tolerance)[2]:
            return i, tolerance_lib.compare(second[i], again[i], tolerance)[0]
        # otherwise random: the first call already differs, and the original differs from itself
    return None
