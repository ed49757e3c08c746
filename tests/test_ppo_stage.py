"""PPO on the tiny 4-bit model with a programmatic reward: it learns, the reference stays put,
the base weights exist once, and a NaN reward stops the run with its last good checkpoint kept."""

import gc
import json
import math

import pytest
import torch

from alignkit.artifacts import last_complete_checkpoint
from alignkit.errors import TrainingDiverged
from alignkit.modeling import ModelSettings, PeftSettings, load_base_model, load_tokenizer
from alignkit.ppo.config import PPOConfig
from alignkit.ppo.trainer import PPOTrainer

# lm_head is a target too: the tiny model is random, and its logits are too flat for the
# decoder-only LoRA to move them far in a dozen steps. Real recipes keep all-linear.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
PROMPTS = [f"{q} {s}?" for q in ("Describe", "Tell me about") for s in
           ("the film", "the music", "the plot", "the cast", "the book", "the show", "the food", "the room")]
TARGET_CHAR = "e"


def char_reward(prompts, responses):
    """10 x the share of characters that are 'e', over the response's text without its surrounding white space
    (a sample keeps the space that continues its prompt): dense enough to learn from a random tiny model."""
    return [10.0 * sum(c == TARGET_CHAR for c in r.strip()) / max(1, len(r.strip())) for r in responses]


def peft_settings():
    return PeftSettings(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)


