"""TRL 0.29.1's PPOTrainer, set up as its examples/scripts/ppo/ppo.py does with PEFT; run by bench_ppo_peer.

Runs inside the peer environment (benchmarks/peer_setup.py), never the project's: it imports TRL 0.29.1,
transformers, peft and bitsandbytes from there, and from this repository only benchmarks.bench_ppo_roles'
memory probes (standard library, psutil and bitsandbytes).

    <peer python> benchmarks/peer_trl_ppo.py --spec SPEC.json     # last stdout line: RESULT {json}

The example's layout: the policy is the SFT checkpoint with a fresh LoRA adapter (peft_config), here on a 4-bit
NF4 base (get_quantization_config); the reference is that policy with its adapter disabled (ref_model=None);
the value model and the reward model are both AutoModelForSequenceClassification(num_labels=1) loaded from the
reward checkpoint in full precision, the value model trained in full. Differences from the example, each
because the benchmark needs it: prompts come from a JSONL file (the demo's) instead of a hub dataset; the
tokenizer's own pad token is kept (it has one; the example adds "[PAD]" for Pythia, which has none);
stop_token="eos" so rollouts end at EOS as alignkit's do; bf16 off (CPU, float32 as alignkit's side);
lr_scheduler_type="constant" (alignkit's PPO keeps its learning rate); no sample generations, no saving
except the policy adapters the quality curve needs (saved outside the timed steps).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ppo_roles import PeakRSS, _trim, anon_rss, materialize  # noqa: E402


def encode(tokenizer, prompt) -> list[int]:
    """Prompt ids as alignkit.generation.encode_prompt builds them: a chat prompt through its template (its own
    special tokens), plain text with the tokenizer's special tokens and no trailing EOS."""
    if not isinstance(prompt, str):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt)["input_ids"])
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids


def _prompt_of(row: dict):
    return row["prompt"] if "prompt" in row else row["messages"]


def build_trainer(spec: dict, callback):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import ModelConfig, get_peft_config, get_quantization_config
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = spec["settings"]
    model_args = ModelConfig(model_name_or_path=spec["sft_model"], dtype="float32", use_peft=True, lora_r=s["lora_r"],
                             lora_alpha=s["lora_alpha"], lora_dropout=0.0, lora_target_modules="all-linear",
                             load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["sft_model"], padding_side="left")
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1)
    policy = AutoModelForCausalLM.from_pretrained(spec["sft_model"], quantization_config=get_quantization_config(model_args),
                                                  dtype=torch.float32)
    prompts = [_prompt_of(json.loads(line)) for line in Path(spec["prompts"]).read_text().splitlines() if line.strip()]
    train = Dataset.from_dict({"input_ids": [encode(tokenizer, p) for p in prompts]})
    args = PPOConfig(
        output_dir=spec["out_dir"], seed=s["seed"], learning_rate=s["learning_rate"], lr_scheduler_type="constant",
        per_device_train_batch_size=s["rollout_batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["rollout_batch_size"] // s["mini_batch_size"], num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["steps"] * s["rollout_batch_size"], local_rollout_forward_batch_size=s["rollout_batch_size"],
        response_length=s["max_new_tokens"], temperature=s["temperature"], kl_coef=s["kl_coef"], kl_estimator="k1",
        missing_eos_penalty=s["missing_eos_penalty"], stop_token="eos", num_sample_generations=0,
        save_strategy="no", report_to="none", bf16=False, logging_steps=1, disable_tqdm=True,
        sft_model_path=spec["sft_model"], reward_model_path=spec["reward_model"])
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward_model,
                         value_model=value_model, train_dataset=train, eval_dataset=train.select(range(min(8, len(train)))),
                         peft_config=get_peft_config(model_args), callbacks=[callback])
    return trainer


def make_callback(spec: dict):
    """Per-step wall times (the policy's checkpoint saves excluded) and the policy adapter every `eval_every` steps."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.started = time.time()
            self.step_seconds: list[float] = []
            self.metrics: list[dict] = []
            self.checkpoints: dict[int, str] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                self.metrics.append({"step": state.global_step, "score": logs["objective/scores"], "kl": logs["objective/kl"]})

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds.append(time.time() - self.started)
            step, every = state.global_step, spec["eval_every"]
            if every and (step % every == 0 or step == state.max_steps):
                out = Path(spec["checkpoints"]) / f"step-{step}"
                self.trainer.model.policy.save_pretrained(str(out))
                self.checkpoints[step] = str(out)
            self.started = time.time()

    return StepClock()


def run(spec: dict) -> dict:
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    import bitsandbytes  # noqa: F401  everything loading imports, before the baseline RSS is taken
    import peft  # noqa: F401
    import trl.experimental.ppo  # noqa: F401

    _trim()
    rss0 = anon_rss()
    clock = make_callback(spec)
    trainer = build_trainer(spec, clock)
    clock.trainer = trainer
    for model in (trainer.model.policy, trainer.value_model, trainer.reward_model):
        materialize(model)  # every model's own copy of its weights, as on a GPU (see bench_ppo_roles)
    _trim()
    with PeakRSS() as peak:
        trainer.train()
    timed = clock.step_seconds[1:] or clock.step_seconds
    return {
        "seconds_per_step": sum(timed) / len(timed),
        "model_memory_mb": (peak.peak - rss0) / 2**20,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_reward": clock.metrics[-1]["score"] if clock.metrics else float("nan"),
        "train_kl": clock.metrics[-1]["kl"] if clock.metrics else float("nan"),
        "checkpoints": {str(k): v for k, v in clock.checkpoints.items()},
    }


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    spec = json.loads(Path(p.parse_args().spec).read_text())
    result = run(spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
