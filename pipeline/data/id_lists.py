"""Id lists as people type them (`--ids 12,907`, `--subject a,b`, one per line in a file): parsed
strictly, so an id lost by a script (an empty item) is an error and nothing is requested."""
from __future__ import annotations

from pipeline.errors import UserError


class ForgetRequestError(UserError, ValueError):
    """The ids of a forget request are invalid; nothing was changed."""


def split_items(text: str, where: str, error: type[Exception], lost: str, if_empty: str, if_gap: str) -> list[str]:
    """Items separated by commas and newlines, stripped; one final newline is fine. An empty input or
    an empty item raises `error` naming where it is (`lost` says what a gap means, e.g. "a lost id")."""
    body = text.rstrip(" \t\r")
    body = body[:-1] if body.endswith("\n") else body  # one final newline ends a file; a blank line after it does not
    if not body.strip():
        raise error(f"{where} is empty (an unset shell variable?); nothing was requested: {if_empty}")
    lines = body.split("\n")
    shown = "" if len(lines) > 1 or len(body) > 60 else f" '{body}'"
    result, position = [], 0
    for number, line in enumerate(lines, 1):
        items = line.split(",")
        for column, token in enumerate(items, 1):
            position += 1
            token = token.strip()
            if not token:
                if len(lines) == 1:
                    at = f"an empty item at position {position}"
                elif len(items) == 1:
                    at = f"a blank line at line {number}"
                else:
                    at = f"an empty item at line {number}, position {column}"
                raise error(f"{where}{shown} has {at} ({lost}, e.g. an unset shell variable?); nothing was requested: {if_gap}")
            result.append(token)
    return result


def parse_ids(text: str, source: str | None = None) -> list[int]:
    """'12,907, 40311' or one id per line → [12, 907, 40311]; anything else is an error, nothing requested.

    Items are separated by commas and newlines; spaces around an id are fine, and so is one final
    newline (how files end). An empty item — '2,,4', a leading or trailing comma, a blank line —
    is an error, not something to skip: it is how an id lost by a script (an unset shell variable)
    shows. `source` names the input in messages, e.g. "--ids" or "--ids-file FILE".
    """
    ids = []
    for token in split_items(text, source or "the id list", ForgetRequestError, "a lost id",
                             "pass ids like --ids 12,907,40311 or --ids-file FILE.",
                             "pass only ids, e.g. --ids 12,907,40311 or one id per line."):
        try:
            ids.append(int(token))
        except ValueError:
            raise ForgetRequestError(f"sample id '{token}' is not an integer; pass ids like --ids 12,907,40311.") from None
    return ids
