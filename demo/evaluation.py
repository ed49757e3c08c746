"""Evaluation: oracle and reward-model judges, KL to SFT, reward-model accuracy against the oracle."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit import artifacts
from alignkit.policy_stats import kl_to_reference, sequence_logprobs
from alignkit.tasks import sentiment
from demo.cache import KeyedCache
from demo.data import eval_prompts
from demo.labeling import sample_continuations
from demo.settings import DemoSettings


@dataclass
class _Reference:
    """The SFT policy, loaded once on first use and shared by the KL and the reward-model pairs."""

    path: Path
    model: Any = None
    tokenizer: Any = None

    def load(self) -> "_Reference":
        if self.model is None:
            from alignkit.modeling import load_model_for_inference

            self.model, self.tokenizer, _ = load_model_for_inference(str(self.path))
        return self


def rm_agrees(heldout: list[tuple[float, float]]) -> list[bool]:
    """Per (oracle difference, reward-model difference) of a pair the oracle does not tie: same sign.

    A reward-model tie (difference 0) picks neither side, so it is not correct whichever the oracle prefers.
    """
    return [r != 0 and (d > 0) == (r > 0) for d, r in heldout]


def sample_seed(seed: int, name: str) -> int:
    """The sampling seed of one policy: from its name, not its place in the list, so adding or reordering
    stages leaves every other policy's samples (and their cache) as they were."""
    return int(artifacts.stable_hash({"seed": seed, "model": name})[:8], 16)


def evaluate(workdir: Path, records: dict[str, dict], s: DemoSettings, *, log=print) -> dict:
    """Samples from every policy stage on the eval prompts; oracle / RM win rates vs SFT; KL to SFT; RM accuracy."""
    eval_dir = workdir / "eval"
    eval_dir.mkdir(exist_ok=True)
    prompts = eval_prompts(s)
    policies = [name for name, rec in records.items() if rec.get("kind") in ("sft", "dpo", "ppo")]
    run_dir = workdir / "run"
    knobs = {"prompts": prompts, "max_new_tokens": s.eval_max_new_tokens, "temperature": s.temperature, "seed": s.seed}
    sft = _Reference(run_dir / "sft")
    samples = {name: _policy_samples(run_dir, name, records, knobs, sft, s, log=log) for name in policies}
    heldout = _rm_heldout(run_dir, records, knobs, sft, s, log=log)
    sft.model = None
    rm_correct = rm_agrees(heldout)
    by_gap: dict[str, list[bool]] = {}
    for (d, _), ok in zip(heldout, rm_correct):
        by_gap.setdefault(str(min(abs(d), 5)) + ("+" if abs(d) >= 5 else ""), []).append(ok)

    # Win rates vs SFT: `alignkit compare` with the oracle judge and with the reward-model judge.
    win_oracle = _compare_vs_sft(workdir, policies, prompts, samples, "oracle:sentiment", s, log=log)
    win_rm = _compare_vs_sft(workdir, policies, prompts, samples, f"reward:{run_dir / 'reward'}", s, log=log)
    kl, kl_ci = _kl_to_sft(policies, samples, s)
    return {
        "prompts": prompts,
        "policies": policies,
        "samples": samples,
        "rm_accuracy": statistics.fmean(rm_correct) if rm_correct else float("nan"),
        "rm_pairs": len(rm_correct),
        "rm_accuracy_by_gap": {k: {"accuracy": statistics.fmean(v), "pairs": len(v)} for k, v in sorted(by_gap.items())},
        "rm_heldout": heldout,
        "win_rate": win_oracle["vs_sft"],
        "win_rate_reward_model": win_rm["vs_sft"],
        "compare": {"oracle": win_oracle["dir"], "reward_model": win_rm["dir"],
                    "ratings_oracle": win_oracle.get("ratings"), "ratings_reward_model": win_rm.get("ratings"),
                    "ratings_warning_oracle": win_oracle.get("ratings_warning"),
                    "ratings_warning_reward_model": win_rm.get("ratings_warning")},
        "kl": kl,
        "kl_ci": kl_ci,
        "oracle_score": {n: statistics.fmean(sentiment.score(t) for t in samples[n]["texts"]) for n in policies},
        "mean_length": {n: statistics.fmean(samples[n]["lengths"]) for n in policies},
        "eos_fraction": {n: statistics.fmean(samples[n]["finished"]) for n in policies},
    }


def _policy_samples(run_dir: Path, name: str, records: dict[str, dict], knobs: dict, sft: _Reference,
                    s: DemoSettings, *, log=print) -> dict:
    """One policy's samples with their log-probabilities under it and under SFT, cached per stage hash."""
    from alignkit.modeling import load_model_for_inference

    seed = sample_seed(s.seed, name)
    cache = KeyedCache(run_dir.parent / "eval" / f"samples_{name}.json", artifacts.stable_hash(
        {"stage": records[name]["config_hash"], "sft": records["sft"]["config_hash"], **knobs, "sample_seed": seed}))
    cached = cache.load()
    if cached:
        return cached
    log(f"eval: sampling {len(knobs['prompts'])} responses from {name}")
    model, tok, _ = load_model_for_inference(str(run_dir / name))
    sampled = sample_continuations(run_dir / name, knobs["prompts"], n=1, max_new_tokens=s.eval_max_new_tokens,
                                   temperature=s.temperature, seed=seed, model=model, tokenizer=tok)
    own = sequence_logprobs(model, sampled["prompt_ids"], sampled["response_ids"], tok.pad_token_id)
    if name == "sft":
        sft.model, sft.tokenizer, ref = model, tok, own
    else:
        sft.load()
        ref = sequence_logprobs(sft.model, sampled["prompt_ids"], sampled["response_ids"], sft.tokenizer.pad_token_id)
        del model
    return cache.save({"texts": sampled["texts"], "finished": sampled["finished"],
                       "lengths": [len(r) for r in sampled["response_ids"]], "logp": own, "logp_sft": ref,
                       "params": sampled["params"]})


