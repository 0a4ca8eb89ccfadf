"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """Printed as one line by the CLI (no traceback), exit code 2."""
