"""Errors that end a run with a one-line message and a documented exit code."""

import re

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class BnFuseError(Exception):
    exit_code = EXIT_INTERNAL


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