def _rm_heldout(run_dir: Path, records: dict[str, dict], knobs: dict, sft: _Reference, s: DemoSettings, *,
                log=print) -> list[tuple[float, float]]:
    """(oracle difference, reward-model difference) of fresh SFT pairs on the eval prompts, oracle ties left out."""
    from alignkit.reward_model import load_reward_scorer

    per_prompt = s.rm_pairs_per_prompt
    cache = KeyedCache(run_dir.parent / "eval" / "reward_model.json", artifacts.stable_hash(
        {"reward": records["reward"]["config_hash"], **knobs, "pairs_per_prompt": per_prompt}))
    rm = cache.load()
    if not rm:
        log("eval: reward model vs oracle on held-out pairs")
        sft.load()
        pairs = sample_continuations(sft.path, knobs["prompts"], n=2 * per_prompt, max_new_tokens=s.eval_max_new_tokens,
                                     temperature=s.temperature, seed=s.seed + 2, model=sft.model, tokenizer=sft.tokenizer)
        scorer = load_reward_scorer(run_dir / "reward", batch_size=64)
        # Samples come prompt by prompt, 2 * per_prompt each: consecutive ones pair up on the same prompt.
        prompts = [p for p in knobs["prompts"] for _ in range(per_prompt)]
        a_texts, b_texts = pairs["texts"][0::2], pairs["texts"][1::2]
        rm = cache.save({"a": a_texts, "b": b_texts,
                         "rm_a": scorer.score(prompts, a_texts), "rm_b": scorer.score(prompts, b_texts)})
        del scorer
    return [(sentiment.raw_score(a) - sentiment.raw_score(b), ra - rb)
            for a, b, ra, rb in zip(rm["a"], rm["b"], rm["rm_a"], rm["rm_b"])
            if sentiment.raw_score(a) != sentiment.raw_score(b)]


def _kl_to_sft(policies: list[str], samples: dict[str, dict], s: DemoSettings) -> tuple[dict, dict]:
    """KL(policy ‖ SFT) per policy (0 for SFT itself) and, for the others, the estimate with its interval."""
    kl, kl_ci = {}, {}
    for name in policies:
        m = samples[name]
        if name == "sft":
            kl[name] = 0.0
            continue
        est = kl_to_reference(m["logp"], m["logp_sft"], temperature=m["params"]["temperature"],
                              top_p=m["params"]["top_p"], rounds=s.bootstrap, seed=s.seed)
        kl[name], kl_ci[name] = est["kl"], est
    return kl, kl_ci


def _compare_vs_sft(workdir: Path, policies: list[str], prompts: list[str], samples: dict[str, dict], judge: str,
                    s: DemoSettings, *, log=print) -> dict:
    """Blind A/B of every policy pair with `alignkit compare`'s judging and statistics, on the demo's samples.

    `alignkit.compare.judge_all` randomises sides per (pair, prompt) and asks the judge; `summarise` gives
    wins / losses / ties, the win rate with a bootstrap CI and Bradley–Terry ratings. The responses are the
    ones the KL is measured on, so the win rates and the frontier describe the same samples (and a
    continuation keeps its leading space, which the reward model needs to see the review as written).
    """
    from alignkit.compare import judge_all, summarise
    from alignkit.judges import load_judge

    kind = judge.split(":", 1)[0]
    names = [n for n in policies if n != "sft"] + ["sft"]  # SFT last: each pair (model, sft) counts the model's wins
    responses = {n: samples[n]["texts"] for n in names}
    # "statistics" names the method, so a result computed by another method is recomputed.
    cache = KeyedCache(workdir / "compare" / f"{kind}.json", artifacts.stable_hash(
        {"judge": judge, "responses": responses, "bootstrap": s.bootstrap, "seed": s.seed,
         "judge_stage": _stage_hash_of(judge), "statistics": "prompt-clusters"}))
    result = cache.load()
    if not result:
        log(f"eval: compare {', '.join(names)} with judge {judge}")
        battles = judge_all(load_judge(judge), prompts, responses, s.seed)
        result = cache.save({"judge": judge, "n_prompts": len(prompts), "seed": s.seed, "bootstrap": s.bootstrap,
                             **summarise(names, battles, responses, bootstrap=s.bootstrap, seed=s.seed)})
    kept = ("win_rate", "ci_low", "ci_high", "ci_method", "wins", "losses", "ties", "n", "lc_win_rate", "lc_ci_low",
            "lc_ci_high")
    vs_sft = {p["model_a"]: {k: p.get(k) for k in kept} for p in result["pairs"] if p["model_b"] == "sft"}
    return {"vs_sft": vs_sft, "dir": str(cache.path), "ratings": result.get("ratings"),
            "ratings_warning": result.get("ratings_warning")}


def _stage_hash_of(judge: str) -> str | None:
    kind, _, arg = judge.partition(":")
    return (artifacts.read_stage(arg) or {}).get("config_hash") if kind == "reward" else None

