"""Errors a user can act on: the CLI prints them as one line and exits with status 2."""


class WorkbenchError(ValueError):
    """Bad input: the message names the problem and the fix."""


class Cancelled(RuntimeError):
    """A run was cancelled between layers."""
