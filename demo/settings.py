"""The demo's sizes outside the recipe, and the threads and log levels of every process it starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from alignkit.tasks.pretrain import PretrainSettings

ALIGNED = ("dpo", "ppo")  # the models the claims are about; sweep stages are named <kind>_<knob><value>


@dataclass
class DemoSettings:
    """Sizes of everything the demo does outside the recipe (the recipe holds the training settings)."""

    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    sft_rows: int = 1200
    label_prompts: int = 1300  # comparisons to label (one pair of SFT samples per prompt)
    overlap: int = 2  # votes per comparison, from distinct annotators (a split vote is dropped)
    annotators: int = 6
    noise: float = 0.2  # share of votes replaced by a coin flip
    pair_max_new_tokens: int = 32
    eval_prompts: int = 0  # 0: every eval-split prompt
    eval_max_new_tokens: int = 48
    # Held-out SFT pairs per eval prompt on which the reward model is checked against the oracle: one pair a
    # prompt gave ~340 pairs, whose standard error (~0.016) left the 0.85 claim under 3 SE from its measure.
    rm_pairs_per_prompt: int = 3
    temperature: float = 1.0  # sampling for pairs and evaluation: the policies' own distributions
    bootstrap: int = 1000
    seed: int = 0
    # Processes training stages at once after labeling: the reward -> PPO lane beside the DPO lane.
    workers: int = int(os.environ.get("ALIGNKIT_DEMO_WORKERS", "2"))
    recipe_overrides: list[str] = field(default_factory=list)  # --set style, applied to the template

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A smoke run: same code path, tiny sizes; the claims are not expected to hold."""
        return cls(
            pretrain=PretrainSettings(corpus_size=3000, steps=80),
            sft_rows=200, label_prompts=60, overlap=2, annotators=3, eval_prompts=48, bootstrap=200,
            recipe_overrides=[
                "stages.sft.train.max_steps=6",
                "stages.reward.train.max_steps=8",
                "stages.reward.data.eval_fraction=0.2",
                "stages.ppo.train.steps=2", "stages.ppo.train.rollout_batch_size=8",
                "stages.ppo.train.min_reward_accuracy=0",
                "stages.ppo_kl03.train.steps=2", "stages.ppo_kl03.train.rollout_batch_size=8",
                "stages.ppo_kl03.train.min_reward_accuracy=0",
                "stages.dpo.train.max_steps=4", "stages.dpo_beta01.train.max_steps=4",
            ],
        )


def quiet_libraries() -> None:
    """Threads and log levels for a small model on a small CPU."""
    import torch

    # A 1M-parameter model gains nothing from intra-op threads, and on a shared 2-core machine extra
    # threads spin against each other (a forward pass measured 20x slower with 2 threads under load).
    torch.set_num_threads(int(os.environ.get("ALIGNKIT_DEMO_THREADS", "1")))
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass
