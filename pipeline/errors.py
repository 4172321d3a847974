"""One error hierarchy. Every error the CLI reports as one line derives from `DpsisaError` and
carries its exit code: `UserError` (the user's to fix; nothing was changed; exit 3) or
`RecoverableError` (work failed but stays recorded, e.g. a request stays pending in the ledger
after a shard actor died for good; exit 4). Anything else is a bug and keeps its traceback.

This module imports nothing from the package, so every module can derive its errors from it.
"""
from __future__ import annotations


class DpsisaError(Exception):
    exit_code = 1


class UserError(DpsisaError):
    """The user's to fix: a one-line message with the cause and the fix; nothing was changed."""

    exit_code = 3


class RecoverableError(DpsisaError):
    """Work failed and stays recorded: rerunning the command (or `dpsisa status`) completes it."""

    exit_code = 4
    hint = ("Pending work is recorded in the ledger; rerun `dpsisa status --run-dir DIR` (or the same command) to "
            "complete it.")  # what the CLI adds after the message; a subclass says what fits it
    # The longest a writer that retries this error waits between tries (None: its usual backoff, up to
    # 30 s). A subclass whose retry is a cheap probe sets it low, so work resumes soon after a recovery.
    retry_cap_s: float | None = None
