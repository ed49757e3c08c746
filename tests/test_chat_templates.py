"""Assistant-only loss on every chat template TRL ships: every assistant turn is trained, nothing else.

Each template in trl/chat_templates/ is set on the tiny tokenizer (with the special tokens it names) and
multi-turn conversations are masked the way the SFT stage masks them (alignkit.data.chat_mask.mask_plan):
with `{% generation %}` markers (the template's or TRL's training version) the mask is transformers' assistant
mask under the template TRL's SFTTrainer uses; without, the turn-by-turn mask covers each assistant turn's
content and end-of-turn token(s) and nothing else. Pure tokenization: the whole matrix takes seconds.
"""

import copy
import re
from pathlib import Path

import pytest
import trl
from jinja2 import TemplateError

from alignkit.data.chat_mask import (MARKERS, TRL_TEMPLATE, TURN_BY_TURN, mask_plan, marker_mask, masked_rows,
                                     turn_by_turn_mask)
from alignkit.errors import UserError
from alignkit.tiny import build_tokenizer, tiny_corpus

TEMPLATES = sorted((Path(trl.__file__).parent / "chat_templates").glob("*.jinja"))
# Vision templates that render a message's content only as a list of image / text blocks: text conversations
# are not theirs (the test checks that they indeed fail or drop plain text content).
BLOCK_CONTENT_ONLY = {"llava_next", "llava_next_training", "idefics3", "idefics3_training", "smolvlm", "smolvlm_training"}

CONVERSATIONS = [
    [{"role": "system", "content": "be brief"},
     {"role": "user", "content": "Describe the film?"}, {"role": "assistant", "content": "the film was good."},
     {"role": "user", "content": "and the cast?"}, {"role": "assistant", "content": "the cast felt dull."},
     {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "so long."}],
    [{"role": "user", "content": "how was the music?"}, {"role": "assistant", "content": "the music was so warm."},
     {"role": "user", "content": "the ending?"}, {"role": "assistant", "content": "too long."}],
]


@pytest.fixture(scope="module")
def base_tokenizer():
    return build_tokenizer(tiny_corpus(500), vocab_size=400)


def _tokenizer_for(base, template: str):
    """The tiny tokenizer with this template and the special tokens it spells out (<|eot_id|>, <end_of_turn>, ...)."""
    tok = copy.deepcopy(base)
    specials = sorted(set(re.findall(r"<[|｜]?[A-Za-z0-9_▁\-]+[|｜]?>", template)))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


def _conversation(tok, messages):
    """The conversation, without its system turn for templates that refuse one (Gemma 1 / 2)."""
    try:
        tok.apply_chat_template(messages, tokenize=False)
        return messages
    except TemplateError as err:
        if "system" not in str(err).lower():
            raise
        return [m for m in messages if m["role"] != "system"]


def _masked_spans(tok, ids, mask) -> list[str]:
    spans, run = [], []
    for token, bit in zip(ids, mask):
        if bit:
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans + ([tok.decode(run)] if run else [])


def _unmasked_text(tok, ids, mask) -> str:
    return tok.decode([t for t, bit in zip(ids, mask) if not bit])


def _assert_content_then_end_of_turn(tok, span: str, content: str):
    specials = sorted({t for t in tok.all_special_tokens + list(tok.get_added_vocab()) if t.strip()}, key=len, reverse=True)
    assert span.startswith(content), (span, content)
    rest = span[len(content):]
    assert rest, f"no end-of-turn token after {content!r}"
    for token in specials:
        rest = rest.replace(token, "")
    assert rest == "", f"{span!r} holds more than {content!r} and end-of-turn tokens"


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_every_assistant_turn_and_nothing_else_is_masked(base_tokenizer, path):
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    tok = _tokenizer_for(base_tokenizer, path.read_text())
    if path.stem in BLOCK_CONTENT_ONLY:
        try:
            rendered = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False)
        except TemplateError:
            rendered = ""
        assert CONVERSATIONS[1][0]["content"] not in rendered  # the reason it is skipped holds
        pytest.skip("vision template: renders content only as image / text blocks")
    plan = mask_plan(tok)
    for messages in CONVERSATIONS:
        messages = _conversation(tok, messages)
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        others = [m["content"] for m in messages if m["role"] != "assistant"]
        if plan.uses_markers:
            # The template TRL's SFTTrainer masks with: the tokenizer's own when it has markers, else TRL's version.
            template = None if has_generation_markers(tok.chat_template) else get_training_chat_template(tok)
            assert plan.chat_template == template and plan.method == (MARKERS if template is None else TRL_TEMPLATE)
            expected = tok.apply_chat_template(messages, chat_template=template, return_assistant_tokens_mask=True,
                                               return_dict=True)
            masked = marker_mask(tok, messages, plan)
            assert masked.input_ids == expected["input_ids"] and masked.assistant_masks == expected["assistant_masks"]
            spans = _masked_spans(tok, masked.input_ids, masked.assistant_masks)
            assert len(spans) == len(assistant) and all(c in s for c, s in zip(assistant, spans)), spans
        else:
            masked = turn_by_turn_mask(tok, messages)
            assert masked.input_ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            spans = _masked_spans(tok, masked.input_ids, masked.assistant_masks)
            assert len(spans) == len(assistant), spans
            for span, content in zip(spans, assistant):
                _assert_content_then_end_of_turn(tok, span, content.strip())
        unmasked = _unmasked_text(tok, masked.input_ids, masked.assistant_masks)
        assert all(c in unmasked for c in others) and not any(c in unmasked for c in assistant)


