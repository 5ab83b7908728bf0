"""Typed errors; the CLI maps each to a one-line message and an exit code."""


class HatLLMError(Exception):
    """Base class: something went wrong that the user can act on (exit code 1)."""

    exit_code = 1


class InputError(HatLLMError):
    """Bad input: a file, a field, a flag (exit code 2)."""

    exit_code = 2


class DataError(InputError):
    """An interactions or titles file is malformed; the message names file, line and field."""
