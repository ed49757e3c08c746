"""Which tokens of a chat conversation the SFT loss covers: every assistant turn, for any chat template.

Three ways, tried in this order (mask_plan):
  - the template has `{% generation %}` markers: transformers' assistant mask, through TRL (MARKERS);
  - TRL ships a training version of the template with markers: the same, with that template (TRL_TEMPLATE);
  - otherwise the conversation is rendered turn by turn: what rendering an assistant turn adds to the
    conversation before it (rendered with the generation prompt) is that turn (TURN_BY_TURN), as axolotl and
    LLaMA-Factory do for templates without markers.

Turn by turn, every piece is checked against the template's own rendering of the whole conversation: each
partial rendering must be a prefix of the next and of the whole, and the token ids trained on are the whole
conversation's, exactly as the template tokenizes it. A template that renders earlier turns differently once
later ones follow (one that drops earlier reasoning, say) fails the check, and the row is refused with the
reason instead of being trained on tokens the template never produces.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.errors import UserError

MARKERS = "generation markers (template)"
TRL_TEMPLATE = "generation markers (TRL training template)"
TURN_BY_TURN = "turn-by-turn rendering (verified)"


@dataclass(frozen=True)
class MaskPlan:
    """How assistant tokens are found for one tokenizer's chat template."""

    method: str  # MARKERS, TRL_TEMPLATE or TURN_BY_TURN
    chat_template: str | None = None  # TRL's training template, for TRL_TEMPLATE

    @property
    def uses_markers(self) -> bool:
        """True when TRL masks from `{% generation %}` markers itself (SFTConfig.assistant_only_loss)."""
        return self.method != TURN_BY_TURN


@dataclass
class MaskedChat:
    """A conversation as the chat template tokenizes it, and the tokens the loss covers.

    Invariant: len(input_ids) == len(assistant_masks); assistant_masks is 1 on each assistant turn's content
    and end-of-turn token(s), 0 on every system, user and tool token and on the turns' headers.
    """

    input_ids: list[int]
    assistant_masks: list[int]


def _template_text(tokenizer) -> str:
    # A template shipped as named variants loads as a dict; its `default` variant is the one chats use.
    template = tokenizer.chat_template
    return template["default"] if isinstance(template, dict) else template


def mask_plan(tokenizer) -> MaskPlan:
    """The way assistant tokens are masked for this tokenizer's chat template (see the module docstring)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(_template_text(tokenizer)):
        return MaskPlan(MARKERS)
    try:
        training = get_training_chat_template(tokenizer)
    except ValueError:  # TRL raises for templates it has no training version of
        return MaskPlan(TURN_BY_TURN)
    return MaskPlan(TRL_TEMPLATE, training)


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _special_tokens(tokenizer) -> set[str]:
    return {t for t in set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()) if t.strip()}


def _end_of_turn(tokenizer, text: str, start: int, end: int, message: int) -> int:
    """Where the loss over an assistant span ends: at its closing special token, before whitespace that
    follows it (Qwen's `<|im_end|>` + "\n"), which the model never generates since it stops at that token.
    Raises ValueError when the span ends in no special token: the model would not learn to stop."""
    kept = text[start:end].rstrip()
    if not any(kept.endswith(token) for token in _special_tokens(tokenizer)):
        raise ValueError(f"message {message} (assistant) ends in {kept[-20:]!r}, not in an end-of-turn token, so "
                         f"the model would not learn to stop")
    return start + len(kept)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the whole conversation as the template renders it, and the character span each
    assistant turn adds to it. Raises ValueError with the reason when the turn-by-turn renderings are not
    prefixes of one another and of the whole text (the template renders a turn differently in context)."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not through.startswith(before):
            raise ValueError(f"message {i + 1} (assistant) does not follow the generation prompt the template "
                             f"renders before it ({_first_difference(before, through)})")
        if not text.startswith(through):
            raise ValueError(f"the template renders the conversation up to message {i + 1} differently once "
                             f"later messages follow ({_first_difference(through, text)})")
        spans.append((len(before), _end_of_turn(tokenizer, text, len(before), len(through), i + 1)))
    return text, spans


def _first_difference(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{a[n:n + 30]!r} vs {b[n:n + 30]!r} at character {n}"


def turn_by_turn_mask(tokenizer, messages: list[dict]) -> MaskedChat:
    """The conversation's token ids (the template's own tokenization) with each assistant turn's span
    masked in: a token is in the loss when any of its characters lies in a span, as transformers maps
    `{% generation %}` spans to tokens. Raises ValueError with the reason when the template cannot be masked
    this way (see assistant_char_spans) or its tokenization is not the rendered text's."""
    if not tokenizer.is_fast:
        raise ValueError("turn-by-turn masking needs a fast tokenizer (character offsets of tokens)")
    text, spans = assistant_char_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if ids != tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]:
        raise ValueError("the template's own tokenization differs from tokenizing its rendered text")
    mask = [int(any(s < token_end and token_start < e for s, e in spans))
            for token_start, token_end in encoded["offset_mapping"]]
    if len(spans) != sum(1 for m in messages if m["role"] == "assistant") or not any(mask):
        raise ValueError("an assistant turn renders as no tokens")
    return MaskedChat(ids, mask)


def marker_mask(tokenizer, messages: list[dict], plan: MaskPlan) -> MaskedChat:
    """transformers' assistant mask from the `{% generation %}` markers of the template `plan` names (what
    TRL's SFTTrainer trains on with assistant_only_loss)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=plan.chat_template)
    return MaskedChat(list(out["input_ids"]), list(out["assistant_masks"]))


def masked_rows(tokenizer, rows: list[dict], source) -> list[dict]:
    """`messages` rows as pre-tokenized SFT rows (input_ids + assistant_masks, which TRL's SFTTrainer turns
    into labels), masked turn by turn. A row the template cannot mask is one UserError naming the row, the
    template's problem and the way out; no row is trained on some other way."""
    from jinja2 import TemplateError

    from alignkit.data.io import where

    out = []
    for row in rows:
        try:
            masked = turn_by_turn_mask(tokenizer, row["messages"])
        except (ValueError, TemplateError) as err:
            raise UserError(f"{where(source, row)}: cannot tell the assistant tokens from the others with this chat "
                            f"template: {err}; give the tokenizer a chat template with {{% generation %}} markers "
                            f"around assistant turns") from None
        out.append({"input_ids": masked.input_ids, "assistant_masks": masked.assistant_masks})
    return out
