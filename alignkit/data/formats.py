"""Row formats the stages accept, checked row by row with the file and line of the first bad one.

SFT:        {"messages": [{"role", "content"}, ...]}  |  {"prompt", "completion"}  |  {"text"}
preference: {"prompt", "chosen", "rejected"[, "margin"]}  (strings, or TRL conversational message lists);
            without "prompt" (HH-RLHF), chosen and rejected are whole conversations sharing it
unpaired:   {"prompt", "completion", "label": bool}  (KTO; preference pairs become two such rows)
prompts:    {"prompt": str}  |  {"messages": [...]}  (the conversation so far)
"""

from __future__ import annotations

import json
import math
import os

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
        # Without a prompt column, chosen and rejected carry it (consistent_pairs splits it off).
        for key in ("prompt", "chosen", "rejected") if "prompt" in row or "chosen" not in row else ("chosen", "rejected"):
            if key not in row:
                has = ", ".join(k for k in row if k != "_line")
                raise UserError(f"{where(source, row)}: missing column {key!r} (has: {has})")
            _check_text_or_messages(row, key, source)
        if ("margin" in row) != has_margin:
            raise UserError(f"{where(source, row)}: column 'margin' must be in every row or in none")
        if has_margin and (isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float))
                           or not math.isfinite(row["margin"])):
            raise UserError(f"{where(source, row)}: column 'margin' is {_shown(row['margin'])}; expected a finite number")


def _is_chat(value) -> bool:
    return isinstance(value, list)


def _replies_as_chat(row: dict, replies: tuple[str, ...]) -> None:
    """Text responses to a message-list prompt become assistant messages (TRL concatenates prompt + response)."""
    for key in replies:
        if not _is_chat(row[key]):
            row[key] = [{"role": "assistant", "content": row[key]}]


def _one_type(rows: list[dict], replies: tuple[str, ...]) -> int:
    """Text rows among conversational ones made conversational, as a user turn and assistant turns (a dataset
    column holds one type); returns how many were changed."""
    if all(_is_chat(r["prompt"]) for r in rows) or not any(_is_chat(r["prompt"]) for r in rows):
        return 0
    changed = 0
    for row in rows:
        if not _is_chat(row["prompt"]):
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
            _replies_as_chat(row, replies)
            changed += 1
    return changed


def _split_shared_prompt(row: dict) -> dict | None:
    """prompt / chosen / rejected from two responses that each repeat the prompt, or None when no prefix
    separates it from two different responses.

    Message lists: TRL's extract_prompt (the longest run of shared messages), guarded where it splits wrongly
    (the lists differ at the first message, or one contains the other). Text: the longest shared prefix cut back
    to a word boundary, the whitespace going with the responses as TRL does — extract_prompt cuts mid-word
    ("Assistant: S" + "ure" / "orry") and drops a response that extends the other ("Yes." / "Yes. Bake it.").
    """
    from trl.data_utils import extract_prompt

    chosen, rejected = row["chosen"], row["rejected"]
    if not chosen or not rejected or type(chosen) is not type(rejected) or chosen == rejected:
        return None
    if isinstance(chosen, str):
        shared = os.path.commonprefix([chosen, rejected])
        n = len(shared)
        at_boundary = n < min(len(chosen), len(rejected)) and (
            shared[-1:].isspace() or (chosen[n].isspace() and rejected[n].isspace()))
        if not at_boundary:  # inside a word, or one response is all shared: back to the last whitespace
            n = max((i for i, ch in enumerate(shared) if ch.isspace()), default=0)
        cut = len(chosen[:n].rstrip())
        if cut == 0:
            return None
        return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    n = min(len(chosen), len(rejected))
    if chosen[0] != rejected[0] or chosen[:n] == rejected[:n]:
        return None
    return extract_prompt(row)


