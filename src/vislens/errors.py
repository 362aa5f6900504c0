"""The one error type the CLI turns into a single line: what went wrong, what to do."""


class VislensError(Exception):
    """Bad input a user can fix; the message names the fix."""