@pytest.fixture(scope="module")
def parent_adapter(tmp_path_factory, tiny_model_dir):
    """A stand-in SFT stage adapter (random LoRA B, so policy != base) + tokenizer."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("sft")
    base = load_base_model(ModelSettings(base=str(tiny_model_dir), quantization="none"))
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(str(out))
    load_tokenizer(str(tiny_model_dir)).save_pretrained(str(out))
    return out


def config(**kw):
    values = dict(steps=12, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-2,
                  max_new_tokens=12, init_kl_coef=0.01, save_steps=100, min_reward_accuracy=0.0, seed=0)
    values.update(kw)
    return PPOConfig(**values)


def params4bit_in_memory() -> list:
    import bitsandbytes as bnb

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, bnb.nn.Params4bit)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, parent_adapter):
    stage_dir = tmp_path_factory.mktemp("ppo")
    counts = {}
    # 4-bit tensors other tests of the session left alive are not ours to count; holding them
    # here keeps their ids from being reused by the tensors this run creates.
    earlier = params4bit_in_memory()

    def on_step(trainer, step, metrics):
        if step == 1:  # mid-run: every role has done forward passes, the optimizer holds state
            seen = {id(o) for o in earlier}
            counts["params4bit"] = sum(id(o) not in seen for o in params4bit_in_memory())

    trainer = PPOTrainer(config(), ModelSettings(base=str(tiny_model_dir), quantization="4bit"), peft_settings(),
                         prompts=PROMPTS, stage_dir=stage_dir, reward=char_reward, policy_adapter=parent_adapter,
                         seed=0, on_step=on_step)
    ref_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".reference." in n}
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".policy." in n}
    metrics = trainer.train()
    trainer.save()
    del earlier
    return {"trainer": trainer, "metrics": metrics, "dir": stage_dir, "counts": counts,
            "ref_before": ref_before, "policy_before": policy_before}


@pytest.mark.slow
def test_ppo_raises_the_reward(trained):
    rewards = [h["mean_reward"] for h in trained["trainer"].history]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    # Random responses score ~0.8 with a batch std of ~0.4: a 3-step mean of 48 responses has a
    # standard error of ~0.06, so +0.5 is ~8 standard errors (seeded: this run gives ~+0.7).
    noise = max(trained["trainer"].history[0]["reward_std"], 0.1) / math.sqrt(3 * 16)
    assert last > first + max(0.5, 6 * noise), rewards
    assert trained["metrics"]["mean_reward"] > trained["metrics"]["mean_reward_first"]


@pytest.mark.slow
def test_reference_unchanged_policy_moved(trained):
    params = dict(trained["trainer"].model.named_parameters())
    assert trained["ref_before"], "no reference adapter"
    for n, before in trained["ref_before"].items():
        assert torch.equal(params[n].detach(), before), n
    moved = sum((params[n].detach() - b).norm().item() for n, b in trained["policy_before"].items())
    assert moved > 1e-3


@pytest.mark.slow
def test_base_weights_loaded_once(trained):
    import bitsandbytes as bnb

    model = trained["trainer"].model
    layers = {id(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    config = model.get_base_model().config
    assert len(layers) == 7 * config.num_hidden_layers  # q k v o gate up down per layer; lm_head stays unquantized
    # Every 4-bit tensor alive in the process during PPO: exactly one per base layer, for four roles.
    assert trained["counts"]["params4bit"] == len(layers)


@pytest.mark.slow
def test_stage_outputs_and_logs(trained):
    d = trained["dir"]
    assert (d / "adapter_config.json").exists() and (d / "adapter_model.safetensors").exists()
    assert (d / "tokenizer_config.json").exists()
    assert (d / "value" / "adapter_model.safetensors").exists() and (d / "value" / "value_head.safetensors").exists()
    assert any((d / "logs").iterdir())
    lines = [json.loads(l) for l in (d / "ppo_log.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for key in ("mean_reward", "kl", "entropy", "policy_loss", "value_loss", "clip_frac", "approx_kl",
                "response_length", "kl_coef", "samples"):
        assert key in lines[-1], key
    assert lines[-1]["samples"] and "response" in lines[-1]["samples"][0]
    # The top-level policy adapter is a model spec: it loads and generates.
    from alignkit.generation import SamplingParams, generate_from_spec

    assert len(generate_from_spec(str(d), ["Describe the film?"], SamplingParams(max_new_tokens=4))) == 1


@pytest.mark.slow
def test_nan_reward_diverges_keeps_last_checkpoint_and_resumes(tmp_path, tiny_model_dir, parent_adapter):
    calls = {"n": 0}

    def flaky(prompts, responses):
        calls["n"] += 1
        return [math.nan if calls["n"] == 4 else 1.0 for _ in responses]

    settings = ModelSettings(base=str(tiny_model_dir), quantization="4bit")
    cfg = config(steps=5, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, save_steps=2)
    trainer = PPOTrainer(cfg, settings, peft_settings(), prompts=PROMPTS, stage_dir=tmp_path, reward=flaky,
                         policy_adapter=parent_adapter)
    with pytest.raises(TrainingDiverged, match="reward is not finite"):
        trainer.train()
    assert not (tmp_path / "stage.json").exists()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    ckpt = last_complete_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "checkpoint-2"

    resumed = PPOTrainer(cfg, settings, peft_settings(), prompts=PROMPTS, stage_dir=tmp_path,
                         reward=lambda p, r: [1.0] * len(r), policy_adapter=parent_adapter)
    with open(tmp_path / "ppo_log.jsonl", "a") as f:
        f.write('{"step": 3, "mean_rew')  # a line torn by the crash
    resumed.train(resume_from=ckpt)
    assert resumed.step == 5 and [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5]
    # Step 3 was logged before the crash and trained again after the resume: it is logged once.
    logged = [json.loads(line)["step"] for line in (tmp_path / "ppo_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5]
    # Resumed weights are the checkpoint's, not the fresh parent's: step 3 started where step 2 ended.
    assert resumed.kl_ctl.value == pytest.approx(trainer.kl_ctl.value)


def test_ppo_config_rejects_bad_values():
    with pytest.raises(ValueError):
        PPOConfig(mini_batch_size=32, rollout_batch_size=16)
    with pytest.raises(ValueError):
        PPOConfig(temperature=0)
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(rollout_batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        PPOConfig(rollout_batch_size=12, mini_batch_size=4, gradient_accumulation_steps=2)
    assert all(f.metadata.get("help") for f in __import__("dataclasses").fields(PPOConfig))


@pytest.mark.slow
def test_minibatch_over_ratio_threshold_is_skipped(tmp_path, tiny_model_dir, parent_adapter):
    # ratio starts at exactly 1 (no dropout, same adapter): a threshold below 1 skips every minibatch.
    cfg = config(steps=1, rollout_batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, ratio_threshold=0.5)
    trainer = PPOTrainer(cfg, ModelSettings(base=str(tiny_model_dir), quantization="4bit"), peft_settings(), prompts=PROMPTS,
                         stage_dir=tmp_path, reward=char_reward, policy_adapter=parent_adapter)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".policy." in n}
    trainer.train()
    assert trainer.history[0]["skipped_minibatches"] == 2
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n].detach(), b) for n, b in before.items())


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_role_scores_what_the_sequence_classifier_scores(tmp_path, tiny_model_dir, pad_is_eos):
    """PPO's reward role pools the token transformers' *ForSequenceClassification (and so TRL's
    RewardTrainer) trained the head on — also when pad == EOS, where that is the token before EOS."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from alignkit.reward_model import reward_input_ids

    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token  # what load_tokenizer does for Llama 3 / Mistral tokenizers
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1,
                                                                    pad_token_id=tokenizer.pad_token_id)
    reward = get_peft_model(classifier, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in reward.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    reward.save_pretrained(str(tmp_path / "reward"))
    trainer = PPOTrainer(config(), ModelSettings(base=str(tiny_model_dir), quantization="none"), peft_settings(),
                         prompts=PROMPTS, stage_dir=tmp_path / "ppo", reward=tmp_path / "reward", tokenizer=tokenizer)
    prompts = ["Describe the film?", "Tell me about the book and the music?"]  # different lengths: padding matters
    responses = ["It was good", "A long story"]
    reference = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1,
                                                           pad_token_id=tokenizer.pad_token_id),
        str(tmp_path / "reward")).eval()
    with torch.no_grad():
        expected = [reference(input_ids=torch.tensor([reward_input_ids(tokenizer, p, r)])).logits[0, 0].item()
                    for p, r in zip(prompts, responses)]
    assert trainer.score(prompts, responses).tolist() == pytest.approx(expected, abs=1e-4)


def test_parent_modules_to_save_stay_frozen_with_a_warning(tmp_path, tiny_model_dir, caplog):
    from peft import LoraConfig, get_peft_model

    base = load_base_model(ModelSettings(base=str(tiny_model_dir), quantization="none"))
    parent = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    parent.save_pretrained(str(tmp_path / "sft"))
    load_tokenizer(str(tiny_model_dir)).save_pretrained(str(tmp_path / "sft"))
    with caplog.at_level("WARNING", logger="alignkit"):
        trainer = PPOTrainer(config(), ModelSettings(base=str(tiny_model_dir), quantization="none"),
                             PeftSettings(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                             prompts=PROMPTS, stage_dir=tmp_path / "ppo", reward=char_reward,
                             policy_adapter=tmp_path / "sft")
    assert "modules_to_save (lm_head)" in caplog.text
    trainer._use("policy")
    copies = [n for n, p in trainer.model.named_parameters() if ".modules_to_save." in n]
    assert copies and not any(p.requires_grad for n, p in trainer.model.named_parameters() if n in copies)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in trainer.frozen_copies)
