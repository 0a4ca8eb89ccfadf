"""What every maepipe command shares: argparse errors and UserErrors as one line `maepipe: error:
...` with exit 2, and Ctrl-C / SIGTERM as exceptions (pipeline/signals.py) with their exit codes.

Used by `python -m pipeline` and by the tools beside the package (tracking server, benchmark)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from .errors import Terminated, UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        self.exit(2, f"maepipe: error: {message}\n")


def number(kind: type) -> Callable[[str], object]:
    """An argparse `type` whose error names the value and the kind expected."""

    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None

    return parse


def error(message: str) -> int:
    print(f"maepipe: error: {message}", file=sys.stderr)
    return 2


def guarded(body: Callable[[], int], on_stop: str | None = None) -> int:
    """Run `body` with Ctrl-C / SIGTERM turned into exceptions; a UserError is one line and exit 2.

    A stop exits 130 / 143 with one line, unless `on_stop` is given: a service the user stops on
    purpose (the tracking server) prints that line and exits 0."""
    from .signals import install

    install()
    try:
        return body()
    except UserError as e:
        return error(str(e))
    except KeyboardInterrupt as e:  # Terminated is one
        terminated = isinstance(e, Terminated)
        if on_stop is not None:
            print(f"maepipe: {on_stop}", file=sys.stderr)
            return 0
        print(f"maepipe: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
