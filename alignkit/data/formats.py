"""Row formats the stages accept, checked row by row with the file and line of the first bad one.

SFT:        {"messages": [{"role", "content"}, ...]}  |  {"prompt", "completion"}  |  {"text"}
            ShareGPT {"conversations": [{"from", "value"}, ...][, "system"]} and Alpaca {"instruction"[, "input"],
            "output"[, "system", "history"]} become "messages" rows on load (standard_sft_rows)
preference: {"prompt", "chosen", "rejected"[, "margin"]}  (strings, or TRL conversational message lists);
            without "prompt" in every row (HH-RLHF), chosen and rejected are whole conversations sharing it;
            ShareGPT ranking rows {"conversations", "chosen", "rejected"} ({from, value} messages) and Alpaca
            ranking rows {"instruction"[, "input"], "chosen", "rejected"} become prompt / chosen / rejected
unpaired:   {"prompt", "completion", "label": bool}  (KTO; preference pairs become two such rows)
prompts:    {"prompt": str}  |  {"messages": [...]}  (the conversation so far)
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

from alignkit.data.clean import is_empty
from alignkit.data.io import LOCATION_KEYS, where
from alignkit.errors import UserError

ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT speakers (`from`) and the roles they are: ShareGPT dumps say human / gpt; LLaMA-Factory's sharegpt
# format also user / assistant, and observation for a tool's result.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "observation": "tool", "tool": "tool"}
SFT_SHAPES = ("'messages' (role / content)", "ShareGPT 'conversations' (from / value)",
              "Alpaca 'instruction' [+ 'input'] + 'output'", "'prompt' + 'completion'", "'text'")


def _shown(value) -> str:
    """A JSON value as the user wrote it (null, 5, [..]), cut short."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _columns(row: dict) -> str:
    """The row's columns as the user wrote them, for "(has: ...)"."""
    return ", ".join(k for k in row if k not in LOCATION_KEYS) or "none"


def _location(row: dict) -> dict:
    return {k: row[k] for k in LOCATION_KEYS if k in row}


def _check_rows(rows: list, source, what: str = "dataset") -> None:
    """Some rows, each an object: a .json file or dataset may hold a list of anything, and every check below
    indexes rows by column."""
    if not rows:
        raise UserError(f"{source}: the {what} is empty")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{source}: row {i} is {type(row).__name__}, expected an object with named columns")


SFT_FORMATS = ("messages", "prompt_completion", "text")


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


def _text_column(row: dict, key: str, source, *, optional: bool = False) -> str:
    value = row.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where(source, row)}: column {key!r} is {_shown(value)}; expected text")
    return value


