"""`alignkit demo`: the quick smoke run's outputs, and (slow) the real run's claims."""

from __future__ import annotations

import json
import os

import pytest

from alignkit.cli import main
from alignkit.errors import UserError

DEMO_KEYS = ("rm_accuracy", "win_rate", "kl", "wall_seconds")


def _check_shape(result: dict) -> None:
    for key in DEMO_KEYS:
        assert key in result, key
    assert isinstance(result["rm_accuracy"], float)
    for model in ("dpo", "ppo"):
        w = result["win_rate"][model]
        assert set(w) >= {"win_rate", "ci_low", "ci_high"}
        assert 0.0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1.0
        assert isinstance(result["kl"][model], float)
        kl = result["kl_ci"][model]
        assert kl["ci_low"] <= result["kl"][model] <= kl["ci_high"] and kl["se"] > 0
    assert result["wall_seconds"] > 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ALIGNKIT_SKIP_FULL_DEMO") == "1", reason="ALIGNKIT_SKIP_FULL_DEMO=1")
def test_demo_claims_hold_and_a_second_run_reuses_everything(tmp_path, capsys):
    """The real demo from a cold cache: the reward model agrees with the oracle, DPO and PPO beat SFT.

    (`--quick` runs the same steps smaller; the full run is what the claims are about, so it is what runs here.)
    """
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir)]) == 0
    result = json.loads((workdir / "demo.json").read_text())
    _check_shape(result)
    assert result["quick"] is False
    assert result["rm_accuracy"] >= 0.85, result["rm_accuracy"]
    for model in ("dpo", "ppo"):
        w = result["win_rate"][model]
        assert w["win_rate"] >= 0.65 and w["ci_low"] > 0.5, (model, w)
        assert result["kl"][model] > 0, (model, result["kl"])
    assert all(result["claims"].values()), result["claims"]

    for name in ("report.md", "rm_accuracy.png", "win_rates.png", "frontier.png", "recipe.yaml",
                 "labels/export/preferences.jsonl", "labels/labels.db"):
        assert (workdir / name).exists(), name
    report = (workdir / "report.md").read_text()
    assert "## Claims" in report and "frontier.png" in report
    # The labels went through the server: votes from several annotators, overlap respected.
    labeling = result["labeling"]
    assert labeling["votes"]["votes"] == labeling["votes"]["expected"]
    assert len(labeling["votes"]["per_annotator"]) >= 2 and labeling["votes"]["errors"] == 0
    stage_mtimes = {p: p.stat().st_mtime for p in (workdir / "run").glob("*/stage.json")}
    assert {p.parent.name for p in stage_mtimes} >= {"sft", "reward", "ppo", "dpo"}

    # A second run trains nothing and reports the same numbers.
    capsys.readouterr()
    assert main(["demo", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "cached at" in out and "labels: complete, reused" in out and "complete, skipped" in out
    assert "training into" not in out
    assert {p: p.stat().st_mtime for p in stage_mtimes} == stage_mtimes
    again = json.loads((workdir / "demo.json").read_text())
    assert again["rm_accuracy"] == result["rm_accuracy"] and again["win_rate"] == result["win_rate"]


def test_kl_estimate_has_an_interval_and_refuses_reshaped_samples():
    import numpy as np

    from alignkit.policy_stats import kl_to_reference

    rng = np.random.default_rng(0)
    logp = rng.normal(-20, 3, 400)
    ref = logp - rng.normal(0.5, 1.0, 400)  # log-ratio 0.5 on average
    est = kl_to_reference(list(logp), list(ref), temperature=1.0, top_p=1.0, rounds=500)
    assert est["ci_low"] < est["kl"] < est["ci_high"] and est["ci_low"] < 0.5 < est["ci_high"]
    assert est["se"] == pytest.approx(np.std(logp - ref, ddof=1) / np.sqrt(400)) and est["n"] == 400
    # Samples from a tempered or truncated policy are not samples of the policy: the mean is not its KL.
    with pytest.raises(UserError, match="temperature"):
        kl_to_reference(list(logp), list(ref), temperature=0.7, top_p=1.0)
    with pytest.raises(UserError, match="top_p"):
        kl_to_reference(list(logp), list(ref), temperature=1.0, top_p=0.9)


def test_sampling_seed_depends_on_the_model_name_not_its_position():
    from demo.evaluation import sample_seed

    assert sample_seed(0, "dpo") == sample_seed(0, "dpo")
    assert len({sample_seed(0, n) for n in ("sft", "dpo", "ppo", "dpo_beta01")}) == 4
    assert sample_seed(1, "dpo") != sample_seed(0, "dpo")


def test_a_reward_model_tie_is_not_correct():
    from demo.evaluation import rm_agrees

    # (oracle difference, reward-model difference): agree, disagree, RM tie with the oracle preferring a / b.
    assert rm_agrees([(2.0, 0.3), (1.0, -0.2), (1.0, 0.0), (-1.0, 0.0)]) == [True, False, False, False]


def test_claims_fail_rather_than_raise_when_a_pair_has_no_battles():
    from demo.report import claims_of

    ev = {"rm_accuracy": 0.9, "kl": {"dpo": 1.0, "ppo": 1.0},
          "win_rate": {"dpo": {"win_rate": None, "ci_low": None}, "ppo": {"win_rate": 0.8, "ci_low": 0.6}}}
    claims = claims_of(ev)
    assert claims["dpo win_rate >= 0.65 and ci_low > 0.5 vs sft"] is False
    assert claims["ppo win_rate >= 0.65 and ci_low > 0.5 vs sft"] is True
