"""How far a policy has moved from a reference: sequence log-probabilities and the sampled KL between them.

Both work on plain token-id lists and floats, so an evaluation that samples with `alignkit.generation`
(the demo's, a comparison's) measures KL(policy ‖ reference) on the very responses it judges.
"""

from __future__ import annotations

from typing import Any, Sequence

from alignkit.errors import UserError


def sequence_logprobs(model: Any, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int,
                      batch_size: int = 64) -> list[float]:
    """log p(response | prompt) under `model`, summed over the response's tokens (EOS included)."""
    import torch

    from alignkit.ppo.core import logprobs_from_logits

    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), batch_size):
            P, R = prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
            seqs = [p + r for p, r in zip(P, R)]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, x in enumerate(seqs):
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])
            for i, (p, r) in enumerate(zip(P, R)):
                out.append(logp[i, len(p) - 1 : len(p) - 1 + len(r)].sum().item())
    return out


def kl_to_reference(logp: Sequence[float], logp_ref: Sequence[float], *, temperature: float, top_p: float,
                    rounds: int = 1000, seed: int = 0) -> dict:
    """KL(π ‖ π_ref) in nats per response: the k1 estimate, mean of log π(y|x) − log π_ref(y|x) over y ~ π.

    Returns {kl, ci_low, ci_high (95% percentile bootstrap over prompts), se, n}. k1 is unbiased but
    noisy, and on few samples can even come out negative: the interval says how far to trust it. It is
    unbiased only for samples drawn from π itself; with temperature != 1 or top_p < 1 they come from a
    reshaped distribution and the mean is not KL(π ‖ π_ref), so such samples are refused.
    """
    import numpy as np
    from scipy.stats import sem

    from alignkit.stats import bootstrap_mean_ci

    if temperature != 1.0 or top_p < 1.0:
        raise UserError(f"KL to the reference needs samples from the policy itself (temperature 1, top_p 1), "
                        f"got temperature={temperature}, top_p={top_p}")
    d = np.asarray(logp, dtype=float) - np.asarray(logp_ref, dtype=float)
    if d.size == 0:
        raise UserError("KL to the reference: no samples")
    lo, hi = bootstrap_mean_ci(d, rounds, seed)
    return {"kl": float(d.mean()), "ci_low": lo, "ci_high": hi,
            "se": float(sem(d)) if d.size > 1 else float("nan"), "n": int(d.size)}
