"""`alignkit loop RECIPE`: rounds of human labels from the latest policy, each round's model measured against the last.

    alignkit loop recipes/configs/tiny_loop.yaml [--wait] [--status]

The recipe's `loop:` section (alignkit.config.LoopSettings) names the prompt pool, the label store, the stage
round 0 samples from (`start`), and the stages retrained each round: reward stages (each trained `ensemble`
times, on bootstrap resamples of the votes) and one policy stage. Round N lives in RUN_DIR/round-N/:

    candidates.jsonl    `candidates` samples per pool prompt from the latest policy (round 0: loop.start)
    selected.jsonl      the pairs sent to people, at most one per prompt: those the previous round's reward
                        ensemble is least sure of (alignkit.selection), or a seeded random choice in round 0
                        and with select: random; imported into the store tagged with the round, the stage
                        that sampled them and their selection score
    (votes)             the round trains once loop.min_votes of its comparisons have loop.overlap votes;
                        until then the loop says where it stands and exits 0 (--wait: polls)
    votes-reward.jsonl, votes-policy.jsonl   the votes each stage trains on, exported once: a vote arriving
                        later changes no complete stage, so a rerun retrains nothing
    reward-K/, POLICY/  the round's stages, named round-N/reward-K and round-N/POLICY in the runner's plan;
                        the policy stage continues the previous round's policy (iterative DPO)
    compare/            one `alignkit compare` of the round's policy, the previous round's and the first
                        (loop.start): each sampled once, every pair judged

RUN_DIR/loop.json holds the round table (`rounds`: round, labels, rm_accuracy, vs_previous, vs_first, kl,
mean_length) and RUN_DIR/loop.png plots it. Every step is skipped when its output exists, and the store
import happens at most once per round (one transaction), so killing the loop anywhere and rerunning it
loses no vote, imports no round twice and retrains nothing complete.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit import artifacts
from alignkit.config import LoopSettings, RecipeConfig, StageConfig, load_recipe
from alignkit.data.formats import check_prompt_rows, prompt_from
from alignkit.data.io import load_rows
from alignkit.data.keys import POLICY_KEYS
from alignkit.errors import UserError
from alignkit.generation import SamplingParams
from recipes import runner

LOOP_JSON = "loop.json"
VOTE_FILES = {"reward": "votes-reward.jsonl", "policy": "votes-policy.jsonl"}
ROUND_JSON = "round.json"  # written once a round's votes are exported: its labels count, and "has its votes"
# Keys of a template stage's data: section that the loop replaces by the round's exported votes.
STORE_KEYS = ("labels_db", "train", "rounds", "resample", *POLICY_KEYS)


@dataclass(frozen=True)
class LoopRecipe:
    """A recipe with a loop: section, and the roles its stages play in a round."""

    cfg: RecipeConfig
    loop: LoopSettings
    rewards: tuple[StageConfig, ...]  # reward stages retrained each round
    policy: StageConfig  # the policy stage retrained each round
    pool: list[Any]  # the prompt pool (prompts as imported: text or chat messages)
    eval_prompts: list[Any]

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def round_dir(self, r: int) -> Path:
        return self.run_dir / f"round-{r}"

    def member(self, r: int, reward: StageConfig, k: int) -> str:
        return f"round-{r}/{reward.name}-{k}"

    def policy_name(self, r: int) -> str:
        """The policy round r samples from... round r-1's policy stage, or loop.start for round 0."""
        return self.loop.start if r == 0 else f"round-{r - 1}/{self.policy.name}"

    def trained_policy(self, r: int) -> str:
        return f"round-{r}/{self.policy.name}"


@dataclass(frozen=True)
class LoopState:
    """Where the loop stopped: every round complete, or a round waiting for votes."""

    complete: int  # rounds complete
    waiting: int | None  # the round waiting for votes, if any
    message: str


# ---------------------------------------------------------------------------
# Setup: the recipe, its roles, and the checks that must pass before anything is sampled or imported