def test_llama_3_1_and_3_2_are_masked_turn_by_turn(base_tokenizer):
    """TRL has no training template for them, so the mask comes turn by turn, not from the last turn only."""
    for name in ("llama3_1", "llama3_2"):
        path = next(p for p in TEMPLATES if p.stem == name)
        assert mask_plan(_tokenizer_for(base_tokenizer, path.read_text())).method == TURN_BY_TURN


def test_tool_turns_are_not_trained(base_tokenizer):
    tok = _tokenizer_for(base_tokenizer, next(p for p in TEMPLATES if p.stem == "llama3_2").read_text())
    messages = [{"role": "user", "content": "what is the time?"}, {"role": "assistant", "content": "the clock said"},
                {"role": "tool", "content": "noon sharp"}, {"role": "assistant", "content": "it is noon."}]
    masked = turn_by_turn_mask(tok, messages)
    assert _masked_spans(tok, masked.input_ids, masked.assistant_masks) == ["the clock said<|eot_id|>", "it is noon.<|eot_id|>"]
    assert "noon sharp" in _unmasked_text(tok, masked.input_ids, masked.assistant_masks)


@pytest.mark.parametrize("name, reason", [
    ("qwen3", "renders the conversation up to message 2 differently once later messages follow"),
    ("deepseekv3", "message 2 (assistant) does not follow the generation prompt"),
    ("glm4moe", "not in an end-of-turn token, so the model would not learn to stop"),
])
def test_templates_that_cannot_be_masked_turn_by_turn_are_refused_with_the_reason(base_tokenizer, tmp_path, name, reason):
    """Qwen3 drops the empty reasoning block from earlier turns, DeepSeek-V3 opens a <think> the turns lack,
    GLM-4 closes no turn: what turn-by-turn rendering would train is not what the template renders, or never
    stops. (The stage masks them with TRL's training templates instead.)"""
    tok = _tokenizer_for(base_tokenizer, next(p for p in TEMPLATES if p.stem == name).read_text())
    rows = [{"messages": CONVERSATIONS[1], "_line": 7}]
    with pytest.raises(UserError) as err:
        masked_rows(tok, rows, "chats.jsonl")
    message = str(err.value)
    assert message.startswith("chats.jsonl:7: cannot tell the assistant tokens from the others") and reason in message
    assert "\n" not in message
    assert mask_plan(tok).method == TRL_TEMPLATE


# --- the SFT stage on multi-turn data with the Llama 3.2 template -------------------------------------------------


@pytest.fixture(scope="module")
def llama32_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with Llama 3.2's chat template and its special tokens (embeddings grown to match)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-llama32")
    template = next(p for p in TEMPLATES if p.stem == "llama3_2").read_text()
    tok = _tokenizer_for(AutoTokenizer.from_pretrained(str(tiny_model_dir)), template)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def test_sft_on_llama_3_2_trains_every_assistant_turn(tmp_path, llama32_model_dir, capsys):
    import json

    import yaml
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from alignkit.artifacts import file_fingerprint, read_stage
    from recipes.runner import run_recipe

    rows = [{"messages": CONVERSATIONS[i % 2]} for i in range(2)] + [
        {"messages": [{"role": "user", "content": f"tell me about the plot {i}?"},
                      {"role": "assistant", "content": "the plot was clever."},
                      {"role": "user", "content": "and the script?"},
                      {"role": "assistant", "content": f"the script was {'very ' * i}weak."}]} for i in range(6)]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model": {"base": str(llama32_model_dir), "quantization": "4bit"},
              "peft": {"method": "lora", "r": 4, "lora_alpha": 8},
              "run_dir": str(tmp_path / "run"), "seed": 0,
              "stages": [{"name": "sft", "kind": "sft", "data": {"train": str(data)},
                          "train": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                                    "max_length": 256, "logging_steps": 1}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    base_before = file_fingerprint(llama32_model_dir)
    run_recipe(path, log=lambda *_: None)

    record = read_stage(tmp_path / "run" / "sft")
    assert record["data"]["assistant_mask"] == TURN_BY_TURN and record["data"]["loss_on"] == "every assistant turn"
    assert f"sft: loss on every assistant turn, masked by {TURN_BY_TURN}" in capsys.readouterr().out
    # Trained tokens: each assistant turn's content and its <|eot_id|>, in every turn, not the last one alone.
    tok = AutoTokenizer.from_pretrained(str(llama32_model_dir))
    expected = sum(len(tok(m["content"].strip(), add_special_tokens=False)["input_ids"]) + 1
                   for r in rows for m in r["messages"] if m["role"] == "assistant")
    last_only = sum(len(tok([m for m in r["messages"] if m["role"] == "assistant"][-1]["content"].strip(),
                            add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert record["data"]["loss_tokens"] == expected and expected > last_only
    weights = load_file(str(tmp_path / "run" / "sft" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert sum(v.float().norm() for k, v in weights.items() if "lora_B" in k) > 1e-4  # lora_B starts at zero
    assert file_fingerprint(llama32_model_dir) == base_before


def test_a_template_that_cannot_be_masked_stops_the_stage_before_it_begins(tmp_path, tiny_model_dir, capsys):
    """No silent fallback: one line naming the row and the template's problem, exit status 2, no stage directory."""
    import json
    import shutil

    import yaml
    from transformers import AutoTokenizer

    from alignkit.cli import EXIT_BAD_INPUT, main

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")  # no end-of-turn token
    tok.save_pretrained(str(model))
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    recipe = {"model": {"base": str(model), "quantization": "none"}, "run_dir": str(tmp_path / "run"),
              "stages": [{"name": "sft", "kind": "sft", "data": {"train": str(data)}, "train": {"max_steps": 1}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{data}:1: cannot tell the assistant tokens from the others with this chat template: message 2 " in err
    assert "would not learn to stop" in err
    assert not (tmp_path / "run").exists()
