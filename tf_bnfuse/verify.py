"""Proves a folded SavedModel computes what the original does, on every visible device.

Both models get the same seeded random inputs. An output passes when

    max |folded - original| <= atol + rtol * max |original|

with rtol/atol chosen by the output's dtype from the config. The bound is on
the whole tensor's scale, not element by element, so outputs that cross zero
do not need an absolute tolerance tuned per model.
"""

import dataclasses
from typing import List

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


def random_inputs(input_specs, rng, batch_size, unknown_dim_size):
    """Seeded random values for each signature input; unknown dims get small sizes."""
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


def verify(original, folded, input_specs, verify_config, devices=None):
    """Runs every signature of both models on every device and compares outputs.

    original, folded: dicts signature key -> callable(**inputs) -> dict of tensors.
    input_specs: signature key -> {input key: TensorSpecInfo}.
    """
    devices = devices or visible_devices()
    report = VerificationReport(devices=list(devices))
    rng = np.random.default_rng(verify_config.get("seed", 0))
    for key in sorted(original):
        inputs = random_inputs(input_specs[key], rng, verify_config.get("batch_size", 2),
                               verify_config.get("unknown_dim_size", 16))
        for device in devices:
            with tf.device(device):
                tensors = {k: tf.constant(v) for k, v in inputs.items()}
                expected = original[key](**tensors)
                actual = folded[key](**tensors)
            for output_key in sorted(expected):
                reference = expected[output_key]
                tol = tolerance_for(reference.dtype, verify_config)
                if output_key not in actual:
                    max_abs, max_rel, ok = float("inf"), float("inf"), False
                else:
                    max_abs, max_rel, ok = compare(reference.numpy(), actual[output_key].numpy(), tol)
                report.checks.append(OutputCheck(key, output_key, device, reference.dtype.name,
                                                 max_abs, max_rel, tol["rtol"], tol["atol"], ok))
    return report
