"""Reward models: a sequence-scoring head on the base, as the reward stage trains and saves it.

A reward stage directory holds a PEFT adapter of task SEQ_CLS whose
`modules_to_save=["score"]` carries the score head (a Linear(hidden, 1) applied
to the hidden state of the last non-pad token), plus tokenizer files and
stage.json. Everything that reads a reward stage goes through this module:

- `load_reward_scorer(stage_dir).score(prompts, responses)` — batched scores
  (PPO's callers, `alignkit compare --judge reward:STAGE`, the demo);
- `reward_input_ids(...)` — the exact token sequence the reward trainer scored
  (TRL's RewardTrainer: prompt + response through the chat template, or plain
  text + EOS), so a response is scored the way the model was trained;
- `last_token_index`, `reward_stage_weights` — what PPO needs to run the reward
  role on its one shared base (adapter weights + a separate head).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from alignkit.errors import UserError

log = logging.getLogger("alignkit")

# Held-out pairwise accuracy below this is "near chance": the reward stage warns and PPO's gate refuses by default.
NEAR_CHANCE_ACCURACY = 0.6


def reward_input_ids(tokenizer, prompt: Any, response: Any) -> list[int]:
    """Token ids of (prompt, response) exactly as TRL's RewardTrainer builds them from a preference row.

    Conversational (prompt is a message list): prompt + the assistant reply through
    the chat template. Plain text: prompt + response + EOS (EOS added if missing).
    """
    if isinstance(prompt, list):
        reply = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        return list(tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"])
    if isinstance(response, list):
        raise UserError("a conversational response (message list) needs a conversational prompt (message list)")
    text = prompt + response
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return list(tokenizer(text=text)["input_ids"])


def last_token_index(input_ids, pad_token_id: int):
    """Index of the rightmost non-pad token per row — the position transformers' *ForSequenceClassification scores."""
    import torch

    non_pad = (input_ids != pad_token_id).long()
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int):
    """(input_ids, attention_mask) right-padded to the longest sequence."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def read_reward_stage(stage_dir: str | Path) -> dict:
    """The stage.json of a complete reward stage; a clear error for anything else."""
    stage_dir = Path(stage_dir)
    path = stage_dir / "stage.json"
    if not path.exists():
        raise UserError(f"reward stage {stage_dir}: no stage.json (not a stage directory)")
    stage = json.loads(path.read_text())
    if not stage.get("complete"):
        raise UserError(f"reward stage {stage_dir} is not complete")
    if stage.get("kind") != "reward":
        raise UserError(f"{stage_dir} is a {stage.get('kind')!r} stage, not a reward stage: "
                        f"point `reward:` at a stage of kind reward")
    return stage


def heldout_accuracy(stage: dict) -> float | None:
    value = stage.get("metrics", {}).get("heldout_accuracy", stage.get("metrics", {}).get("eval_accuracy"))
    return float(value) if isinstance(value, (int, float)) else None


def reward_stage_weights(stage_dir: str | Path) -> tuple[dict, dict, Any]:
    """(adapter_config, adapter tensors without the head, head tensors {"weight"[, "bias"]}) of a reward stage."""
    from safetensors.torch import load_file

    stage_dir = Path(stage_dir)
    cfg_path, weights_path = stage_dir / "adapter_config.json", stage_dir / "adapter_model.safetensors"
    if not cfg_path.exists() or not weights_path.exists():
        raise UserError(f"reward stage {stage_dir} has no PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    config = json.loads(cfg_path.read_text())
    tensors = load_file(str(weights_path))
    head = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items() if k.rsplit(".", 2)[-2] == "score"}
    if "weight" not in head:
        raise UserError(f"reward stage {stage_dir}: the adapter has no score head (modules_to_save=['score'])")
    adapter = {k: v for k, v in tensors.items() if k.rsplit(".", 2)[-2] != "score"}
    return config, adapter, head


@dataclass
class RewardScorer:
    """A loaded reward model: `score(prompts, responses)` -> one float per pair, batched."""

    model: Any
    tokenizer: Any
    batch_size: int = 16
    stage: dict | None = None

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [reward_input_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        return self.score_ids(encoded)

    def score_ids(self, encoded: Sequence[Sequence[int]]) -> list[float]:
        import torch

        device = next(self.model.parameters()).device
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores: list[float] = [0.0] * len(encoded)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                ids, mask = pad_right([encoded[i] for i in batch], pad)
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for i, v in zip(batch, logits[:, 0].float().cpu().tolist()):
                    scores[i] = v
        return scores

    __call__ = score


def load_reward_scorer(stage_dir: str | Path, *, quantization: str | None = None, batch_size: int = 16) -> RewardScorer:
    """Load a reward stage (its recorded base and quantization, its adapter + score head) for scoring."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.modeling import ModelSettings, load_base_model, load_tokenizer, resolve_model_spec

    stage = read_reward_stage(stage_dir)
    resolved = resolve_model_spec(str(stage_dir))
    settings = dict(resolved.model_settings)
    settings["base"] = resolved.base
    if quantization is not None:
        settings["quantization"] = quantization
    tokenizer = load_tokenizer(str(stage_dir), padding_side="right")
    model = load_base_model(ModelSettings(**settings), model_class=AutoModelForSequenceClassification,
                            num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model.config.pad_token_id = tokenizer.pad_token_id
    if resolved.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.adapter_dir), is_trainable=False)
    model.eval()
    return RewardScorer(model=model, tokenizer=tokenizer, batch_size=batch_size, stage=stage)


