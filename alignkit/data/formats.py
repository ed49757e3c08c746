"""Row formats the stages accept, checked row by row with the file and line of the first bad one.

SFT:        {"messages": [{"role", "content"}, ...]}  |  {"prompt", "completion"}  |  {"text"}
preference: {"prompt", "chosen", "rejected"[, "margin"]}  (strings, or TRL conversational message lists)
prompts:    {"prompt": str}  |  {"messages": [...]}  (the conversation so far)
"""

from __future__ import annotations

import json
import math

from alignkit.data.io import where
from alignkit.errors import UserError

ROLES = {"system", "user", "assistant", "tool"}


def _shown(value) -> str:
    """A JSON value as the user wrote it (null, 5, [..]), cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_rows_are_objects(rows: list, source) -> None:
    # A .json file or dataset may hold a list of anything; every check below indexes rows by column.
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{source}: row {i} is {type(row).__name__}, expected an object with named columns")


def _check_messages(messages, source, row, key="messages", *, allow_empty=False) -> None:
    """A list of {role, content} messages with text content; chat templates fail mid-training on anything else."""
    if not isinstance(messages, list) or (not messages and not allow_empty):
        raise UserError(f"{where(source, row)}: column {key!r} must be a non-empty list of messages")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise UserError(f"{where(source, row)}: message {i} in {key!r} is {_shown(m)}, expected an object with 'role' and 'content'")
        missing = [repr(k) for k in ("role", "content") if k not in m]
        if missing:
            raise UserError(f"{where(source, row)}: message {i} in {key!r} has no {' or '.join(missing)}")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise UserError(f"{where(source, row)}: message {i} in {key!r} has unknown role {_shown(m['role'])}; one of {', '.join(sorted(ROLES))}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where(source, row)}: message {i} in {key!r} has content {_shown(m['content'])}; expected text "
                            f"(content parts and tool calls are not supported)")


def _check_text_or_messages(row: dict, key: str, source) -> None:
    value = row[key]
    if isinstance(value, list):
        _check_messages(value, source, row, key, allow_empty=True)  # an empty list is dropped as empty later
    elif not isinstance(value, str):
        raise UserError(f"{where(source, row)}: column {key!r} is {_shown(value)}; expected text or a list of messages")


def sft_format(rows: list[dict], source) -> str:
    """'messages', 'prompt_completion' or 'text' — the one format all rows share."""
    if not rows:
        raise UserError(f"{source}: the dataset is empty")
    _check_rows_are_objects(rows, source)
    first = rows[0]
    fmt = "messages" if "messages" in first else "prompt_completion" if "prompt" in first and "completion" in first else "text" if "text" in first else None
    if fmt is None:
        raise UserError(f"{where(source, first)}: SFT rows need a 'messages' column, 'prompt' + 'completion', or 'text' (has: {', '.join(k for k in first if k != '_line')})")
    for row in rows:
        if fmt == "messages":
            if "messages" not in row:
                raise UserError(f"{where(source, row)}: missing column 'messages'")
            _check_messages(row["messages"], source, row)
            if not any(m["role"] == "assistant" for m in row["messages"]):
                raise UserError(f"{where(source, row)}: a conversation with no assistant message has nothing to learn")
        elif fmt == "prompt_completion":
            for key in ("prompt", "completion"):
                if key not in row:
                    raise UserError(f"{where(source, row)}: missing column {key!r}")
                _check_text_or_messages(row, key, source)
        elif "text" not in row:
            raise UserError(f"{where(source, row)}: missing text column 'text'")
        elif not isinstance(row["text"], str):
            raise UserError(f"{where(source, row)}: column 'text' is {_shown(row['text'])}; expected text")
    return fmt


def check_preference_rows(rows: list[dict], source) -> None:
    if not rows:
        raise UserError(f"{source}: the preference dataset is empty")
    _check_rows_are_objects(rows, source)
    # The loader keeps a margin column when the first row has one; a row without it would reach the trainer as None.
    has_margin = "margin" in rows[0]
    for row in rows:
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                has = ", ".join(k for k in row if k != "_line")
                raise UserError(f"{where(source, row)}: missing column {key!r} (has: {has})")
            _check_text_or_messages(row, key, source)
        if ("margin" in row) != has_margin:
            raise UserError(f"{where(source, row)}: column 'margin' must be in every row or in none")
        if has_margin and (isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float))
                           or not math.isfinite(row["margin"])):
            raise UserError(f"{where(source, row)}: column 'margin' is {_shown(row['margin'])}; expected a finite number")


def check_prompt_rows(rows: list[dict], source) -> None:
    if not rows:
        raise UserError(f"{source}: the prompt dataset is empty")
    _check_rows_are_objects(rows, source)
    for row in rows:
        if "prompt" in row:
            _check_text_or_messages(row, "prompt", source)
        elif "messages" in row:
            _check_messages(row["messages"], source, row)
        else:
            has = ", ".join(k for k in row if k != "_line")
            raise UserError(f"{where(source, row)}: missing column 'prompt' (or 'messages'); has: {has}")


def prompt_of(row: dict):
    """The prompt of a prompt row: text, or the message list."""
    return row["prompt"] if "prompt" in row else row["messages"]