def load_loop_recipe(config: str | Path, overrides: list[str] | None = None) -> LoopRecipe:
    cfg = load_recipe(config, overrides, stage_kinds=runner.RECIPES)
    if cfg.loop is None:
        raise UserError(f"{config}: alignkit loop needs a loop: section (prompts, labels_db, start, stages)")
    loop = cfg.loop
    kinds = {s.name: runner.RECIPES[s.kind].KIND for s in cfg.stages}
    if kinds[loop.start].output != "policy":
        raise UserError(f"{cfg.where('loop.start')}: loop.start names {loop.start!r}, a {cfg.stage(loop.start).kind} "
                        f"stage; the loop samples candidates from a policy")
    if len(set(loop.stages)) != len(loop.stages):
        raise UserError(f"{cfg.where('loop.stages')}: loop.stages names a stage twice: {loop.stages}")
    rewards = tuple(cfg.stage(n) for n in loop.stages if kinds[n].output == "reward")
    policies = [cfg.stage(n) for n in loop.stages if kinds[n].output == "policy"]
    if len(policies) != 1 or len(rewards) > 1 or len(rewards) + len(policies) != len(loop.stages):
        raise UserError(f"{cfg.where('loop.stages')}: loop.stages is one policy stage (dpo, ppo, ...) and at most one "
                        f"reward stage (its ensemble is loop.ensemble), got {loop.stages}")
    policy_kind = kinds[policies[0].name]
    if not policy_kind.accepts_after(policy_kind):
        raise UserError(f"{cfg.where('loop.stages')}: a {policy_kind.name} stage cannot continue another "
                        f"{policy_kind.name} stage, which each round's policy does; use dpo, kto or ppo")
    _check_judge(cfg, loop, takes_reward=bool(policies[0].reward), has_reward=bool(rewards))
    if loop.select == "uncertainty" and loop.rounds > 1 and not rewards:
        raise UserError(f"{cfg.where('loop.select')}: loop.select=uncertainty needs a reward stage in loop.stages "
                        f"(its ensemble scores the candidates)")
    if loop.start in loop.stages:
        raise UserError(f"{cfg.where('loop.start')}: loop.start {loop.start!r} is also in loop.stages; the loop "
                        f"starts from it and retrains the others")
    pool = _read_prompts(loop.prompts, "loop.prompts", cfg)
    if loop.budget > len(pool):
        raise UserError(f"{cfg.where('loop.budget')}: loop.budget={loop.budget} is larger than the prompt pool "
                        f"({len(pool)} prompts in {loop.prompts}); at most one pair per prompt goes to people a round")
    evals = _read_prompts(loop.eval_prompts, "loop.eval_prompts", cfg) if loop.eval_prompts else pool
    _check_label_store(loop.labels_db, cfg)
    return LoopRecipe(cfg, loop, rewards, policies[0], pool, evals)


def _check_judge(cfg: RecipeConfig, loop: LoopSettings, *, takes_reward: bool, has_reward: bool) -> None:
    """The judge each round's policy is measured by, checked before anything is sampled: a policy optimised
    against the round's reward model (PPO) is not judged by it, and a loop without one needs loop.judge."""
    from alignkit.judges import parse_judge

    if loop.judge is None and (takes_reward or not has_reward):
        why = "a PPO round is optimised against the round's reward model" if takes_reward else "there is no reward stage"
        raise UserError(f"{cfg.where('loop')}: loop.judge is needed ({why}): e.g. an oracle, llm:SPEC or reward:STAGE_DIR")
    if loop.judge is not None:
        try:
            parse_judge(loop.judge)
        except UserError as err:
            raise UserError(f"{cfg.where('loop.judge')}: {str(err).replace('--judge', 'loop.judge', 1)}") from None


def _read_prompts(path: str, key: str, cfg: RecipeConfig) -> list[Any]:
    if not Path(path).exists():
        raise UserError(f"{cfg.where(key)}: {key} file not found: {path}")
    rows = load_rows(path, what=key)
    check_prompt_rows(rows, path)
    return [prompt_from(row, f"{path}:{row.get('_line', i + 1)}") for i, row in enumerate(rows)]


def _check_label_store(db: str, cfg: RecipeConfig) -> None:
    """Refuse a store that is not a label store before anything is sampled (open_store names the problem)."""
    from alignkit.store import open_store

    try:
        open_store(db).close()
    except UserError as err:
        raise UserError(f"{cfg.where('loop.labels_db')}: {err}") from None


# ---------------------------------------------------------------------------
# The round's stages as runner stages


def round_config(lr: LoopRecipe, last: int) -> RecipeConfig:
    """The base stages and the stages of rounds 0..last (named round-N/...), for the runner's plan."""
    stages = list(base_config(lr).stages)
    for r in range(last + 1):
        stages += _round_stages(lr, r)
    return dataclasses.replace(lr.cfg, stages=stages)