class AttachedReward:
    """The reward stage as one more adapter (+ its score head) on an existing PeftModel: a reward on the same base.

    For trainers that take reward callables (TRL's GRPO / RLOO): `scores = reward(prompts, completions)`.
    Scoring switches the model to the `reward` adapter under no_grad and back to
    the adapter that was active, so the base weights are shared with the policy.
    """

    def __init__(self, peft_model, tokenizer, reward_stage: str | Path, *, name: str = "reward", batch_size: int = 8):
        import copy

        import peft

        read_reward_stage(reward_stage)
        config = copy.deepcopy(peft.PeftConfig.from_pretrained(str(reward_stage)))
        config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
        if hasattr(config, "lora_dropout"):
            config.lora_dropout = 0.0  # a reward must not be stochastic, even while the policy trains with dropout
        _, tensors, head = reward_stage_weights(reward_stage)
        previous = peft_model.active_adapter
        peft_model.add_adapter(name, config)
        result = peft.set_peft_model_state_dict(peft_model, tensors, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise UserError(f"reward stage {reward_stage}: its adapter does not fit this base (e.g. {unexpected[0]})")
        peft_model.set_adapter(previous)
        lm = peft_model.get_base_model()
        hidden = lm.config.get_text_config().hidden_size
        device = next(peft_model.parameters()).device
        self.head = frozen_score_head(head["weight"], head.get("bias"), hidden).to(device)
        self.model, self.tokenizer, self.name, self.batch_size = peft_model, tokenizer, name, batch_size
        self.decoder = getattr(lm, lm.base_model_prefix)
        self.__name__ = "reward_model"  # TRL names reward columns in its logs after the callable

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        import torch

        encoded = [reward_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        previous = self.model.active_adapter
        device = next(self.model.parameters()).device
        scores: list[float] = []
        try:
            self.model.set_adapter(self.name, inference_mode=True)
            with torch.no_grad():
                for start in range(0, len(encoded), self.batch_size):
                    ids, mask = pad_right(encoded[start : start + self.batch_size], self.tokenizer.pad_token_id)
                    ids, mask = ids.to(device), mask.to(device)
                    hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                    last = last_token_index(ids, self.tokenizer.pad_token_id)
                    picked = hidden[torch.arange(ids.shape[0], device=device), last].float()
                    scores += self.head(picked).squeeze(-1).cpu().tolist()
        finally:
            self.model.set_adapter(previous)
        return scores


def frozen_score_head(weight, bias, hidden: int):
    """A reward stage's score head as a frozen float32 nn.Linear(hidden, 1) (bias None: it has none)."""
    import torch

    head = torch.nn.Linear(hidden, 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight.float().reshape(1, hidden))
        if bias is not None:
            head.bias.copy_(bias.float().reshape(1))
    return head.requires_grad_(False)


class RewardEnsemble:
    """K reward stages as K adapters, each with its score head, on one base loaded once: K reward models for
    the memory of one base plus K small adapters, as the PPO roles share theirs.

    `scores(prompts, responses)` is a (K, N) array, one row per member, each scored exactly as that member's
    stage trained (`reward_input_ids`); `conservative(...)` is mean - lam * std over members, the ensemble as
    a reward that does not chase what one member alone likes (reward over-optimisation)."""

    def __init__(self, model, tokenizer, members: list[AttachedReward], stage_dirs: list[Path]):
        self.model, self.tokenizer, self.members, self.stage_dirs = model, tokenizer, members, stage_dirs

    def __len__(self) -> int:
        return len(self.members)

    def scores(self, prompts: Sequence[Any], responses: Sequence[Any]):
        import numpy as np

        return np.array([member(prompts, responses) for member in self.members])

    def conservative(self, prompts: Sequence[Any], responses: Sequence[Any], lam: float = 1.0) -> list[float]:
        return conservative_reward(self.scores(prompts, responses), lam).tolist()


def conservative_reward(scores, lam: float):
    """mean - lam * std over the members (rows) of a (K, N) array of rewards: high only where every member
    agrees a response is good (the population std, so two members that agree exactly give their shared score)."""
    import numpy as np

    scores = np.asarray(scores, dtype=float)
    return scores.mean(axis=0) - lam * scores.std(axis=0)


def load_reward_ensemble(stage_dirs: Sequence[str | Path], *, quantization: str | None = None,
                         batch_size: int = 8) -> RewardEnsemble:
    """Load reward stages that share a base (and quantization) onto one copy of it.

    The base is wrapped as a PeftModel around a rank-1 host adapter (PEFT attaches adapters to a PeftModel),
    each member is attached beside it as `member-K` with its head, and the host is deleted again."""
    import peft
    from peft import LoraConfig

    from alignkit.modeling import ModelSettings, load_base_model, load_tokenizer, resolve_model_spec

    stage_dirs = [Path(d) for d in stage_dirs]
    if len(stage_dirs) < 2:
        raise UserError(f"a reward ensemble needs 2 or more reward stages, got {len(stage_dirs)}")
    for d in stage_dirs:
        read_reward_stage(d)
    resolved = [resolve_model_spec(str(d)) for d in stage_dirs]
    loads = {(r.base, r.model_settings.get("quantization")) for r in resolved}
    if len(loads) > 1:
        raise UserError(f"reward ensemble: its stages must share one base and quantization, got {sorted(map(str, loads))}")
    settings = {**resolved[0].model_settings, "base": resolved[0].base}
    if quantization is not None:
        settings["quantization"] = quantization
    tokenizer = load_tokenizer(str(stage_dirs[0]), padding_side="right")
    base = load_base_model(ModelSettings(**settings))
    first = peft.PeftConfig.from_pretrained(str(stage_dirs[0]))
    host = LoraConfig(r=1, target_modules=first.target_modules, task_type="CAUSAL_LM", inference_mode=True)
    model = peft.get_peft_model(base, host, adapter_name="_host")
    members = [AttachedReward(model, tokenizer, d, name=f"member-{k}", batch_size=batch_size)
               for k, d in enumerate(stage_dirs)]
    model.set_adapter("member-0")
    model.delete_adapter("_host")
    model.eval()
    return RewardEnsemble(model, tokenizer, members, stage_dirs)