def consistent_pairs(rows: list[dict], source) -> tuple[list[dict], dict]:
    """Checked preference rows in the one shape TRL trains on — prompt, chosen and rejected all text, or all
    message lists — and counts for stage.json. TRL's DPO and reward trainers fail mid-stage on anything else.

    - no prompt column (Anthropic HH-RLHF: chosen and rejected each hold the whole conversation): TRL's
      extract_prompt splits off the prefix they share; rows with no such prefix are dropped and counted;
    - a text prompt with message-list responses that repeat it (UltraFeedback): the messages both responses
      share become the prompt;
    - a message-list prompt with text responses (a label store's chat prompts): the responses become
      assistant messages;
    - text rows among conversational ones become conversational (prompt a user turn, responses assistant
      turns): a dataset column holds one type.
    """
    check_preference_rows(rows, source)
    out, no_prompt = [], 0
    for row in rows:
        row = dict(row)
        if "prompt" not in row or (isinstance(row["prompt"], str) and _is_chat(row["chosen"]) and _is_chat(row["rejected"])):
            split = _split_shared_prompt(row)
            if split is not None:
                row.update(split)
            elif "prompt" not in row:
                no_prompt += 1
                continue
            else:
                row["prompt"] = [{"role": "user", "content": row["prompt"]}]
        if _is_chat(row["prompt"]):
            _replies_as_chat(row, ("chosen", "rejected"))
        out.append(row)
    if rows and not out:
        has = ", ".join(k for k in rows[0] if k != "_line")
        raise UserError(f"{where(source, rows[0])}: missing column 'prompt' (has: {has}), and no row's chosen and "
                        f"rejected share a prompt to split off")
    made_chat = _one_type(out, ("chosen", "rejected"))
    counts = {k: v for k, v in (("dropped_no_prompt", no_prompt), ("rows_made_conversational", made_chat)) if v}
    return out, counts


def consistent_unpaired(rows: list[dict], source) -> tuple[list[dict], dict]:
    """Checked KTO rows (prompt, completion, label) in one shape, as consistent_pairs does for pairs: a
    message-list prompt makes a text completion an assistant message; text rows among conversational ones
    become conversational."""
    if not rows:
        raise UserError(f"{source}: the dataset is empty")
    _check_rows_are_objects(rows, source)
    out = []
    for row in rows:
        for key in ("prompt", "completion", "label"):
            if key not in row:
                has = ", ".join(k for k in row if k != "_line")
                raise UserError(f"{where(source, row)}: missing column {key!r} (has: {has}); KTO rows are prompt / "
                                f"completion / label, or prompt / chosen / rejected pairs")
        _check_text_or_messages(row, "prompt", source)
        _check_text_or_messages(row, "completion", source)
        if not isinstance(row["label"], bool):
            raise UserError(f"{where(source, row)}: column 'label' is {_shown(row['label'])}; expected true (desirable) "
                            f"or false (undesirable)")
        row = dict(row)
        if _is_chat(row["prompt"]):
            _replies_as_chat(row, ("completion",))
        out.append(row)
    made_chat = _one_type(out, ("completion",))
    return out, ({"rows_made_conversational": made_chat} if made_chat else {})


def prompt_from(row: dict, source, *, exclusive: bool = False):
    """The prompt a prompts-file row asks for, checked: `prompt` (non-empty text, or a message list as in TRL's
    conversational format), else `messages`; a message list ends with the turn to answer, not the assistant's.
    One rule for every prompt file: PPO / GRPO / RLOO data, `label import` and `compare`. Datasets often carry
    both (UltraFeedback: `messages` is the whole conversation), so `prompt` wins, unless `exclusive` (an import
    file, where both would be a mistake) refuses the row."""
    if "prompt" not in row and "messages" not in row:
        has = ", ".join(k for k in row if k != "_line") or "none"
        raise UserError(f"{where(source, row)}: missing column 'prompt' (text or a list of messages) or 'messages' (has: {has})")
    if exclusive and "prompt" in row and "messages" in row:
        raise UserError(f"{where(source, row)}: give exactly one of `prompt` (text or a list of messages) or `messages`")
    key = "prompt" if "prompt" in row else "messages"
    value = row[key]
    if key == "prompt" and isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where(source, row)}: `prompt` must be a non-empty string or a list of messages")
        return value
    _check_messages(value, source, row, key)
    if value[-1]["role"] == "assistant":
        raise UserError(f"{where(source, row)}: the last message in {key!r} is the assistant's; a prompt ends with the "
                        f"turn to answer")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_prompt_rows(rows: list[dict], source) -> None:
    if not rows:
        raise UserError(f"{source}: the prompt dataset is empty")
    _check_rows_are_objects(rows, source)
    for row in rows:
        prompt_from(row, source)


def prompt_of(row: dict):
    """The prompt of a prompt row: text, or the message list."""
    return row["prompt"] if "prompt" in row else row["messages"]