def _round_stages(lr: LoopRecipe, r: int) -> list[StageConfig]:
    votes = lr.round_dir(r)
    out = []
    for reward in lr.rewards:
        for k in range(lr.loop.ensemble):
            data = {**_kept_data(reward), "train": str(votes / VOTE_FILES["reward"]), "resample": k}
            out.append(dataclasses.replace(reward, name=lr.member(r, reward, k), data=data, round=r))
    policy = lr.policy
    takes_votes = "train" in runner.RECIPES[policy.kind].KIND.data_keys  # dpo, kto...; ppo reads prompts
    data = {**_kept_data(policy), "train": str(votes / VOTE_FILES["policy"])} if takes_votes else dict(policy.data)
    reward, more = policy.reward, policy.more_rewards
    if policy.reward and lr.rewards:
        # A policy stage that scores with a reward (PPO) scores with the round's ensemble where its kind takes
        # one (mean - lambda * std over the members: ensembles are the remedy for reward over-optimisation).
        members = [lr.member(r, lr.rewards[0], k) for k in range(lr.loop.ensemble)]
        takes_all = runner.RECIPES[policy.kind].KIND.reward_ensemble
        reward, more = members[0], tuple(members[1:]) if takes_all else ()
    out.append(dataclasses.replace(policy, name=lr.trained_policy(r), data=data, after=lr.policy_name(r),
                                   reward=reward, more_rewards=more, round=r))
    return out


def _kept_data(stage: StageConfig) -> dict:
    return {k: v for k, v in stage.data.items() if k not in STORE_KEYS}


def base_config(lr: LoopRecipe) -> RecipeConfig:
    """The stages that must be complete before round 0: loop.start, the templates' parents, and their
    ancestors. The templates themselves, and any other stage of the recipe, are not the loop's to train."""
    needed, frontier = set(), {lr.loop.start}
    for name in lr.loop.stages:
        frontier |= set(lr.cfg.stage(name).references().values()) - set(lr.loop.stages)
    while frontier:
        needed |= frontier
        frontier = {ref for name in frontier for ref in lr.cfg.stage(name).references().values()} - needed
    return dataclasses.replace(lr.cfg, stages=[s for s in lr.cfg.stages if s.name in needed])


# ---------------------------------------------------------------------------
# Step 1: candidates from the latest policy


def _sampling(lr: LoopRecipe, r: int, n: int = 1) -> SamplingParams:
    return SamplingParams(max_new_tokens=lr.loop.max_new_tokens, temperature=lr.loop.temperature,
                          seed=lr.cfg.seed + 1000 * r, num_return_sequences=n, batch_size=64)


def sample_candidates(lr: LoopRecipe, r: int, *, log=print) -> list[dict]:
    """`candidates` samples per pool prompt from the policy round r starts from; cached in candidates.jsonl
    under the policy's run id and the sampling settings (one line per prompt: prompt, texts)."""
    from alignkit.generation import generate_from_spec

    policy_dir = lr.run_dir / lr.policy_name(r)
    params = _sampling(lr, r, lr.loop.candidates)
    key = artifacts.stable_hash({"policy": (artifacts.read_stage(policy_dir) or {}).get("run_id"),
                                 "sampling": params.to_dict(), "pool": lr.pool})
    path = lr.round_dir(r) / "candidates.jsonl"
    cached = _read_jsonl(path)
    if cached and cached[0].get("key") == key:
        return cached[1:]
    log(f"round {r}: sampling {lr.loop.candidates} candidates for each of {len(lr.pool)} prompts from "
        f"{lr.policy_name(r)}")
    texts = generate_from_spec(str(policy_dir), lr.pool, params)
    n = lr.loop.candidates
    rows = [{"prompt": p, "texts": texts[i * n:(i + 1) * n]} for i, p in enumerate(lr.pool)]
    _write_jsonl(path, [{"key": key}, *rows])
    return rows


# ---------------------------------------------------------------------------
# Step 2: which pairs people label


def _candidate_pairs(rows: list[dict]):
    """Every pair of distinct non-blank candidates of each prompt: (prompt index, i, j)."""
    for p, row in enumerate(rows):
        texts = row["texts"]
        for i, j in itertools.combinations(range(len(texts)), 2):
            if texts[i].strip() and texts[j].strip() and texts[i] != texts[j]:
                yield p, i, j


