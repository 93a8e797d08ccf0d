"""Errors that end a run with a one-line message and a documented exit code."""

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


class BnFuseError(Exception):
    exit_code = EXIT_INTERNAL


class BadInputError(BnFuseError):
    """The SavedModel, a flag or the config cannot be used as given."""
    exit_code = EXIT_BAD_INPUT


class VerificationError(BnFuseError):
    """The folded model does not compute what the original does."""
    exit_code = EXIT_VERIFICATION_FAILED
