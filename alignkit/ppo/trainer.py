"""PPO (InstructGPT / Ziegler et al.) over ONE base model with four roles as PEFT adapters.

    base (loaded once, 4-bit by default)
      ├── policy     LoRA, trainable, starts from the parent (SFT/DPO) adapter
      ├── reference  LoRA, frozen, the parent adapter again (or: all adapters disabled when there is no parent)
      ├── reward     LoRA, frozen, the reward stage's adapter  + score head  nn.Linear(hidden, 1) on the last token
      └── value      LoRA, trainable, initialised from reward   + value head  nn.Linear(hidden, 1) on every token

A role is switched with `set_adapter`; no role ever gets its own copy of the
base weights. The reward can also be a plain callable (prompts, responses) ->
list[float] (tests, programmatic rewards); the value adapter then starts as a
fresh LoRA adapter and its head at zero.

One iteration: sample rollout_batch_size responses from the policy; score them;
per-token KL against the reference; rewards = -kl_coef * KL per token + score
on the last token; values; GAE; whitened advantages; ppo_epochs passes over
shuffled minibatches with the clipped policy and value losses. Metrics, settings
and sample responses go to the stage's trackers (alignkit.tracking; TensorBoard in
stage_dir/logs by default), stage_dir/ppo_log.jsonl and a tqdm bar; completions of
fixed prompts every N steps (train.log_completions) to completions.jsonl;
checkpoints to stage_dir/checkpoints/checkpoint-N (atomic, trainer_state.json last).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from alignkit.artifacts import kept_checkpoint_note
from alignkit.errors import TrainingDiverged, UserError
from alignkit.ppo import core
from alignkit.ppo.config import PPOConfig
from alignkit.reward_model import frozen_score_head
from alignkit.tracking import RunIdentity, TrackerRuns

if TYPE_CHECKING:
    from alignkit.completions import CompletionLog

log = logging.getLogger("alignkit")

ROLES = ("policy", "reference", "reward", "value")
TRAINABLE_ROLES = ("policy", "value")


def _role_param_pattern(role: str):
    # LoRA / DoRA parameter names carry the adapter name: ...q_proj.lora_A.<role>.weight
    return re.compile(rf"\.lora_\w+\.{re.escape(role)}(\.|$)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def split_reward_adapter(reward_dir: Path) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """(LoRA config as CAUSAL_LM, LoRA tensors, score weight [1, hidden], score bias or None) of a SEQ_CLS reward adapter."""
    from peft import PeftConfig

    reward_dir = Path(reward_dir)
    weights_file = reward_dir / "adapter_model.safetensors"
    if not (reward_dir / "adapter_config.json").exists() or not weights_file.exists():
        raise UserError(f"reward stage {reward_dir} has no PEFT adapter (adapter_config.json + adapter_model.safetensors)")
    config = PeftConfig.from_pretrained(str(reward_dir))
    if getattr(config, "peft_type", None) is None or str(config.peft_type).split(".")[-1] not in ("LORA",):
        raise UserError(f"reward stage {reward_dir}: PPO roles need a LoRA/DoRA reward adapter, found {config.peft_type}")
    tensors = _load_safetensors(weights_file)
    score_w = score_b = None
    lora = {}
    for key, t in tensors.items():
        if "lora_" in key:
            lora[key] = t
        elif re.search(r"(^|\.)score\.(modules_to_save\.\w+\.)?weight$", key):
            score_w = t
        elif re.search(r"(^|\.)score\.(modules_to_save\.\w+\.)?bias$", key):
            score_b = t
    if score_w is None:
        raise UserError(f"reward stage {reward_dir}: adapter has no score head weight (expected modules_to_save=['score'])")
    if score_w.shape[0] != 1:
        raise UserError(f"reward stage {reward_dir}: score head has {score_w.shape[0]} outputs, expected 1")
    config.task_type = "CAUSAL_LM"
    config.modules_to_save = None
    config.inference_mode = False
    return config, lora, score_w, score_b


def _logged_step(line: str) -> float:
    """The step of a ppo_log.jsonl line; a torn line (the process was killed mid-write) counts as after every step."""
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:
        return math.inf


class PPOTrainer:
    """PPO on one base. `reward` is a reward stage/adapter directory or a callable (prompts, responses) -> scores."""

    def __init__(
        self,
        config: PPOConfig,
        model_settings,
        peft_settings,
        *,
        prompts: Sequence[Any],
        stage_dir: str | Path,
        reward: str | Path | Callable[[list, list[str]], Sequence[float]],
        policy_adapter: str | Path | None = None,
        tokenizer=None,
        seed: int = 0,
        on_step: Callable[["PPOTrainer", int, dict], None] | None = None,
        trackers: TrackerRuns | None = None,
        completions: CompletionLog | None = None,
    ):
        from alignkit.modeling import (load_base_model, load_tokenizer, peft_config, prepare_for_training, resolve_base,
                                       tokenizer_source)

        self.config = config
        self.stage_dir = Path(stage_dir)
        self.prompts = list(prompts)
        if not self.prompts:
            raise UserError("PPO needs at least one prompt")
        self.seed = config.seed if config.seed is not None else seed
        self.on_step = on_step
        # Without the stage's trackers (a PPOTrainer built outside a recipe), TensorBoard alone, as a stage's default.
        self.trackers = trackers or TrackerRuns(("tensorboard",), RunIdentity("alignkit", self.stage_dir.name, {}),
                                                self.stage_dir / "logs", hf_logs=False)
        self.completions = completions
        if completions is not None and completions.score is None:
            completions.score = self.score
        if peft_settings.method not in ("lora", "dora"):
            raise UserError(f"PPO keeps its roles as LoRA adapters on one base: peft.method must be lora or dora, not {peft_settings.method}")
        torch.manual_seed(self.seed)
        random.seed(self.seed)

        self.tokenizer = tokenizer or load_tokenizer(tokenizer_source(policy_adapter, resolve_base(model_settings.base)),
                                                     padding_side="left")

        # One base, loaded once.
        base = load_base_model(model_settings)
        base = prepare_for_training(base, model_settings, gradient_checkpointing=False)
        base.config.use_cache = True
        from peft import PeftModel, get_peft_model

        self.has_reference_adapter = False
        if policy_adapter is not None:
            policy_adapter = Path(policy_adapter)
            if not (policy_adapter / "adapter_config.json").exists():
                raise UserError(f"PPO policy parent {policy_adapter} has no adapter; PPO needs an adapter (LoRA) parent or none")
            model = PeftModel.from_pretrained(base, str(policy_adapter), adapter_name="policy", is_trainable=True)
            model.load_adapter(str(policy_adapter), adapter_name="reference", is_trainable=False)
            self.has_reference_adapter = True
            self.new_adapter_config = peft_config(peft_settings)
        else:
            self.new_adapter_config = peft_config(peft_settings)
            model = get_peft_model(base, self.new_adapter_config, adapter_name="policy")

        hidden = base.config.hidden_size
        self.reward_fn = None
        self.extra_rewards: list[tuple[str, torch.nn.Linear]] = []
        if callable(reward):
            self.reward_fn = reward
            self.reward_head = None
            model.add_adapter("value", peft_config(peft_settings))
            self.value_head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            self.reward_source = "callable"
        else:
            # An ensemble (a list of reward stages): the first is `reward` and starts the value role; the others
            # are frozen adapters `reward_1`, ... with their own heads, scored beside it (see score()).
            members = [Path(r) for r in reward] if isinstance(reward, (list, tuple)) else [Path(reward)]
            rconf, lora, score_w, score_b = split_reward_adapter(members[0])
            import copy

            for role in ("reward", "value"):  # the value role starts as the reward model
                model.add_adapter(role, copy.deepcopy(rconf))
                self._load_role_weights(model, role, lora)
            self.reward_head = frozen_score_head(score_w, score_b, hidden)
            self.value_head = torch.nn.Linear(hidden, 1)
            with torch.no_grad():
                self.value_head.weight.copy_(score_w.float())
                self.value_head.bias.copy_(score_b.float() if score_b is not None else torch.zeros(1))
            self.reward_source = str(members[0])
            self.extra_rewards = [self._attach_member(model, f"reward_{k}", d, hidden) for k, d in enumerate(members[1:], 1)]
            if self.extra_rewards:
                self.reward_source = [str(d) for d in members]
        self.model = model
        self.model.eval()  # no dropout: log-probs of rollouts and of updates must agree (ratio 1 at the start)
        device = next(p for p in model.parameters()).device
        self.device = device
        self.value_head.to(device)
        if self.reward_head is not None:
            self.reward_head.to(device)
        for _, head in self.extra_rewards:
            head.to(device)

        named = list(model.named_parameters())
        self.role_params = {role: [p for n, p in named if _role_param_pattern(role).search(n)]
                            for role in (*ROLES, *(name for name, _ in self.extra_rewards))}
        # A parent's modules_to_save (a trained lm_head, embeddings) are full copies: PPO keeps them at the
        # parent's values rather than train or hold optimizer state for them.
        self.frozen_copies = [p for n, p in named if ".modules_to_save." in n]
        if self.frozen_copies:
            saved = sorted({n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n, _ in named if ".modules_to_save." in n})
            log.warning("PPO trains LoRA weights only: the parent's modules_to_save (%s) stay at the parent's values",
                        ", ".join(saved))
        for role in TRAINABLE_ROLES:
            if not self.role_params[role]:
                raise UserError(f"PPO: no trainable parameters found for the {role} adapter")
        self._use("policy")
        params = self.role_params["policy"] + self.role_params["value"] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        if config.adaptive_kl:
            self.kl_ctl = core.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        else:
            self.kl_ctl = core.FixedKLController(config.init_kl_coef)
        self.step = 0
        self.history: list[dict] = []

    # -- roles ----------------------------------------------------------------------------------

    def _attach_member(self, model, name: str, reward_dir: Path, hidden: int) -> tuple[str, torch.nn.Linear]:
        """One more reward stage of an ensemble as a frozen adapter `name` with its score head."""
        import copy

        rconf, lora, score_w, score_b = split_reward_adapter(reward_dir)
        model.add_adapter(name, copy.deepcopy(rconf))
        self._load_role_weights(model, name, lora)
        return name, frozen_score_head(score_w, score_b, hidden)

    @staticmethod
    def _load_role_weights(model, role: str, lora: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, lora, adapter_name=role)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise UserError(f"reward adapter tensors do not fit the base model (e.g. {unexpected[0]})")

    def _use(self, role: str) -> None:
        """Activate a role's adapter; trainable roles keep requires_grad, frozen ones never get it."""
        if role == "reference" and not self.has_reference_adapter:
            role = "policy"  # callers wrap reference passes in disable_adapter() in this case
        self.model.set_adapter(role)
        for r, params in self.role_params.items():
            for p in params:
                p.requires_grad_(r in TRAINABLE_ROLES)
        for p in self.frozen_copies:  # set_adapter makes the active adapter's copies trainable again
            p.requires_grad_(False)

    def _decoder(self):
        return self.model.get_base_model().get_decoder()

    # -- forward passes -------------------------------------------------------------------------

    @staticmethod
    def _positions(attention_mask):
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def _policy_logits(self, input_ids, attention_mask, response_len: int):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=self._positions(attention_mask),
                         use_cache=False, logits_to_keep=response_len + 1)
        return out.logits[:, :-1].float() / self.config.temperature

    def _logprobs(self, role: str, input_ids, attention_mask, responses):
        R = responses.shape[1]
        if role == "reference" and not self.has_reference_adapter:
            with self.model.disable_adapter():
                logits = self._policy_logits(input_ids, attention_mask, R)
        else:
            self._use(role)
            logits = self._policy_logits(input_ids, attention_mask, R)
        return core.logprobs_from_logits(logits, responses), logits

    def _values(self, input_ids, attention_mask, response_len: int):
        self._use("value")
        h = self._decoder()(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=self._positions(attention_mask), use_cache=False).last_hidden_state
        h = h[:, -response_len - 1 : -1]
        return self.value_head(h.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str]) -> torch.Tensor:
        """Scalar score per (prompt, response), from the callable or the reward adapter + score head."""
        if self.reward_fn is not None:
            scores = torch.tensor([float(s) for s in self.reward_fn(prompts, responses)], dtype=torch.float32)
        else:
            from alignkit.reward_model import last_token_index, pad_right, reward_input_ids

            # Exactly the sequence the reward trainer scored (chat template, or text + EOS).
            ids = [reward_input_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
            input_ids, mask = pad_right(ids, self.tokenizer.pad_token_id)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            # The token the score head was trained on: transformers' sequence classifiers pool the rightmost
            # non-pad token, which is the one before EOS when pad == EOS (Llama 3, Mistral), not EOS itself.
            last = last_token_index(input_ids, self.tokenizer.pad_token_id)
            rows = torch.arange(len(ids), device=self.device)
            members = []
            for role, head in (("reward", self.reward_head), *self.extra_rewards):
                self._use(role)
                h = self._decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
                members.append(head(h[rows, last].float()).squeeze(-1).cpu())
            if len(members) == 1:
                scores = members[0]
            else:
                from alignkit.reward_model import conservative_reward

                scores = torch.tensor(conservative_reward(torch.stack(members).numpy(), self.config.ensemble_lambda),
                                      dtype=torch.float32)
        if len(scores) != len(responses):
            raise UserError(f"reward function returned {len(scores)} scores for {len(responses)} responses")
        return scores

    # -- rollouts -------------------------------------------------------------------------------

    def _prompt_batch(self, step: int) -> list:
        """Prompts of iteration `step` (1-based): consecutive slices of a per-epoch seeded permutation."""
        n, B = len(self.prompts), self.config.rollout_batch_size
        out = []
        for k in range((step - 1) * B, step * B):
            epoch, i = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()
            out.append(self.prompts[perm[i]])
        return out

    @torch.no_grad()
    def rollout(self, prompts: list, step: int) -> dict:
        from alignkit.generation import SamplingParams, generate_batch

        cfg = self.config
        self._use("policy")
        gen = generate_batch(self.model, self.tokenizer, prompts, SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            seed=self.seed * 1000003 + step, batch_size=len(prompts)))
        pad = self.tokenizer.pad_token_id
        B = len(prompts)
        Q = max(len(q) for q in gen.prompt_ids)
        R = max(1, max(len(r) for r in gen.response_ids))
        input_ids = torch.full((B, Q + R), pad, dtype=torch.long)
        attention = torch.zeros((B, Q + R), dtype=torch.long)
        for i, (q, r) in enumerate(zip(gen.prompt_ids, gen.response_ids)):
            input_ids[i, Q - len(q) : Q] = torch.tensor(q, dtype=torch.long)
            attention[i, Q - len(q) : Q] = 1
            if r:
                input_ids[i, Q : Q + len(r)] = torch.tensor(r, dtype=torch.long)
                attention[i, Q : Q + len(r)] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        responses = input_ids[:, Q:]
        mask = attention[:, Q:].float()

        scores = self.score(prompts, gen.texts)
        if not core.is_finite(scores):
            raise TrainingDiverged(f"reward is not finite at PPO step {step} ({scores.tolist()}); "
                                   f"{kept_checkpoint_note(self.stage_dir)}, stage left incomplete")
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~torch.tensor(gen.finished)).float()
        scores = scores.to(self.device)

        logprobs, logits = self._logprobs("policy", input_ids, attention, responses)
        entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
        del logits
        ref_logprobs, _ = self._logprobs("reference", input_ids, attention, responses)
        values = self._values(input_ids, attention, R)

        kl = core.kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * mask
        rewards = -self.kl_ctl.value * kl
        lengths = mask.sum(-1).long()
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(B, device=self.device)
        rewards[rows, last] += scores * (lengths > 0).float()
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        advantages = core.masked_whiten(advantages, mask)
        kl_k1_sum = ((logprobs - ref_logprobs) * mask).sum(-1)
        return {
            "prompts": prompts, "texts": gen.texts, "finished": gen.finished,
            "input_ids": input_ids, "attention": attention, "responses": responses, "mask": mask,
            "logprobs": logprobs, "values": values * mask, "advantages": advantages, "returns": returns,
            "scores": scores, "kl_sum": kl_k1_sum, "entropy": entropy, "lengths": lengths,
        }

    # -- optimisation ---------------------------------------------------------------------------

    def _optimise(self, ro: dict, step: int) -> dict:
        cfg = self.config
        B = ro["input_ids"].shape[0]
        R = ro["responses"].shape[1]
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "value_clip_frac", "ratio")}
        skipped = 0
        gen = torch.Generator().manual_seed(self.seed * 7919 + step)
        accumulated = 0
        self.optimizer.zero_grad(set_to_none=True)
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen).tolist()
            for start in range(0, B, cfg.mini_batch_size):
                idx = torch.tensor(order[start : start + cfg.mini_batch_size], device=self.device)
                ids, att, resp, mask = ro["input_ids"][idx], ro["attention"][idx], ro["responses"][idx], ro["mask"][idx]
                logprobs, _ = self._logprobs("policy", ids, att, resp)
                pl, clip_frac, approx_kl, ratio = core.policy_loss(logprobs, ro["logprobs"][idx], ro["advantages"][idx], mask, cfg.cliprange)
                if not core.is_finite(pl):
                    raise TrainingDiverged(f"policy loss is {pl.item()} at PPO step {step}; {kept_checkpoint_note(self.stage_dir)}, stage left incomplete")
                if ratio.item() > cfg.ratio_threshold:
                    skipped += 1
                    log.warning("PPO step %d: minibatch skipped, mean ratio %.3g > ratio_threshold %.3g", step, ratio.item(), cfg.ratio_threshold)
                    continue
                # Backward per role: the graph of each pass belongs to the adapter active during it.
                (pl / cfg.gradient_accumulation_steps).backward()
                values = self._values(ids, att, R)
                vl, v_clip = core.value_loss(values, ro["values"][idx], ro["returns"][idx], mask, cfg.cliprange_value)
                if not core.is_finite(vl):
                    raise TrainingDiverged(f"value loss is {vl.item()} at PPO step {step}; {kept_checkpoint_note(self.stage_dir)}, stage left incomplete")
                (cfg.vf_coef * vl / cfg.gradient_accumulation_steps).backward()
                accumulated += 1
                if accumulated % cfg.gradient_accumulation_steps == 0:
                    self._optimizer_step(trainable, step)
                for k, v in (("policy_loss", pl), ("value_loss", vl), ("clip_frac", clip_frac), ("approx_kl", approx_kl),
                             ("value_clip_frac", v_clip), ("ratio", ratio)):
                    stats[k].append(float(v.detach()))
        if accumulated % cfg.gradient_accumulation_steps:
            self._optimizer_step(trainable, step)
        out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
        out["skipped_minibatches"] = skipped
        return out

    def _optimizer_step(self, params, step: int) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if any(not torch.isfinite(g).all() for g in grads):
            raise TrainingDiverged(f"non-finite gradient at PPO step {step}; {kept_checkpoint_note(self.stage_dir)}, stage left incomplete")
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- loop -----------------------------------------------------------------------------------

    def train(self, resume_from: str | Path | None = None) -> dict:
        import dataclasses

        from tqdm.auto import tqdm

        cfg = self.config
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.stage_dir / "ppo_log.jsonl"
        if resume_from is not None:
            self.load_checkpoint(Path(resume_from))
        # Steps logged after the checkpoint (or by an earlier attempt, when starting over) are trained
        # again: drop their old lines and TensorBoard events, so every step is logged once.
        if log_path.exists():
            kept = [line for line in log_path.read_text().splitlines() if _logged_step(line) <= self.step]
            tmp = log_path.with_name(log_path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, log_path)
        runs = self.trackers
        runs.purge_step = self.step + 1
        runs.open(hyperparameters=dataclasses.asdict(cfg))
        if self.completions is not None:
            self.completions.restart(self.step)
        jsonl = open(log_path, "a")
        final = None
        bar = tqdm(total=cfg.steps, initial=self.step, desc="ppo", disable=os.environ.get("TQDM_DISABLE") == "1")
        try:
            while self.step < cfg.steps:
                step = self.step + 1
                t0 = time.time()
                prompts = self._prompt_batch(step)
                ro = self.rollout(prompts, step)
                opt = self._optimise(ro, step)
                mean_kl = ro["kl_sum"].mean().item()
                if mean_kl < 0:
                    log.warning("PPO step %d: mean KL estimate is negative (%.4g): the policy samples tokens the "
                                "reference prefers; check sampling settings (temperature/top_p) or use kl_estimator=k3", step, mean_kl)
                kl_coef = self.kl_ctl.value
                self.kl_ctl.update(mean_kl, cfg.rollout_batch_size)
                metrics = {
                    "step": step,
                    "mean_reward": ro["scores"].mean().item(),
                    "reward_std": ro["scores"].std().item() if len(ro["scores"]) > 1 else 0.0,
                    "rlhf_reward": (ro["scores"] - kl_coef * ro["kl_sum"]).mean().item(),
                    "kl": mean_kl,
                    "kl_coef": kl_coef,
                    "entropy": ro["entropy"].item(),
                    "response_length": ro["lengths"].float().mean().item(),
                    "eos_fraction": sum(ro["finished"]) / len(ro["finished"]),
                    "step_seconds": time.time() - t0,
                    **opt,
                }
                self.step = step
                self.history.append(metrics)
                if step % cfg.logging_steps == 0 or step == cfg.steps:
                    self._log_step(runs, jsonl, ro, metrics, step)
                if self.completions is not None and self.completions.due(step):
                    self._use("policy")
                    self.completions.log(step, self.model, self.tokenizer)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['mean_reward']:.3g}", kl=f"{mean_kl:.3g}")
                if self.on_step is not None:
                    self.on_step(self, step, metrics)
                if step % cfg.save_steps == 0 and step < cfg.steps:
                    self.save_checkpoint()
            final = self.final_metrics()
        finally:
            bar.close()
            jsonl.close()
            runs.close(final)
        return final

    def _log_step(self, runs: TrackerRuns, jsonl, ro: dict, metrics: dict, step: int) -> None:
        """A logged step's metrics and first sample_log_count rollouts: ppo_log.jsonl and the stage's trackers."""
        samples = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "response": r, "score": float(s)}
                   for p, r, s in list(zip(ro["prompts"], ro["texts"], ro["scores"].tolist()))[: self.config.sample_log_count]]
        runs.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step, prefix="ppo/")
        if samples:
            runs.log_table("ppo/samples", ["prompt", "response", "score"],
                           [[s["prompt"], s["response"], s["score"]] for s in samples], step)
        jsonl.write(json.dumps({**metrics, "samples": samples}) + "\n")
        jsonl.flush()

    def final_metrics(self) -> dict:
        if not self.history:
            return {"global_step": self.step}
        window = self.history[-max(1, len(self.history) // 10):]
        keys = [k for k in self.history[-1] if k != "step"]
        out = {}
        for k in keys:
            vals = [h[k] for h in window if isinstance(h.get(k), (int, float)) and math.isfinite(h[k])]
            if vals:
                out[k] = sum(vals) / len(vals)
        out["mean_reward_first"] = self.history[0]["mean_reward"]
        out["global_step"] = self.step
        out["reward_source"] = self.reward_source
        return out

    # -- checkpoints and saving -----------------------------------------------------------------

    def _save_adapters(self, directory: Path) -> None:
        from safetensors.torch import save_file

        self.model.save_pretrained(str(directory), selected_adapters=["policy", "value"], safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(directory / "value_head.safetensors"))

    def save_checkpoint(self) -> Path:
        root = self.stage_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"checkpoint-{self.step}"
        tmp = root / f".tmp-checkpoint-{self.step}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self._save_adapters(tmp)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng_state.pt")
        from alignkit.artifacts import write_json_atomic

        write_json_atomic(tmp / "ppo_state.json", {"step": self.step, "kl_controller": self.kl_ctl.state_dict(), "history": self.history})
        # Written last: alignkit.artifacts.last_complete_checkpoint only trusts checkpoints that have it.
        write_json_atomic(tmp / "trainer_state.json", {"global_step": self.step, "kind": "ppo"})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune_checkpoints(root)
        return final

    def _prune_checkpoints(self, root: Path) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        ckpts = sorted((int(p.name.split("-")[-1]), p) for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
        for _, p in ckpts[:-limit]:
            shutil.rmtree(p, ignore_errors=True)

    def load_checkpoint(self, ckpt: Path) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights
        from safetensors.torch import load_file

        for role in ("policy", "value"):
            weights = load_peft_weights(str(ckpt / role), device=str(self.device))
            set_peft_model_state_dict(self.model, weights, adapter_name=role)
        self.value_head.load_state_dict(load_file(str(ckpt / "value_head.safetensors"), device=str(self.device)))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=False))
        state = json.loads((ckpt / "ppo_state.json").read_text())
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.history = state.get("history", [])
        rng = torch.load(ckpt / "rng_state.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._use("policy")

    def save(self, stage_dir: str | Path | None = None) -> None:
        """The policy adapter + tokenizer at the stage dir's top level; value adapter + head under value/."""
        from safetensors.torch import save_file

        from alignkit.training import save_policy

        stage_dir = Path(stage_dir or self.stage_dir)
        save_policy(self.model, self.tokenizer, stage_dir, adapter_name="policy")
        self.model.save_pretrained(str(stage_dir), selected_adapters=["value"], safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(stage_dir / "value" / "value_head.safetensors"))
