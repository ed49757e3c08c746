"""Row formats the stages accept, checked row by row with the file and line of the first bad one.

SFT:        {"messages": [{"role", "content"}, ...]}  |  {"prompt", "completion"}  |  {"text"}
preference: {"prompt", "chosen", "rejected"[, "margin"]}  (strings, or TRL conversational message lists)
prompts:    {"prompt": str}  |  {"messages": [...]}  (the conversation so far)
"""

from __future__ import annotations

from alignkit.data.io import where
from alignkit.errors import UserError

ROLES = {"system", "user", "assistant", "tool"}


def _check_messages(messages, source, row, key="messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where(source, row)}: column {key!r} must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where(source, row)}: each message in {key!r} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where(source, row)}: unknown role {m['role']!r} in {key!r}; one of {sorted(ROLES)}")


def _is_text_or_messages(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) for m in value))


def sft_format(rows: list[dict], source) -> str:
    """'messages', 'prompt_completion' or 'text' — the one format all rows share."""
    if not rows:
        raise UserError(f"{source}: the dataset is empty")
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
                if not _is_text_or_messages(row[key]):
                    raise UserError(f"{where(source, row)}: column {key!r} must be text or a list of messages")
        elif "text" not in row or not isinstance(row["text"], str):
            raise UserError(f"{where(source, row)}: missing text column 'text'")
    return fmt


def check_preference_rows(rows: list[dict], source) -> None:
    if not rows:
        raise UserError(f"{source}: the preference dataset is empty")
    for row in rows:
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                has = ", ".join(k for k in row if k != "_line")
                raise UserError(f"{where(source, row)}: missing column {key!r} (has: {has})")
            if not _is_text_or_messages(row[key]):
                raise UserError(f"{where(source, row)}: column {key!r} must be text or a list of messages")
        if "margin" in row and not isinstance(row["margin"], (int, float)):
            raise UserError(f"{where(source, row)}: column 'margin' must be a number")


def check_prompt_rows(rows: list[dict], source) -> None:
    if not rows:
        raise UserError(f"{source}: the prompt dataset is empty")
    for row in rows:
        if "prompt" in row:
            if not _is_text_or_messages(row["prompt"]):
                raise UserError(f"{where(source, row)}: column 'prompt' must be text or a list of messages")
        elif "messages" in row:
            _check_messages(row["messages"], source, row)
        else:
            has = ", ".join(k for k in row if k != "_line")
            raise UserError(f"{where(source, row)}: missing column 'prompt' (or 'messages'); has: {has}")


def prompt_of(row: dict):
    """The prompt of a prompt row: text, or the message list."""
    return row["prompt"] if "prompt" in row else row["messages"]
