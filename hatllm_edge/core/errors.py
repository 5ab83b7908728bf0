"""Typed errors; the CLI maps each to a one-line message and an exit code."""


class HatLLMError(Exception):
    """Base class: something went wrong that the user can act on (exit code 1)."""

    exit_code = 1


class InputError(HatLLMError, ValueError):
    """Bad input: a file, a field, a flag, a value (exit code 2). Also a ValueError, so that
    library callers may catch it as one."""

    exit_code = 2


class DataError(InputError):
    """An interactions or titles file is malformed; the message names file, line and field."""
