"""Stage recipes and the runner that plans, preflights and executes them.

One file per stage kind (sft, dpo, kto, reward, ppo, grpo, rloo), each declaring its `StageKind` and reading
top to bottom; `runner.py` maps `kind:` to those files and takes a recipe YAML from flags to checkpoints.
`configs/` holds the shipped YAML recipes (the demo's template among them) and `data/` the tiny recipes' data.
"""
