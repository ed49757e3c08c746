"""PPO math against small cases computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from alignkit.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_masked_mean_and_var():
    x, m = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    assert close(masked_mean(x, m), 2.0)
    # unbiased: ((1-2)^2 + 0 + (3-2)^2) / (3-1) = 1
    assert close(masked_var(x, m), 1.0)
    assert close(masked_var(x, m, unbiased=False), 2 / 3)
    assert close(masked_mean(x, m, dim=1), [2.0])


def test_masked_whiten():
    x, m = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    # mean 2, std 1 -> (-1, 0, 1); the padded position comes back 0, not (100-2)/1
    assert close(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], 1e-4)
    # shift_mean=False: rescale only, (x - 2)/1 + 2
    assert close(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], 1e-4)


def test_gae_three_steps():
    rewards, values = T([[1.0, 0.0, 2.0]]), T([[0.5, 1.0, 1.5]])
    gamma, lam = 0.9, 0.8
    # t=2: delta = 2 + 0.9*0 - 1.5 = 0.5                       A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35                    A1 = 0.35 + 0.72*0.5 = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4                     A0 = 1.4 + 0.72*0.71 = 1.9112
    adv, ret = gae(rewards, values, T([[1, 1, 1]]), gamma, lam)
    assert close(adv, [[1.9112, 0.71, 0.5]])
    assert close(ret, [[2.4112, 1.71, 2.0]])


def test_gae_stops_at_the_mask():
    # Same first two steps, third is padding with garbage reward/value: the episode ends at t=1.
    # t=1: delta = 0 + 0 - 1.0 = -1  A1 = -1;   t=0: delta = 1 + 0.9*1 - 0.5 = 1.4,  A0 = 1.4 + 0.72*(-1) = 0.68
    adv, ret = gae(T([[1.0, 0.0, 99.0]]), T([[0.5, 1.0, 7.0]]), T([[1, 1, 0]]), 0.9, 0.8)
    assert close(adv, [[0.68, -1.0, 0.0]])
    assert close(ret, [[1.18, 0.0, 0.0]])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values = T([[0.0, 0.0, 3.0]]), T([[1.0, 2.0, 0.5]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert close(adv, [[3.0 - 1.0, 3.0 - 2.0, 3.0 - 0.5]])


def test_policy_loss_clips_positive_advantage():
    old = T([[0.0, 0.0]])
    new = T([[0.0, math.log(2.0)]])  # ratios 1 and 2
    adv = T([[1.0, 1.0]])
    loss, clipfrac, approx_kl, mean_ratio = policy_loss(new, old, adv, torch.ones(1, 2), cliprange=0.2)
    # per token max(-A*r, -A*clip(r)) = max(-1, -1) = -1 and max(-2, -1.2) = -1.2 -> mean -1.1
    assert close(loss, -1.1)
    assert close(clipfrac, 0.5)
    # k3 with d = log 2: exp(d) - 1 - d = 1 - log 2; token 1 contributes 0 -> mean (1 - log 2)/2
    assert close(approx_kl, (1 - math.log(2)) / 2)
    assert close(mean_ratio, 1.5)


def test_policy_loss_clips_negative_advantage_and_respects_mask():
    new = T([[math.log(0.5), 5.0]])
    old = T([[0.0, 0.0]])
    adv = T([[-1.0, 123.0]])
    loss, clipfrac, _, _ = policy_loss(new, old, adv, T([[1, 0]]), cliprange=0.2)
    # ratio 0.5, A=-1: max(0.5, 1*0.8) = 0.8 (clipped); the masked token is ignored
    assert close(loss, 0.8)
    assert close(clipfrac, 1.0)


def test_policy_loss_gradient_is_zero_when_clipped():
    new = T([[math.log(2.0)]]).requires_grad_()
    loss, *_ = policy_loss(new, T([[0.0]]), T([[1.0]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.abs().item() == 0.0


def test_value_loss_clipped():
    # V=2, V_old=1, R=3, c=0.5: clip(V) = 1.5; (2-3)^2 = 1, (1.5-3)^2 = 2.25 -> 0.5*2.25 = 1.125, clipped
    loss, frac = value_loss(T([[2.0]]), T([[1.0]]), T([[3.0]]), torch.ones(1, 1), 0.5)
    assert close(loss, 1.125) and close(frac, 1.0)
    # V=3, V_old=1, R=2: clip(V) = 1.5; (3-2)^2 = 1, (1.5-2)^2 = 0.25 -> max 1 -> 0.5; not clipped
    loss, frac = value_loss(T([[3.0]]), T([[1.0]]), T([[2.0]]), torch.ones(1, 1), 0.5)
    assert close(loss, 0.5) and close(frac, 0.0)


def test_kl_penalty_estimators():
    logp, logq = T([math.log(0.5)]), T([math.log(0.25)])
    assert close(kl_penalty(logp, logq, "k1"), [math.log(2)])
    # k3: r = q/p = 0.5 -> r - 1 - log r = 0.5 - 1 + log 2
    assert close(kl_penalty(logp, logq, "k3"), [math.log(2) - 0.5])
    assert close(kl_penalty(logq, logp, "abs"), [math.log(2)])
    assert close(kl_penalty(logp, logq, "mse"), [0.5 * math.log(2) ** 2])
    with pytest.raises(ValueError):
        kl_penalty(logp, logq, "k9")


def test_entropy_and_logprobs_from_logits():
    assert close(entropy_from_logits(torch.zeros(1, 4)), [math.log(4)])
    logits = T([[math.log(1.0), math.log(3.0)]])  # p = (0.25, 0.75)
    assert close(entropy_from_logits(logits), [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    assert close(logprobs_from_logits(logits, T([1])), [math.log(0.75)])


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 12: e = clip(12/6 - 1, ±0.2) = 0.2 -> 0.2 * (1 + 0.2 * 256/10000) = 0.201024
    ctl.update(12.0, 256)
    assert close(ctl.value, 0.201024)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 5.4: e = 5.4/6 - 1 = -0.1 -> 0.2 * (1 - 0.1 * 256/10000) = 0.199488
    ctl.update(5.4, 256)
    assert close(ctl.value, 0.199488)
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, 6.0, 10000)
    other.load_state_dict(state)
    assert other.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