def _sharegpt_messages(turns, source, row, key: str) -> list[dict]:
    """ShareGPT turns ({from, value}) as {role, content} messages, checked as messages are."""
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where(source, row)}: column {key!r} must be a non-empty list of messages")
    out = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise UserError(f"{where(source, row)}: message {i} in {key!r} is {_shown(turn)}, expected an object with "
                            f"'from' and 'value'")
        missing = [repr(k) for k in ("from", "value") if k not in turn]
        if missing:
            raise UserError(f"{where(source, row)}: message {i} in {key!r} has no {' or '.join(missing)}")
        if not isinstance(turn["from"], str) or turn["from"] not in SHAREGPT_ROLES:
            raise UserError(f"{where(source, row)}: message {i} in {key!r} has unknown role {_shown(turn['from'])}; "
                            f"one of {', '.join(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    _check_messages(out, source, row, key)
    return out


def _is_sharegpt(value) -> bool:
    """A message list in ShareGPT's {from, value} form (some datasets keep it under `messages`)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "from" in value[0]


def _sharegpt_prompt(row: dict, source, key: str) -> list[dict]:
    """A ShareGPT row's conversation as messages, its optional `system` column first (LLaMA-Factory's)."""
    system = _text_column(row, "system", source, optional=True)
    return ([{"role": "system", "content": system}] if system else []) + _sharegpt_messages(row[key], source, row, key)


def _alpaca_prompt(row: dict, source) -> list[dict]:
    """An Alpaca row up to its answer: [system], the `history` pairs as turns, then instruction + "\n\n" + input
    (the instruction alone when input is empty) as the user turn."""
    system = _text_column(row, "system", source, optional=True)
    messages = [{"role": "system", "content": system}] if system else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise UserError(f"{where(source, row)}: column 'history' is {_shown(history)}; expected a list of "
                        f"[question, answer] pairs")
    for i, pair in enumerate(history, 1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"{where(source, row)}: column 'history' item {i} is {_shown(pair)}; expected a "
                            f"[question, answer] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, extra = _text_column(row, "instruction", source), _text_column(row, "input", source, optional=True)
    return messages + [{"role": "user", "content": instruction + ("\n\n" + extra if extra else "")}]


def _sft_shape(row: dict) -> str | None:
    """The shape an SFT row is in — messages, sharegpt, alpaca, prompt_completion, text — or None. A column
    holding None counts as absent: a dataset directory gives every row every column of the file."""
    has = {k for k, v in row.items() if v is not None}
    if "messages" in has:
        return "sharegpt" if _is_sharegpt(row["messages"]) else "messages"
    if "conversations" in has:
        return "sharegpt"
    if {"instruction", "output"} <= has:
        return "alpaca"
    if {"prompt", "completion"} <= has:
        return "prompt_completion"
    return "text" if "text" in has else None


def standard_sft_rows(rows: list, source) -> tuple[list[dict], dict]:
    """(rows, formats_read): ShareGPT and Alpaca rows as `messages` rows (their location kept), the others as
    they are, and how many rows came in each shape. A row in no known shape is one error naming the shapes."""
    _check_rows(rows, source)
    out, shapes = [], Counter()
    for row in rows:
        shape = _sft_shape(row)
        if shape is None:
            raise UserError(f"{where(source, row)}: missing column 'messages' (has: {_columns(row)}); an SFT row is "
                            f"one of {', '.join(SFT_SHAPES)}")
        shapes[shape] += 1
        if shape == "sharegpt":
            key = "messages" if "messages" in row and row["messages"] is not None else "conversations"
            row = {"messages": _sharegpt_prompt(row, source, key), **_location(row)}
        elif shape == "alpaca":
            answer = {"role": "assistant", "content": _text_column(row, "output", source)}
            row = {"messages": _alpaca_prompt(row, source) + [answer], **_location(row)}
        out.append(row)
    return out, dict(shapes)


def sft_format(rows: list[dict], source) -> str:
    """'messages', 'prompt_completion' or 'text' — the one format all rows share (after standard_sft_rows)."""
    _check_rows(rows, source)
    first = rows[0]
    fmt = _sft_shape(first)
    if fmt not in SFT_FORMATS:
        raise UserError(f"{where(source, first)}: SFT rows need {', '.join(SFT_SHAPES)} (has: {_columns(first)})")
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


def _preference_shape(row: dict) -> str:
    """sharegpt (`conversations` + chosen / rejected messages), alpaca (`instruction` + chosen / rejected), or
    prompt_chosen_rejected / chosen_rejected (no prompt: HH-RLHF's whole transcripts)."""
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "prompt" not in row:
        return "alpaca"
    return "prompt_chosen_rejected" if "prompt" in row else "chosen_rejected"


def _sharegpt_reply(row: dict, key: str, source) -> list[dict]:
    """A ShareGPT ranking row's chosen / rejected: one {from, value} message (LLaMA-Factory) or a list of them."""
    if key not in row:
        raise UserError(f"{where(source, row)}: missing column {key!r} (has: {_columns(row)})")
    value = row[key]
    return _sharegpt_messages([value] if isinstance(value, dict) else value, source, row, key)


def standard_preference_rows(rows: list, source) -> tuple[list[dict], dict]:
    """(rows, formats_read): ShareGPT and Alpaca ranking rows as prompt / chosen / rejected rows (a message-list
    prompt; margin and location kept), the others as they are, and how many rows came in each shape."""
    _check_rows(rows, source, "preference dataset")
    out, shapes = [], Counter()
    for row in rows:
        shape = _preference_shape(row)
        shapes[shape] += 1
        kept = {k: row[k] for k in ("margin", *LOCATION_KEYS) if k in row}
        if shape == "sharegpt":
            row = {"prompt": _sharegpt_prompt(row, source, "conversations"), "chosen": _sharegpt_reply(row, "chosen", source),
                   "rejected": _sharegpt_reply(row, "rejected", source), **kept}
        elif shape == "alpaca":
            row = {"prompt": _alpaca_prompt(row, source), **{k: row[k] for k in ("chosen", "rejected") if k in row}, **kept}
        out.append(row)
    return out, dict(shapes)


def check_preference_rows(rows: list[dict], source) -> None:
    """Every row has prompt (unless no row has: HH-RLHF), chosen and rejected as text or messages, and a
    finite margin in every row or in none."""
    _check_rows(rows, source, "preference dataset")
    # The loader keeps a margin column when the first row has one; a row without it would reach the trainer as None.
    has_margin = "margin" in rows[0]
    # A row without a prompt among rows with one is a malformed file, not an HH-RLHF transcript: splitting off
    # what its two answers share would make words of the answers its prompt.
    with_prompt = any("prompt" in row for row in rows)
    for row in rows:
        if with_prompt and "prompt" not in row and "chosen" in row and "rejected" in row:
            raise UserError(f"{where(source, row)}: no 'prompt' column, which other rows have; give every row its "
                            f"prompt, or none (chosen and rejected then each hold the whole conversation)")
        for key in ("prompt", "chosen", "rejected") if with_prompt else ("chosen", "rejected"):
            if key not in row:
                raise UserError(f"{where(source, row)}: missing column {key!r} (has: {_columns(row)})")
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


def _same_responses(row: dict) -> bool:
    return row["chosen"] == row["rejected"] and not is_empty(row["chosen"])  # empty pairs are filter_rows' to count


def _shape_pair(row: dict) -> str | None:
    """Bring one checked row (changed in place) to prompt / chosen / rejected as TRL trains on them; returns
    why it is dropped instead (a counter's name), or None."""
    if _same_responses(row):
        return "dropped_identical"
    if "prompt" not in row or (isinstance(row["prompt"], str) and _is_chat(row["chosen"]) and _is_chat(row["rejected"])):
        split = _split_shared_prompt(row)
        if split is not None:
            row.update(split)
        elif "prompt" not in row:
            return "dropped_no_prompt"
        else:
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
    if _is_chat(row["prompt"]):
        _replies_as_chat(row, ("chosen", "rejected"))
        # A user (or tool) turn after the prompt would be trained as part of the answer preferred or refused.
        if any(m["role"] != "assistant" for key in ("chosen", "rejected") for m in row[key]):
            return "dropped_not_assistant_reply"
    return "dropped_identical" if _same_responses(row) else None


def consistent_pairs(rows: list[dict], source) -> tuple[list[dict], dict]:
    """Checked preference rows in the one shape TRL trains on — prompt, chosen and rejected all text, or all
    message lists — and counts for stage.json. TRL's DPO and reward trainers fail mid-stage on anything else.

    - ShareGPT and Alpaca ranking rows become prompt / chosen / rejected (standard_preference_rows);
    - no prompt column (Anthropic HH-RLHF: chosen and rejected each hold the whole conversation): TRL's
      extract_prompt splits off the prefix they share; rows with no such prefix are dropped and counted;
    - a text prompt with message-list responses that repeat it (UltraFeedback): the messages both responses
      share become the prompt;
    - a message-list prompt with text responses (a label store's chat prompts): the responses become
      assistant messages;
    - responses with any turn but the assistant's after the prompt, and pairs whose two responses are the
      same, are dropped and counted;
    - text rows among conversational ones become conversational (prompt a user turn, responses assistant
      turns): a dataset column holds one type.
    """
    rows, formats = standard_preference_rows(rows, source)
    check_preference_rows(rows, source)
    out, dropped = [], Counter()
    for row in rows:
        row = dict(row)
        reason = _shape_pair(row)
        if reason:
            dropped[reason] += 1
        else:
            out.append(row)
    if rows and dropped["dropped_no_prompt"] == len(rows):
        raise UserError(f"{where(source, rows[0])}: missing column 'prompt' (has: {_columns(rows[0])}), and no row's "
                        f"chosen and rejected share a prompt to split off")
    made_chat = _one_type(out, ("chosen", "rejected"))
    counts = {**{k: v for k, v in sorted(dropped.items())}, "formats_read": formats}
    if made_chat:
        counts["rows_made_conversational"] = made_chat
    return out, counts


def consistent_unpaired(rows: list[dict], source) -> tuple[list[dict], dict]:
    """Checked KTO rows (prompt, completion, label) in one shape, as consistent_pairs does for pairs: a
    message-list prompt makes a text completion an assistant message; text rows among conversational ones
    become conversational."""
    _check_rows(rows, source)
    out = []
    for row in rows:
        for key in ("prompt", "completion", "label"):
            if key not in row:
                raise UserError(f"{where(source, row)}: missing column {key!r} (has: {_columns(row)}); KTO rows are prompt / "
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
        raise UserError(f"{where(source, row)}: missing column 'prompt' (text or a list of messages) or 'messages' "
                        f"(has: {_columns(row)})")
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
    _check_rows(rows, source, "prompt dataset")
    for row in rows:
        prompt_from(row, source)


def prompt_of(row: dict):
    """The prompt of a prompt row: text, or the message list."""
    return row["prompt"] if "prompt" in row else row["messages"]
