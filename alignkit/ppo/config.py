"""PPOConfig: the `train:` section of a `kind: ppo` stage (the config class recipes/ppo.py declares)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from alignkit.stage import min_reward_accuracy_field


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PPOConfig:
    # loop sizes
    steps: int = _f(100, "PPO iterations; each samples rollout_batch_size responses and optimises on them")
    rollout_batch_size: int = _f(16, "prompts sampled (one response each) per PPO iteration")
    mini_batch_size: int = _f(4, "rollouts per optimiser minibatch (rollout_batch_size should be a multiple)")
    ppo_epochs: int = _f(4, "optimisation epochs over each rollout batch (shuffled minibatches each epoch)")
    learning_rate: float = _f(1e-5, "AdamW learning rate of the policy and value adapters and the value head")
    weight_decay: float = _f(0.0, "AdamW weight decay (TRL's default; torch's 0.01 would pull the policy towards the "
                                  "base model, not the reference)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (policy and value parameters together)")
    gradient_accumulation_steps: int = _f(1, "minibatches whose gradients are summed before one optimiser step")
    # sampling
    max_new_tokens: int = _f(48, "response length limit in tokens during rollouts")
    temperature: float = _f(1.0, "sampling temperature of rollouts (PPO assumes > 0: the policy's own distribution)")
    top_p: float = _f(1.0, "nucleus sampling of rollouts; 1.0 samples the full distribution (right for PPO)")
    missing_eos_penalty: float | None = _f(None, "subtracted from the score of a response that never emitted EOS "
                                                 "within max_new_tokens (None: no penalty)")
    # KL
    ensemble_lambda: float = _f(1.0, "with `reward:` listing several reward stages: the score is mean - "
                                     "ensemble_lambda * std over them, a reward that does not chase what one member "
                                     "alone likes (0: their mean)")
    init_kl_coef: float = _f(0.05, "initial coefficient of the per-token KL penalty against the reference (SFT) policy")
    adaptive_kl: bool = _f(False, "adapt the KL coefficient towards target_kl (Ziegler et al. 2019); else fixed")
    target_kl: float = _f(6.0, "target KL (nats per response) of the adaptive controller")
    kl_horizon: int = _f(10000, "horizon of the adaptive controller, in rollouts")
    kl_estimator: str = _f("k1", "per-token KL estimator in the reward: k1 (log p - log q) or k3 (non-negative)")
    # advantages and losses
    gamma: float = _f(1.0, "discount factor of GAE")
    lam: float = _f(0.95, "GAE lambda")
    cliprange: float = _f(0.2, "policy ratio clip range (PPO epsilon)")
    cliprange_value: float = _f(0.2, "value clip range around the rollout's values")
    vf_coef: float = _f(0.1, "weight of the value loss in the total loss")
    whiten_rewards: bool = _f(False, "whiten per-token rewards (rescale, keep mean) before GAE")
    # guard rails
    ratio_threshold: float = _f(10.0, "skip (and log) a minibatch whose mean probability ratio exceeds this")
    min_reward_accuracy: float = min_reward_accuracy_field()
    # bookkeeping
    save_steps: int = _f(50, "checkpoint every this many PPO iterations (for --resume)")
    save_total_limit: int | None = _f(2, "keep at most this many checkpoints (None: all)")
    logging_steps: int = _f(1, "log metrics every this many PPO iterations")
    seed: int | None = _f(None, "random seed of sampling and shuffling (None: the recipe's seed)")
    sample_log_count: int = _f(2, "sample (prompt, response, score) triples logged per logged step")

    def __post_init__(self):
        for name in ("steps", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "gradient_accumulation_steps",
                     "max_new_tokens", "save_steps", "logging_steps", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) > rollout_batch_size ({self.rollout_batch_size})")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size}): a smaller last minibatch would weigh as much as a full one")
        if (self.rollout_batch_size // self.mini_batch_size) % self.gradient_accumulation_steps:
            raise ValueError(f"minibatches per rollout ({self.rollout_batch_size // self.mini_batch_size}) must be a "
                             f"multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 for PPO rollouts")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.cliprange <= 0 or self.cliprange_value <= 0:
            raise ValueError("cliprange and cliprange_value must be > 0")


def field_help() -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(PPOConfig)}