def select_round(lr: LoopRecipe, r: int, *, log=print) -> list[dict]:
    """The round's pairs, cached in selected.jsonl: by the previous round's ensemble's uncertainty (or at
    random in round 0 and with select: random), at most one per prompt. Candidates are sampled only when the
    round has no selection yet."""
    from alignkit.selection import CandidatePair, select_pairs

    path = lr.round_dir(r) / "selected.jsonl"
    if path.exists():
        return _read_jsonl(path)
    rows = sample_candidates(lr, r, log=log)
    triples = list(_candidate_pairs(rows))
    random_round = r == 0 or lr.loop.select == "random"
    rewards = None if random_round else _ensemble_rewards(lr, r - 1, rows)
    offset = list(itertools.accumulate([0] + [len(row["texts"]) for row in rows]))
    pairs = [CandidatePair(prompt=p, a=i, b=j,
                           rewards_a=() if rewards is None else rewards[:, offset[p] + i],
                           rewards_b=() if rewards is None else rewards[:, offset[p] + j]) for p, i, j in triples]
    rule = "random" if random_round else lr.loop.rule
    chosen = select_pairs(pairs, lr.loop.budget, rule=rule, per_prompt=1, seed=lr.cfg.seed + r)
    if not chosen:
        raise UserError(f"round {r}: no prompt has two different candidates to compare; raise loop.temperature "
                        f"or loop.candidates")
    selected = [{"prompt_index": c.pair.prompt, "prompt": rows[c.pair.prompt]["prompt"],
                 "responses": [rows[c.pair.prompt]["texts"][c.pair.a], rows[c.pair.prompt]["texts"][c.pair.b]],
                 "score": None if random_round else c.score, "rule": rule} for c in chosen]
    log(f"round {r}: {len(selected)} pairs chosen ({rule}) from {len(pairs)} candidate pairs")
    _write_jsonl(path, selected)
    return selected


def _ensemble_rewards(lr: LoopRecipe, r: int, rows: list[dict]):
    """(K, N) rewards of every candidate under round r's reward ensemble, loaded on one base."""
    from alignkit.reward_model import load_reward_ensemble

    # The members round r trained (loop.ensemble may have grown since): all of them score.
    dirs = [d for k in range(lr.loop.ensemble) if artifacts.is_complete(d := lr.run_dir / lr.member(r, lr.rewards[0], k))]
    ensemble = load_reward_ensemble(dirs)
    try:
        prompts = [row["prompt"] for row in rows for _ in row["texts"]]
        return ensemble.scores(prompts, [t for row in rows for t in row["texts"]])
    finally:
        del ensemble
        gc.collect()


def import_round(lr: LoopRecipe, r: int, selected: list[dict], store, *, log=print) -> None:
    """The selected pairs into the store, tagged with the round; never twice (the store says which rounds
    it holds, and an import is one transaction)."""
    from alignkit.store.importer import ImportRow, write_rows
    from alignkit.store.rounds import imported_rounds, round_models

    source = lr.policy_name(r)
    spec = str(lr.run_dir / source)
    if r in imported_rounds(store):
        # Rounds are numbered per store: a round sampled by another run's stages is not this loop's.
        others = round_models(store, r) - {spec}
        if others:
            raise UserError(f"label store {store.name} holds round {r} comparisons sampled by {sorted(map(str, others))[0]}, "
                            f"not by this loop's {spec}; give each loop its own label store")
        return
    params = _sampling(lr, r, lr.loop.candidates).to_dict()
    rows = [ImportRow(prompt=s["prompt"], source=f"loop round {r}: pool prompt {s['prompt_index'] + 1}",
                      responses=s["responses"], models=[spec, spec], sampling=[params, params], loop_round=r,
                      source_stage=source, selection_score=s["score"]) for s in selected]
    summary = write_rows(store, rows)
    if summary.new_comparisons == 0:
        raise UserError(f"round {r}: every selected pair is already in {store.name} (from an earlier import), so none "
                        f"can be this round's; sample more candidates (loop.candidates, loop.temperature)")
    reused = len(rows) - summary.new_comparisons
    log(f"round {r}: imported {summary.new_comparisons} comparisons into {store.name}"
        + (f" ({reused} selected pairs were in the store already and stay outside the round)" if reused else ""))


