"""alignkit: preference alignment over QLoRA adapters, from labels to compared models.

The library: the stage contract and what stages share (`stage`, `stage_bodies`, `training`, `hashing`,
`artifacts`, `config`), models and sampling (`modeling`, `generation`, `reward_model`, `tiny`), data
(`data/`), the label store (`store/`), PPO (`ppo/`), comparison and its statistics (`compare`, `judges`,
`stats`, `policy_stats`, `selection`, `plots`), synthetic tasks with an oracle (`tasks/`) and the command
line (`cli`). It never imports `recipes`, `labeling_ui` or `demo`, except `cli` lazily, to dispatch.
"""

__version__ = "0.1.0"
