"""The pass pipeline and verification settings, read from a JSON file.

Everything here but check_pass_options runs without TensorFlow, so that a bad
config is refused before TensorFlow is imported.
"""

import copy
import importlib.resources
import json
import os

from tf_bnfuse import errors
from tf_bnfuse import passes as passes_lib

_SOURCE_TREE_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "configs", "default.json")
KNOWN_KEYS = {"pipeline", "verify"}
# verify key -> (type, minimum) of its value
_VERIFY_INTEGERS = {"seed": 0, "batch_size": 1, "unknown_dim_size": 1}
# verify key -> its default: the multiples of a rounding that the verification's bounds allow
# (verify/fold_check.py, verify/compare.py)
VERIFY_MULTIPLES = {"fold_rounding_multiple": 8.0, "half_rounding_multiple": 4.0, "slope_multiple": 0.5,
                    "slope_significance": 10.0,
                    "spread_multiple": 8.0}
# verify key -> its default: switches
VERIFY_SWITCHES = {"accept_unchecked_folds": False}  # a fold not checked by itself fails the run unless true
# verify key -> its default: the bytes of the original's weights one probe of the fold checks
# reads back at a time (verify/fold_check.py; a chain that reads more is checked alone). Small,
# so that a small model's checks do not read its whole weights back at once (which put ResNet50's
# peak RSS above a plain load + save's); more groups cost no measurable time.
VERIFY_BYTES = {"fold_check_batch_bytes": 1 << 23}
KNOWN_VERIFY_KEYS = (set(_VERIFY_INTEGERS) | set(VERIFY_MULTIPLES) | set(VERIFY_SWITCHES) | set(VERIFY_BYTES)
                     | {"tolerance", "tflite_tolerance"})


def check_pass_options(config, source="config"):
    """Each pipeline entry's options against its pass's run() (imports the passes, and so TF)."""
    for name, options in passes_lib.pass_entries(config["pipeline"]):
        accepted = passes_lib.option_names(name)
        unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
        if unknown:
            raise errors.BadInputError("%s: pass %s takes no option %s; it takes %s" % (
                source, name, ", ".join(unknown), ", ".join(accepted) or "none"))


def default_config_path():
    """configs/default.json of a source checkout, else the copy installed with the package."""
    if os.path.isfile(_SOURCE_TREE_DEFAULT):
        return _SOURCE_TREE_DEFAULT
    return str(importlib.resources.files("tf_bnfuse.configs").joinpath("default.json"))


def load_config(path=None):
    """Reads and checks a config file; raises BadInputError naming the file."""
    path = path or default_config_path()
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise errors.BadInputError("cannot read config %s: %s" % (path, e.strerror or e))
    except json.JSONDecodeError as e:
        raise errors.BadInputError("config %s is not valid JSON: %s" % (path, e))
    return validate_config(config, path)


def validate_config(config, source="config"):
    if not isinstance(config, dict):
        raise errors.BadInputError("%s: the top level must be a JSON object" % source)
    unknown = set(config) - KNOWN_KEYS
    if unknown:
        raise errors.BadInputError("%s: unknown keys %s" % (source, sorted(unknown)))
    if not isinstance(config.get("pipeline"), list):
        raise errors.BadInputError("%s: \"pipeline\" must be a list of pass names" % source)
    try:
        passes_lib.pass_entries(config["pipeline"])
    except errors.BadInputError as e:
        raise errors.BadInputError("%s: %s" % (source, e))
    verify = config.get("verify", {})
    if not isinstance(verify, dict) or set(verify) - KNOWN_VERIFY_KEYS:
        raise errors.BadInputError("%s: \"verify\" takes only %s" % (source, sorted(KNOWN_VERIFY_KEYS)))
    for key, minimum in list(_VERIFY_INTEGERS.items()) + [(key, 1) for key in VERIFY_BYTES]:
        value = verify.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise errors.BadInputError("%s: verify.%s must be a whole number >= %d, not %s" % (
                source, key, minimum, json.dumps(value)))
    for key, default in VERIFY_MULTIPLES.items():
        value = verify.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise errors.BadInputError("%s: verify.%s must be a number > 0, not %s" % (source, key, json.dumps(value)))
    for key, default in VERIFY_SWITCHES.items():
        if not isinstance(verify.get(key, default), bool):
            raise errors.BadInputError("%s: verify.%s must be true or false, not %s" % (
                source, key, json.dumps(verify[key])))
    tolerances = dict(verify.get("tolerance", {}))
    if "tflite_tolerance" in verify:
        tolerances["tflite_tolerance"] = verify["tflite_tolerance"]
    for dtype, tol in tolerances.items():
        if not (isinstance(tol, dict) and set(tol) == {"rtol", "atol"}
                and all(isinstance(v, (int, float)) and v >= 0 for v in tol.values())):
            raise errors.BadInputError("%s: tolerance for %s must be {\"rtol\": x, \"atol\": y}"
                                       % (source, dtype))
    config = copy.deepcopy(config)
    # What the verification reads without a default of its own: the multiples, switches and sizes.
    config["verify"] = {**VERIFY_MULTIPLES, **VERIFY_SWITCHES, **VERIFY_BYTES, **config.get("verify", {})}
    return config