# ---------------------------------------------------------------------------
# Step 3: votes


def waiting_message(lr: LoopRecipe, r: int, store) -> str | None:
    """None once the round has its votes (min_votes of its comparisons with `overlap` votes), else where it stands."""
    from alignkit.store.rounds import round_progress

    return _waiting(lr, round_progress(store, r, lr.loop.overlap))


def _waiting(lr: LoopRecipe, p) -> str | None:
    if p.has_its_votes(lr.loop.min_votes):
        return None
    return (f"round {p.round}: {p.with_votes} of {p.comparisons} comparisons have their votes "
            f"({lr.loop.overlap} each; {p.needed(lr.loop.min_votes)} needed to train)")


# ---------------------------------------------------------------------------
# Step 4: train the round's stages on the votes so far


def export_votes(lr: LoopRecipe, r: int, store) -> None:
    """The votes each of the round's stages trains on, and the labels spent so far, written once per round:
    every file is computed before any is written, and ROUND_JSON, written last, says the round has them."""
    from alignkit.store.export import preference_rows

    if (lr.round_dir(r) / ROUND_JSON).exists():
        return
    reads_votes = "train" in runner.RECIPES[lr.policy.kind].KIND.data_keys
    exports = {}
    for role, template, which, needed in (("reward", lr.rewards[0] if lr.rewards else None, lr.loop.reward_votes, True),
                                          ("policy", lr.policy, lr.loop.policy_votes, reads_votes)):
        if template is None:
            continue
        policy = {k: template.data[k] for k in POLICY_KEYS if k in template.data and k != "rounds"}
        rows = preference_rows(store, rounds=list(range(r + 1)) if which == "all" else [r], **policy)
        if needed and not rows:
            raise UserError(f"round {r}: its votes give no preference pairs for the {role} stage yet (ties and "
                            f"both-bad votes are dropped); label more of round {r}'s comparisons")
        keep = ("prompt", "chosen", "rejected", "margin")
        exports[role] = [{k: row[k] for k in keep if k in row} for row in rows]
    labels = _labels_so_far(lr, r, store)
    for role, rows in exports.items():
        _write_jsonl(lr.round_dir(r) / VOTE_FILES[role], rows)
    artifacts.write_json_atomic(lr.round_dir(r) / ROUND_JSON, {"round": r, "labels": labels})


def train_round(lr: LoopRecipe, r: int, *, log=print) -> None:
    """The runner over the recipe with rounds 0..r, training round r's stages only: an earlier round is
    complete, and what changed since in its settings is left as it was (its row of loop.json describes it)."""
    cfg = round_config(lr, r)
    the_plan = runner.plan(cfg, only=[s.name for s in _round_stages(lr, r)], resume=True)
    runner.preflight(the_plan)
    runner.execute(the_plan, resume=True, log=log)


# ---------------------------------------------------------------------------
# Step 5: measure the round's policy


def measure_round(lr: LoopRecipe, r: int, labels: int, *, log=print) -> dict:
    """The round's table row: labels, the reward ensemble's held-out accuracy, win rates vs the previous
    round's and the first policy (compare, with a 95% CI), KL to loop.start and mean length."""
    from alignkit.reward_model import heldout_accuracy

    new = lr.trained_policy(r)
    row: dict[str, Any] = {"round": r, "policy": new, "labels": labels}
    accs = [heldout_accuracy(artifacts.read_stage(lr.run_dir / lr.member(r, lr.rewards[0], k)))
            for k in range(lr.loop.ensemble)] if lr.rewards else []
    accs = [a for a in accs if a is not None]
    row["rm_accuracy"] = sum(accs) / len(accs) if accs else None
    row["vs_previous"], row["vs_first"] = _versus(lr, r, new, lr.policy_name(r), lr.loop.start, log=log)
    row.update(policy_drift(lr, r))
    return row


def _judge(lr: LoopRecipe, r: int) -> str:
    if lr.loop.judge:
        return lr.loop.judge
    if not lr.rewards:
        raise UserError(f"{lr.cfg.where('loop')}: loop.judge is needed when loop.stages has no reward stage")
    return f"reward:{lr.run_dir / lr.member(r, lr.rewards[0], 0)}"


