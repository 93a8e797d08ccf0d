"""Proves a folded SavedModel computes what the original does, on every visible device.

Both models get the same seeded random inputs. An output passes when

    max |folded - original| <= atol + rtol * max |original|

with rtol/atol chosen by the output's dtype from the config. The bound is on
the whole tensor's scale, not element by element, so outputs that cross zero
do not need an absolute tolerance tuned per model.
"""

import dataclasses
import os
from typing import Dict, List

import numpy as np
import tensorflow as tf

from tf_bnfuse import errors


@dataclasses.dataclass
class OutputCheck:
    signature: str
    output: str
    device: str
    dtype: str
    max_abs_error: float
    max_rel_error: float  # max abs error / max |original|
    rtol: float
    atol: float
    ok: bool


@dataclasses.dataclass
class VerificationReport:
    devices: List[str]
    checks: List[OutputCheck] = dataclasses.field(default_factory=list)
    # "signature on device" -> why the ORIGINAL cannot run there (nothing to compare with)
    not_run: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self):
        return all(c.ok for c in self.checks)

    def failures(self):
        return [c for c in self.checks if not c.ok]

    def to_dict(self):
        return dataclasses.asdict(self)


def visible_devices():
    """Every logical CPU and GPU device TensorFlow can see, CPU first."""
    return [d.name for d in tf.config.list_logical_devices("CPU") + tf.config.list_logical_devices("GPU")]


# A word no vocabulary has, so that the out-of-vocabulary path runs too.
OUT_OF_VOCABULARY = "tf_bnfuse-out-of-vocabulary"
_MAX_VOCABULARY = 10000


def model_vocabulary(saved_model_dir):
    """Words the model knows: lines of its text assets (first tab-separated field), then the
    string constants of its graph and functions (a vocabulary given as a list, as Keras'
    StringLookup keeps it).

    Lookup tables are built from these; test strings drawn from them reach the
    table's real entries, not only its default value.
    """
    words = []
    assets = os.path.join(saved_model_dir, "assets")
    for root, _, files in os.walk(assets):
        for name in sorted(files):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    words.extend(w for w in (line.rstrip("\r\n").split("\t")[0] for line in f) if w)
            except (UnicodeDecodeError, OSError):
                continue  # a binary asset holds no words
    if not words:
        words = _string_constants(os.path.join(saved_model_dir, "saved_model.pb"))
    return words[:_MAX_VOCABULARY]


def _string_constants(pb_path):
    from tensorflow.core.protobuf import saved_model_pb2
    proto = saved_model_pb2.SavedModel()
    try:
        with open(pb_path, "rb") as f:
            proto.ParseFromString(f.read())
    except (OSError, ValueError):
        return []
    words = []
    for meta_graph in proto.meta_graphs:
        graph_def = meta_graph.graph_def
        nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
        for node in nodes:
            if node.op == "Const" and node.attr["dtype"].type == tf.string.as_datatype_enum:
                for value in node.attr["value"].tensor.string_val:
                    word = value.decode("utf-8", "replace")
                    # Paths and op names are strings too; a vocabulary entry is short and one line.
                    if word and len(word) < 64 and "/" not in word and "\n" not in word:
                        words.append(word)
    return list(dict.fromkeys(words))


def random_inputs(input_specs, rng, batch_size, unknown_dim_size, vocabulary=()):
    """Seeded random values for each signature input; unknown dims get small sizes.

    String inputs are words of `vocabulary` (and one unknown word), when there is one.
    """
    values = {}
    for key in sorted(input_specs):
        spec = input_specs[key]
        if spec.shape is None:
            raise errors.BadInputError(
                "input %s has unknown rank, so no test input can be made; use --skip_verify" % key)
        shape = [(batch_size if i == 0 else unknown_dim_size) if d is None else d
                 for i, d in enumerate(spec.shape)]
        dtype = spec.dtype
        if dtype.is_floating:
            value = rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
        elif dtype.is_integer:
            value = rng.integers(0, 8, size=shape).astype(dtype.as_numpy_dtype)
        elif dtype == tf.bool:
            value = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype == tf.string and vocabulary:
            words = np.array(list(vocabulary) + [OUT_OF_VOCABULARY], dtype=object)
            value = words[rng.integers(0, len(words), size=shape)].astype(bytes)
        elif dtype == tf.string:
            raise errors.BadInputError(
                "input %s is a string, and the SavedModel has no vocabulary (text asset or string "
                "constant) to draw test words from; use --skip_verify" % key)
        else:
            raise errors.BadInputError(
                "input %s has dtype %s, for which no test input can be made; use --skip_verify"
                % (key, dtype.name))
        values[key] = value
    return values


