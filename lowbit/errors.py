"""User-facing errors: one line that names the problem and the fix."""


class LowbitError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""