def _versus(lr: LoopRecipe, r: int, new: str, previous: str, first: str, *, log=print) -> tuple[dict, dict]:
    """(vs previous, vs first) for the round's policy, from one compare of the two or three policies."""
    from alignkit.compare import compare_models

    names = list(dict.fromkeys([new, previous, first]))  # round 0: previous is first
    result = compare_models({n: str(lr.run_dir / n) for n in names}, lr.eval_prompts, _judge(lr, r),
                            lr.round_dir(r) / "compare", _sampling(lr, r))
    entries = []
    for old in (previous, first):
        entry = {"against": old, **win_rate_of(result, new, old)}
        log(f"round {r}: {new} vs {old}: win rate {entry['win_rate']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]")
        entries.append(entry)
    return entries[0], entries[1]


def win_rate_of(result: dict, name: str, other: str | None = None) -> dict:
    """`name`'s win rate (ties half) and 95% CI over `other` (default: the one other model) in a compare.json,
    whichever side compare put it on."""
    pairs = [p for p in result["pairs"] if name in (p["model_a"], p["model_b"])
             and (other is None or other in (p["model_a"], p["model_b"]))]
    if len(pairs) != 1:
        raise ValueError(f"no single pair of {name!r}" + (f" and {other!r}" if other else "") + " in the comparison")
    pair = pairs[0]
    if pair["win_rate"] is None:
        raise UserError(f"{pair['model_a']} vs {pair['model_b']}: no battle was decided (identical responses?)")
    if pair["model_a"] == name:
        return {"win_rate": pair["win_rate"], "ci_low": pair["ci_low"], "ci_high": pair["ci_high"], "n": pair["n"]}
    return {"win_rate": 1 - pair["win_rate"], "ci_low": 1 - pair["ci_high"], "ci_high": 1 - pair["ci_low"],
            "n": pair["n"]}


def policy_drift(lr: LoopRecipe, r: int) -> dict:
    """KL(policy ‖ loop.start) on samples of the round's policy (temperature 1, the policy itself) and their
    mean length in characters."""
    from alignkit.generation import generate_batch
    from alignkit.modeling import load_model_for_inference
    from alignkit.policy_stats import kl_to_reference, sequence_logprobs

    params = dataclasses.replace(_sampling(lr, r), temperature=1.0, top_p=1.0)
    model, tokenizer, _ = load_model_for_inference(str(lr.run_dir / lr.trained_policy(r)))
    out = generate_batch(model, tokenizer, lr.eval_prompts, params)
    logp = sequence_logprobs(model, out.prompt_ids, out.response_ids, tokenizer.pad_token_id)
    del model
    reference, _, _ = load_model_for_inference(str(lr.run_dir / lr.loop.start))
    logp_ref = sequence_logprobs(reference, out.prompt_ids, out.response_ids, tokenizer.pad_token_id)
    del reference
    gc.collect()
    kl = kl_to_reference(logp, logp_ref, temperature=1.0, top_p=1.0, seed=lr.cfg.seed)
    return {"kl": kl["kl"], "kl_ci": [kl["ci_low"], kl["ci_high"]],
            "mean_length": sum(len(t) for t in out.texts) / len(out.texts)}


# ---------------------------------------------------------------------------
# The rounds, in order


def run_loop(lr: LoopRecipe, *, wait: bool = False, poll_seconds: float = 10.0, log=print) -> LoopState:
    """Every round that can go forward does: sample, select, import, (wait for votes), train, measure.
    Returns at the first round still waiting for votes (unless `wait`), or when all rounds are complete."""
    from alignkit.store import open_store

    table = read_table(lr)
    _train_base(lr, log=log)
    for r in range(lr.loop.rounds):
        if _row(table, r) is not None:
            continue
        store = open_store(lr.loop.labels_db, overlap=lr.loop.overlap)
        try:
            if not (lr.round_dir(r) / ROUND_JSON).exists():
                import_round(lr, r, select_round(lr, r, log=log), store, log=log)
                message = waiting_message(lr, r, store)
                while message and wait:
                    log(message)
                    time.sleep(poll_seconds)
                    message = waiting_message(lr, r, store)
                if message:
                    log(message)
                    return LoopState(r, r, message)
                export_votes(lr, r, store)
        finally:
            store.close()
        train_round(lr, r, log=log)
        labels = json.loads((lr.round_dir(r) / ROUND_JSON).read_text())["labels"]
        table["rounds"].append(measure_round(lr, r, labels, log=log))
        write_table(lr, table)
    message = f"all {lr.loop.rounds} rounds complete: {lr.run_dir / LOOP_JSON}"
    log(message)
    return LoopState(lr.loop.rounds, None, message)


