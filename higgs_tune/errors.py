"""Errors in the user's files (data, codes, checkpoint, tokenizer), reported as one line.

The data, checkpoint and tokenizer code raise a subclass of :class:`UserInputError` whose message names
the file (and line) and what is wrong with it. The recipe's entry point runs under
:func:`report_user_errors`, which turns such an error into ``tune: error: <message>`` on stderr and exit
status 2, the way ``tune`` reports config errors, instead of a traceback. ``tune run --verbose`` (or
``HIGGS_TUNE_TRACEBACK=1``) shows the traceback. The subclasses are also the built-in exception they
used to be (``FileNotFoundError``, ``ValueError``, ``KeyError``), so ``except ValueError`` still catches
them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

TRACEBACK_ENV = "HIGGS_TUNE_TRACEBACK"

T = TypeVar("T")


class UserInputError(Exception):
    """A problem with a file or folder the user named; the message says which and what is wrong."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class InvalidInputError(UserInputError, ValueError):
    """A file the user named exists but cannot be used (malformed, mismatched, out of range)."""


def tracebacks_requested() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def report_user_errors(main: Callable[[], T]) -> T | int:
    """Run ``main()``; a :class:`UserInputError` becomes ``tune: error: <message>`` and exit status 2
    (returned), unless tracebacks are requested (``HIGGS_TUNE_TRACEBACK=1``), then it propagates."""
    try:
        return main()
    except UserInputError as error:
        if tracebacks_requested():
            raise
        print(f"tune: error: {error}", file=sys.stderr)
        return 2
