"""`alignkit demo`: the whole loop offline, on a task with a known oracle, with numbers that could have come out badly.

A miniature of the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023), one module per step:

  settings    the sizes of everything outside the recipe (`DemoSettings`) and the process's threads;
  data        the pretrained tiny Llama's SFT rows and prompts, and the recipe written from
              recipes/configs/demo/demo.yaml;
  labeling    candidate pairs sampled from the SFT stage, imported into a label store and labeled by
              simulated annotators (the lexicon oracle + noise) through the real labeling server on
              loopback, with overlap; the votes exported as a preference dataset;
  lanes       reward, PPO and DPO stages (plus a small DPO-beta / PPO-KL sweep) through the same runner
              as `alignkit run`, the reward -> PPO lane beside the DPO lane;
  evaluation  SFT vs each aligned policy judged blind by the oracle and by the reward model, win rates
              with CIs, KL to the SFT policy on sampled responses, the reward model against the oracle;
  report      the claims, DIR/demo.json, DIR/report.md and PNG plots;
  main        `run_demo`, the steps in order.

Every step is reused on a second run: the pretrained model by its settings hash, the labels by the SFT
stage's hash and the labeling settings, the stages by the runner's skip logic, and evaluations by the
evaluated stages' hashes (`demo.cache.KeyedCache`). The library never imports this package: it uses
`labeling_ui` and `recipes`, which sit above `alignkit`.
"""