def _train_base(lr: LoopRecipe, *, log=print) -> None:
    """The stages round 0 needs (loop.start and the reward stages' parents), skipped when complete."""
    the_plan = runner.plan(base_config(lr), only=[], resume=True)
    if the_plan.todo():
        runner.preflight(the_plan)
        runner.execute(the_plan, resume=True, log=log)


def _labels_so_far(lr: LoopRecipe, r: int, store) -> int:
    from alignkit.store.rounds import round_progress

    return sum(round_progress(store, k, lr.loop.overlap).votes for k in range(r + 1))


def _row(table: dict, r: int) -> dict | None:
    return next((row for row in table["rounds"] if row["round"] == r), None)


def read_table(lr: LoopRecipe) -> dict:
    """loop.json as it stands (complete rounds stay complete when loop: settings change; raising `rounds`
    adds rounds), or an empty table."""
    path = lr.run_dir / LOOP_JSON
    table = json.loads(path.read_text()) if path.exists() else {"rounds": []}
    return {**table, "recipe": str(lr.cfg.path.resolve()), "settings": dataclasses.asdict(lr.loop)}


def write_table(lr: LoopRecipe, table: dict) -> None:
    artifacts.write_json_atomic(lr.run_dir / LOOP_JSON, table)
    loop_plot(table["rounds"], lr.run_dir / "loop.png")


def loop_plot(rows: list[dict], path: Path) -> Path:
    """Win rate per round vs the previous round and vs the first policy (95% CI), and KL to the first policy."""
    from alignkit.plots import _pyplot, save

    plt = _pyplot()
    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [row["round"] for row in rows]
    for key, label, shift in (("vs_previous", "vs the previous round", -0.05), ("vs_first", "vs the first policy", 0.05)):
        rates = [row[key]["win_rate"] for row in rows]
        err = [[max(0.0, w - row[key]["ci_low"]) for w, row in zip(rates, rows)],
               [max(0.0, row[key]["ci_high"] - w) for w, row in zip(rates, rows)]]
        ax.errorbar([x + shift for x in xs], rates, yerr=err, marker="o", capsize=4, label=label)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="round", ylabel="win rate (ties half), 95% CI", ylim=(0, 1), xticks=xs)
    ax.legend(fontsize=8)
    kl_ax.plot(xs, [row["kl"] for row in rows], marker="o")
    kl_ax.set(xlabel="round", ylabel="KL to the first policy (nats)", xticks=xs)
    return save(plt, fig, path)


# ---------------------------------------------------------------------------
# --status: every round's state, changing nothing


def describe_rounds(lr: LoopRecipe) -> list[str]:
    from alignkit.store import open_store

    table = read_table(lr)
    store = open_store(lr.loop.labels_db, overlap=lr.loop.overlap)
    try:
        return [_round_line(lr, r, _row(table, r), store) for r in range(lr.loop.rounds)]
    finally:
        store.close()


def _round_line(lr: LoopRecipe, r: int, row: dict | None, store) -> str:
    if row is not None:
        acc = f", reward accuracy {row['rm_accuracy']:.3f}" if row.get("rm_accuracy") is not None else ""
        vs = row["vs_previous"]
        return (f"round {r}: complete ({row['labels']} labels{acc}; vs {vs['against']} {vs['win_rate']:.3f} "
                f"[{vs['ci_low']:.3f}, {vs['ci_high']:.3f}], KL {row['kl']:.2f})")
    from alignkit.store.rounds import round_progress

    if (lr.round_dir(r) / ROUND_JSON).exists():
        return f"round {r}: has its votes; training or measuring (a rerun continues)"
    p = round_progress(store, r, lr.loop.overlap)
    if p.comparisons == 0:
        return f"round {r}: not started"
    return _waiting(lr, p) or f"round {r}: has its votes; a rerun trains it"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """All lines or none: written beside the file and moved over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def loop_from_cli(args) -> int:
    lr = load_loop_recipe(args.config, args.overrides)
    if args.status:
        for line in describe_rounds(lr):
            print(line)
        return 0
    run_loop(lr, wait=args.wait, poll_seconds=args.poll_seconds)
    return 0
