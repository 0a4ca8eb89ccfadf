"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """Printed as one line by the CLI (no traceback), exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, torchrun stopping its workers): unwind like Ctrl-C, so
    atomic writes are abandoned, the MLflow run is ended as KILLED and the exit code says why."""
