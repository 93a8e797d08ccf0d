"""Errors that end a run with a one-line message and a documented exit code."""

import contextlib
import re

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


# A message names an option as "{--flag}": one message, shown in the terms of whoever called.
# The CLI shows the flag; a Python call the parameter of the function the caller called.
_OPTION = re.compile(r"\{--([a-z_0-9]+)\}")
_PYTHON_NAMES = {
    "fold_saved_model": {"overwrite": "overwrite=True", "skip_verify": "verify=False",
                         "drop_other_metagraphs": "drop_other_metagraphs=True"},
    "export": {"overwrite": "overwrite=True", "skip_verify": "verify=False", "signature_keys": "signatures",
               "tflite_output": "path", "tflite_quantize": "quantize", "tflite_io": "io",
               "calibration_inputs": "calibration", "tflite_max_error": "max_error"},
    "fold": {"skip_verify": "verify=False", "signature_keys": "signatures"},
}
CLI = "cli"


def in_terms_of(message, caller):
    """message with each "{--flag}" as `caller` ("cli", or the API function called) names it."""
    if caller == CLI:
        return _OPTION.sub(lambda m: "--" + m.group(1), message)
    names = _PYTHON_NAMES.get(caller, _PYTHON_NAMES["fold_saved_model"])
    return _OPTION.sub(lambda m: names.get(m.group(1), m.group(1)), message)


class BnFuseError(Exception):
    exit_code = EXIT_INTERNAL
    caller = "fold_saved_model"  # whose terms str() speaks in (in_terms_of); set by speaking_to

    def __str__(self):
        return in_terms_of(super().__str__(), self.caller)


@contextlib.contextmanager
def speaking_to(caller):
    """Within, a BnFuseError raised is told who called (the outermost caller's terms)."""
    try:
        yield
    except BnFuseError as e:
        e.caller = caller
        raise


class BadInputError(BnFuseError, ValueError):
    """The SavedModel, a flag, an argument or the config cannot be used as given (a ValueError
    too, as Python callers expect of a bad argument)."""
    exit_code = EXIT_BAD_INPUT


class VerificationError(BnFuseError):
    """The folded model does not compute what the original does."""
    exit_code = EXIT_VERIFICATION_FAILED


def first_line(exc):
    """The first line of an exception's text (its type's name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# Lines of a TensorFlow error that say where, not what.
_CONTEXT_PREFIXES = ("Graph execution error", "Detected at node", "Detected unsupported operations",
                     "File \"", "Traceback", "Stack trace", "[[", "Function call stack", "{{function_node")


def most_specific_line(exc):
    """The line of an exception's text that says what went wrong.

    TensorFlow puts "Graph execution error:" and a Python traceback of where
    the op was built first, and the cause ("indices[0,0] = 6 is not in
    [0, 4)") after them; a one-line error must keep the cause.
    """
    lines = [line.strip() for line in str(exc).splitlines()]
    causes = [line for line in lines if line and not line.startswith(_CONTEXT_PREFIXES)]
    if not causes:
        return type(exc).__name__
    # The cause line ends with "[[{{node ...}}]] [Op:...]" context in some TF versions.
    cause = causes[-1].split("\t [[")[0].split(" [[")[0]
    return re.sub(r"\s*\[Op:[^\]]*\]( name: \S*)?$", "", cause).strip() or type(exc).__name__
