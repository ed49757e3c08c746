"""Batched sampling: prompts tokenized as TRL tokenizes them, and only the recorded settings shape the samples."""

import pytest
import torch

from alignkit.generation import SamplingParams, encode_prompt, generate_batch
from alignkit.modeling import load_tokenizer


@pytest.fixture
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir), padding_side="left")


def test_plain_prompts_get_the_tokenizers_bos_and_no_eos(tokenizer):
    plain = encode_prompt(tokenizer, "the film was")
    assert plain[0] != tokenizer.bos_token_id
    tokenizer.add_bos_token = True  # Llama-style: BOS from the tokenizer's post-processor
    tokenizer.add_eos_token = True
    with_bos = encode_prompt(tokenizer, "the film was")
    assert with_bos == [tokenizer.bos_token_id] + plain  # BOS as TRL's SFT/reward tokenization adds it; no EOS


def test_chat_prompts_carry_only_the_templates_special_tokens(tokenizer):
    tokenizer.add_bos_token = True
    chat = [{"role": "user", "content": "Describe the film."}]
    ids = encode_prompt(tokenizer, chat)
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_a_checkpoints_shipped_generation_settings_do_not_change_samples(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompts = ["the film was", "the music"]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    plain = generate_batch(model, tokenizer, prompts, params).response_ids
    # What a checkpoint may ship (a repetition_penalty, a suppressed token): each changes greedy decoding.
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.suppress_tokens = [plain[0][0]]
    assert generate_batch(model, tokenizer, prompts, params).response_ids == plain
    assert model.generation_config.suppress_tokens == [plain[0][0]]  # the model's own config is put back
    applied = model.generate(torch.tensor([encode_prompt(tokenizer, prompts[0])]), max_new_tokens=4, do_sample=False)
    assert applied[0, -4] != plain[0][0]  # generate() alone would have applied them


def test_generate_cli_raw_and_chat(tiny_model_dir, capsys):
    from alignkit.cli import main

    for extra in ([], ["--chat"]):
        assert main(["generate", str(tiny_model_dir), "--prompt", "the film was", "--max-new-tokens", "4", *extra]) == 0
        assert capsys.readouterr().out.startswith("### the film was\n")


def test_a_reward_model_is_refused_as_a_generator(tiny_model_dir, tmp_path, capsys):
    """Its adapter was trained under a score head: sampling from it gives fluent-looking noise, silently."""
    import json

    from alignkit.cli import main

    stage = tmp_path / "reward"
    stage.mkdir()
    (stage / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path": str(tiny_model_dir)}))
    (stage / "stage.json").write_text(json.dumps({"complete": True, "kind": "reward", "name": "reward", "base": str(tiny_model_dir)}))
    assert main(["generate", str(stage), "--prompt", "the film was"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{stage} is a reward model (a scorer, not a policy): generate from a policy stage such as sft, "
                        f"dpo or ppo, and use it as a judge with --judge reward:{stage}") and len(err.splitlines()) == 1
    # merged (alignkit merge): a full sequence-classification model
    merged = tmp_path / "merged_reward"
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    assert main(["generate", str(merged), "--prompt", "the film was"]) == 2
    assert "is a reward model" in capsys.readouterr().err


def test_samples_keep_exactly_the_text_that_was_sampled(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompts = ["the film was", "the music", "i thought the story"]
    result = generate_batch(model, tokenizer, prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3,
                                                                      num_return_sequences=4))
    for text, ids in zip(result.texts, result.response_ids):
        assert text == tokenizer.decode(ids, skip_special_tokens=True)  # not trimmed
    # A raw continuation begins with the space between the prompt's last word and the next one; trimmed, the
    # stored pair would glue them ("wasgreat") and no longer continue its prompt as sampled.
    assert any(text.startswith(" ") for text in result.texts)
    for prompt, text, ids in zip([p for p in prompts for _ in range(4)], result.texts, result.response_ids):
        if ids and tokenizer.eos_token_id not in ids:
            assert tokenizer(prompt + text, add_special_tokens=False)["input_ids"][: len(encode_prompt(tokenizer, prompt))] \
                == encode_prompt(tokenizer, prompt)