def compare(reference, candidate, tolerance):
    """(max abs error, max rel error, ok) of one output pair."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        return float("inf"), float("inf"), False
    if not np.issubdtype(reference.dtype, np.floating) and reference.dtype.name != "bfloat16":
        ok = bool(np.array_equal(reference, candidate))
        return (0.0, 0.0, ok) if ok else (float("inf"), float("inf"), False)
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    if reference.size == 0:
        return 0.0, 0.0, True
    if not np.array_equal(np.isfinite(reference), np.isfinite(candidate)):
        return float("inf"), float("inf"), False
    finite = np.isfinite(reference)
    max_abs = float(np.max(np.abs(reference - candidate)[finite], initial=0.0))
    scale = float(np.max(np.abs(reference[finite]), initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ok = max_abs <= tolerance["atol"] + tolerance["rtol"] * scale
    return max_abs, max_rel, ok


def tolerance_for(dtype, verify_config):
    table = verify_config.get("tolerance", {})
    return table.get(tf.as_dtype(dtype).name, table.get("float32", {"rtol": 1e-4, "atol": 1e-6}))


def _test_inputs(input_specs, verify_config, vocabulary):
    """signature key -> seeded test inputs, the same for every run with the same config."""
    rng = np.random.default_rng(verify_config.get("seed", 0))
    return {key: random_inputs(input_specs[key], rng, verify_config.get("batch_size", 2),
                               verify_config.get("unknown_dim_size", 16), vocabulary)
            for key in sorted(input_specs)}


def smoke_test(folded, input_specs, verify_config, vocabulary=()):
    """Calls each signature once on test inputs (--skip_verify: the output must at least run).

    Raises VerificationError naming the signature that fails.
    """
    for key, inputs in _test_inputs({k: input_specs[k] for k in folded}, verify_config, vocabulary).items():
        try:
            folded[key](**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise errors.VerificationError("the folded model cannot run: signature %s fails on test inputs: "
                                           "%s; nothing written" % (key, errors.most_specific_line(e)))


def verify(original, folded, input_specs, verify_config, devices=None, vocabulary=()):
    """Runs every signature of both models on every device and compares outputs.

    original, folded: dicts signature key -> callable(**inputs) -> dict of tensors.
    input_specs: signature key -> {input key: TensorSpecInfo}.
    """
    devices = devices or visible_devices()
    report = VerificationReport(devices=list(devices))
    all_inputs = _test_inputs({k: input_specs[k] for k in original}, verify_config, vocabulary)
    for key in sorted(original):
        inputs = all_inputs[key]
        for device in devices:
            with tf.device(device):
                tensors = {k: tf.constant(v) for k, v in inputs.items()}
                try:
                    expected = original[key](**tensors)
                except tf.errors.OpError as e:
                    # A TF1 lookup table is initialized on the device the model was loaded
                    # on only; the original cannot run elsewhere, so there is nothing to prove.
                    report.not_run["%s on %s" % (key, device)] = errors.most_specific_line(e)
                    continue
                try:
                    actual = folded[key](**tensors)
                except tf.errors.OpError as e:
                    raise errors.VerificationError(
                        "verification failed: the folded signature %s fails on %s where the original runs: "
                        "%s; nothing written" % (key, device, errors.most_specific_line(e)))
            for output_key in sorted(expected):
                reference = expected[output_key]
                tol = tolerance_for(reference.dtype, verify_config)
                if output_key not in actual:
                    max_abs, max_rel, ok = float("inf"), float("inf"), False
                else:
                    max_abs, max_rel, ok = compare(reference.numpy(), actual[output_key].numpy(), tol)
                report.checks.append(OutputCheck(key, output_key, device, reference.dtype.name,
                                                 max_abs, max_rel, tol["rtol"], tol["atol"], ok))
        if not any(c.signature == key for c in report.checks):
            raise errors.BadInputError(
                "the original signature %s fails on its test inputs on every device: %s; use --skip_verify"
                % (key, report.not_run["%s on %s" % (key, devices[0])]))
    return report
