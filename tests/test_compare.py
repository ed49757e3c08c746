"""`alignkit compare` end to end on tiny models: generation cache, judges, statistics, outputs, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from alignkit.cli import main
from alignkit import compare, stats
from alignkit.compare import compare_models, parse_model_args, read_prompts
from alignkit.errors import UserError
from alignkit.generation import SamplingParams
from alignkit.judges import load_judge

PROMPTS = ["the acting was", "the plot felt", "I watched the movie last night and", "my friend said the film was",
           "the ending seemed", "overall the music was"]


def make_lora_adapter(base_dir: Path, out: Path, seed: int, *, scale: float = 0.5) -> Path:
    """A LoRA adapter on the tiny base with random (non-zero) lora_B, so it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def make_reward_stage(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A complete reward stage (LoRA + score head on the tiny base, unquantized) without training it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.artifacts import complete_stage

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32,
                                                               pad_token_id=tok.pad_token_id)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                             modules_to_save=["score"], task_type="SEQ_CLS"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    complete_stage(out, {"name": "reward", "kind": "reward", "base": str(base_dir), "parents": [],
                         "model": {"quantization": "none", "dtype": "float32"}, "config_hash": "reward-test",
                         "metrics": {"heldout_accuracy": 1.0}})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare-models")
    return {
        "base": tiny_model_dir,
        "ad1": make_lora_adapter(tiny_model_dir, root / "ad1", seed=1),
        "ad2": make_lora_adapter(tiny_model_dir, root / "ad2", seed=2),
    }


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p} for p in PROMPTS[:-1]] + [{"messages": [{"role": "user", "content": PROMPTS[-1]}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cli(*argv) -> int:
    return main(["compare", *map(str, argv)])


def test_compare_end_to_end_with_cache_and_a_third_model(models, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--prompts", prompts_file, "--judge", "oracle:length", "--out", out, "--max-new-tokens", 12,
              "--bootstrap", 200, "--seed", 3]
    assert _cli("--model", f"base={models['base']}", "--model", f"ad1={models['ad1']}", *common) == 0
    first = json.loads((out / "compare.json").read_text())
    assert first["generated"] == 2 * len(PROMPTS) and first["cached"] == 0
    assert first["judge"] == "oracle:length"
    assert first["sampling"] == {"max_new_tokens": 12, "temperature": 0.7, "top_p": 1.0, "seed": 3, "batch_size": 16,
                                 "num_return_sequences": 1}
    (pair,) = first["pairs"]
    for key in ("wins", "losses", "ties", "win_rate", "ci_low", "ci_high"):
        assert key in pair
    assert pair["wins"] + pair["losses"] + pair["ties"] == len(PROMPTS)
    assert pair["ci_low"] <= pair["win_rate"] <= pair["ci_high"]
    assert {"lc_win_rate", "lc_ci_low", "lc_ci_high", "length_coef"} <= set(pair)  # beside the raw one
    assert 0.0 <= pair["lc_win_rate"] <= 1.0
    assert set(first["mean_length"]) == {"base", "ad1"} and "ratings" not in first
    assert (out / "compare.md").exists() and (out / "win_rates.png").stat().st_size > 1000
    assert not (out / "ratings.png").exists()

    # The oracle verdicts agree with the cached responses' lengths.
    texts = {}
    for name in ("base", "ad1"):
        cache = out / first["models"][name]["cache_file"]
        texts[name] = [json.loads(line)["response"] for line in cache.read_text().splitlines()]
    expected = sum(len(a.strip()) > len(b.strip()) for a, b in zip(texts["base"], texts["ad1"]))
    assert pair["wins"] == expected

    # Second run: everything from the cache, same results.
    assert _cli("--model", f"base={models['base']}", "--model", f"ad1={models['ad1']}", *common) == 0
    second = json.loads((out / "compare.json").read_text())
    assert second["generated"] == 0 and second["cached"] == 2 * len(PROMPTS)
    assert second["pairs"] == first["pairs"]

    # A third model: only it is sampled; ratings, the win matrix and the ratings plot appear.
    assert _cli("--model", f"base={models['base']}", "--model", f"ad1={models['ad1']}",
                "--model", f"ad2={models['ad2']}", *common) == 0
    third = json.loads((out / "compare.json").read_text())
    assert {m: i["generated"] for m, i in third["models"].items()} == {"base": 0, "ad1": 0, "ad2": len(PROMPTS)}
    assert len(third["pairs"]) == 3
    assert set(third["ratings"]) == {"base", "ad1", "ad2"}
    for r in third["ratings"].values():
        assert r["ci_low"] <= r["rating"] <= r["ci_high"] and "elo" not in r
    assert "ratings_warning" in third and "online Elo" not in (out / "compare.md").read_text()
    assert "ratings_length_controlled" in third and "length-controlled" in (out / "compare.md").read_text()
    assert third["win_matrix"]["base"]["ad1"] == pytest.approx(first["pairs"][0]["win_rate"])
    assert (out / "ratings.png").stat().st_size > 1000
    assert "## Ratings" in (out / "compare.md").read_text()
    assert "generated" in capsys.readouterr().out


def test_sentiment_oracle_and_library_call(models, tmp_path):
    from alignkit.tasks import sentiment

    params = SamplingParams(max_new_tokens=10, temperature=0.0, seed=0)
    result = compare_models({"base": str(models["base"]), "ad2": str(models["ad2"])}, PROMPTS, "oracle:sentiment",
                            tmp_path / "o", params, bootstrap=100)
    (pair,) = result["pairs"]
    battles = [json.loads(line) for line in (tmp_path / "o" / "battles.jsonl").read_text().splitlines()]
    # Sides were randomised, and each verdict is the oracle's on the sides as shown.
    cache = {m: [json.loads(x)["response"] for x in (tmp_path / "o" / result["models"][m]["cache_file"]).read_text().splitlines()]
             for m in ("base", "ad2")}
    for b in battles:
        i = b["prompt_index"]
        assert b["winner"] == sentiment.oracle_judge(PROMPTS[i], cache[b["model_a"]][i], cache[b["model_b"]][i])
    assert pair["wins"] + pair["losses"] + pair["ties"] == len(PROMPTS)


def test_reward_judge(models, tmp_path):
    from alignkit.reward_model import load_reward_scorer

    stage = make_reward_stage(models["base"], tmp_path / "reward")
    params = SamplingParams(max_new_tokens=10, temperature=0.0, seed=0)
    result = compare_models({"base": str(models["base"]), "ad1": str(models["ad1"])}, PROMPTS, f"reward:{stage}",
                            tmp_path / "r", params, bootstrap=100)
    (pair,) = result["pairs"]
    scorer = load_reward_scorer(stage)
    texts = {m: [json.loads(x)["response"] for x in (tmp_path / "r" / result["models"][m]["cache_file"]).read_text().splitlines()]
             for m in ("base", "ad1")}
    sb, sa = scorer.score(PROMPTS, texts["base"]), scorer.score(PROMPTS, texts["ad1"])
    assert pair["wins"] == sum(x > y for x, y in zip(sb, sa))
    assert pair["losses"] == sum(x < y for x, y in zip(sb, sa))
    # A huge margin makes everything a tie.
    wide = compare_models({"base": str(models["base"]), "ad1": str(models["ad1"])}, PROMPTS, f"reward:{stage}",
                          tmp_path / "r", params, tie_margin=1e9, bootstrap=100)
    assert wide["pairs"][0]["ties"] == len(PROMPTS) and wide["generated"] == 0


def test_llm_judge_scores_both_orders(models):
    from alignkit.judges import LLMJudge

    judge = LLMJudge.load(str(models["base"]))
    a = ["the film was great", "bad", "it was fine"]
    b = ["the film was awful", "good", "it was fine"]
    verdicts = judge.judge(PROMPTS[:3], a, b)
    assert all(v in ("a", "b", "tie") for v in verdicts)
    # Identical responses: both orders give the same margin, so the judge cannot prefer a side.
    f, r = judge.last_margins[2]
    assert f == pytest.approx(r, abs=1e-5) and verdicts[2] == "tie"
    for v, (f, r), d in zip(verdicts, judge.last_margins, judge.last_position_disagreement):
        assert v == ("a" if f > 0 and r < 0 else "b" if f < 0 and r > 0 else "tie")
        assert d == (f != 0 and r != 0 and (f > 0) == (r > 0))  # the same position won in both orders
    assert judge.both_orders
    # Swapping the inputs swaps the verdicts (order cancels out).
    swapped = judge.judge(PROMPTS[:3], b, a)
    assert swapped == [{"a": "b", "b": "a", "tie": "tie"}[v] for v in verdicts]


def test_bad_input(models, prompts_file, tmp_path, capsys):
    out = tmp_path / "bad"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert _cli("--model", models["base"], "--model", models["ad1"], "--prompts", bad, "--judge", "oracle:length",
                "--out", out) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert _cli("--model", models["base"], "--prompts", prompts_file, "--judge", "oracle:length", "--out", out) == 2
    assert "at least 2" in capsys.readouterr().err
    assert _cli("--model", models["base"], "--model", models["ad1"], "--prompts", prompts_file,
                "--judge", "oracle:nope", "--out", out) == 2
    assert "unknown oracle" in capsys.readouterr().err
    assert _cli("--model", models["base"], "--model", tmp_path / "missing", "--prompts", prompts_file,
                "--judge", "oracle:length", "--out", out) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _cli("--model", models["base"], "--model", models["ad1"], "--prompts", prompts_file,
                "--judge", f"reward:{tmp_path / 'nostage'}", "--out", out) == 2
    assert "reward" in capsys.readouterr().err
    # Sampling settings, the prompt limit and an unusable label store fail before any model is loaded.
    for flags, message in ((["--temperature", -3], "temperature must be >= 0"), (["--top-p", 7], r"top_p must be in \(0, 1\]"),
                           (["--max-new-tokens", 0], "max_new_tokens must be an integer >= 1"),
                           (["--limit", 0], "--limit must be >= 1"),
                           (["--judge", f"human:{tmp_path / 'no' / 'dir.db'}"], "cannot create label store")):
        judge = [] if "--judge" in flags else ["--judge", "oracle:length"]
        assert _cli("--model", models["base"], "--model", models["ad1"], "--prompts", prompts_file, *judge,
                    "--out", out, *flags) == 2
        assert re.search(message, capsys.readouterr().err), flags
    assert not out.exists()  # nothing written for bad input


def test_a_prompt_listed_twice_counts_once(models, prompts_file, tmp_path, capsys):
    """Duplicates counted as independent prompts narrowed every CI (24 lines, 12 prompts: CI [0.245, 0.612]
    instead of [0.193, 0.680]); they are dropped, and said so."""
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text(prompts_file.read_text() * 2)
    out = tmp_path / "out"
    assert _cli("--model", f"base={models['base']}", "--model", f"ad1={models['ad1']}", "--prompts", doubled,
                "--judge", "oracle:length", "--out", out, "--max-new-tokens", 6, "--bootstrap", 200) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["n_prompts"] == len(PROMPTS) and result["duplicate_prompts_dropped"] == len(PROMPTS)
    assert result["pairs"][0]["units"] == len(PROMPTS)
    assert f"{len(PROMPTS)} duplicate prompts dropped" in capsys.readouterr().out
    assert f"{len(PROMPTS)} duplicate prompts in the prompts file were dropped" in (out / "compare.md").read_text()


def test_cached_responses_with_unicode_line_separators_are_read_back(tmp_path):
    """str.splitlines() also splits at U+2028 / U+0085, which JSON leaves unescaped: such a response was never
    read back from the cache and was sampled again on every run."""
    from alignkit.compare import _read_cache

    path = tmp_path / "cache.jsonl"
    rows = [{"prompt_key": "k1", "response": "one\u2028two\u0085three"}, {"prompt_key": "k2", "response": "x"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert _read_cache(path) == {"k1": "one\u2028two\u0085three", "k2": "x"}


def test_model_names_and_prompt_parsing(models, prompts_file):
    named = parse_model_args([f"x={models['base']}", str(models["ad1"]), str(models["ad1"])])
    assert list(named) == ["x", "ad1", "ad1-2"]
    assert read_prompts(prompts_file, limit=2) == PROMPTS[:2]
    with pytest.raises(UserError, match="prompts file not found"):
        read_prompts("/nonexistent.jsonl")
    # The PPO prompts file (prompt as a message list) is a prompts file here too: one rule for every prompt file.
    shipped = read_prompts(Path(__file__).resolve().parents[1] / "recipes" / "data" / "tiny_prompts.jsonl", limit=1)
    assert shipped == [[{"role": "user", "content": "Give me a note on the food?"}]]


def _fake_stage(tmp_path: Path, name: str, base: Path, adapter_bytes: bytes, config_hash: str = "same-hash") -> Path:
    """A complete stage directory whose adapter weights are `adapter_bytes` (model_identity never loads them)."""
    from alignkit.artifacts import complete_stage

    stage = tmp_path / name
    stage.mkdir()
    (stage / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (stage / "adapter_model.safetensors").write_bytes(adapter_bytes)
    complete_stage(stage, {"name": "dpo", "kind": "dpo", "base": str(base), "parents": [], "config_hash": config_hash})
    return stage


def test_cache_identity_follows_the_weights_not_the_config_hash(tiny_model_dir, tmp_path):
    """Two runs of one recipe (CPU and GPU, or before and after a fix) share a config hash, not weights."""
    import shutil

    cpu = _fake_stage(tmp_path, "cpu", tiny_model_dir, b"weights trained on the cpu")
    gpu = _fake_stage(tmp_path, "gpu", tiny_model_dir, b"weights trained on the gpu")
    again = _fake_stage(tmp_path, "again", tiny_model_dir, b"weights trained on the cpu")
    ids = {p: compare.model_identity(str(p)) for p in (cpu, gpu, again)}
    assert ids[cpu]["stage_config_hash"] == ids[gpu]["stage_config_hash"] == "same-hash"
    assert ids[cpu] != ids[gpu]
    assert ids[cpu] == ids[again]  # same weights, same base: the same model wherever the directory is

    # A plain local model directory: a rewritten weights file changes the identity (by size and mtime).
    local = Path(shutil.copytree(tiny_model_dir, tmp_path / "local"))
    before = compare.model_identity(str(local))
    assert before == compare.model_identity(str(local))
    weights = next(local.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    after = compare.model_identity(str(local))
    assert after != before and after["base"] == before["base"]
    # A stage on that base follows its base's files too.
    on_local = _fake_stage(tmp_path, "on-local", local, b"w")
    first = compare.model_identity(str(on_local))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert compare.model_identity(str(on_local)) != first


class _BothOrdersJudge:
    """A judge that, like the LLM judge, scores both orders: prefers the longer response, except that on
    every third call item its two orders disagree (a tie)."""

    name = "fake:both-orders"
    both_orders = True

    def __init__(self):
        self.last_position_disagreement: list[bool] = []

    def judge(self, prompts, a, b):
        self.last_position_disagreement = [i % 3 == 0 for i in range(len(prompts))]
        return ["tie" if d else ("a" if len(x) > len(y) else "b")
                for d, x, y in zip(self.last_position_disagreement, a, b)]


def _result(names, battles, responses, judge="fake", **extra) -> dict:
    sampling = SamplingParams(seed=0).to_dict()
    return {"judge": judge, "bootstrap": 100, "n_prompts": len(next(iter(responses.values()))), "sampling": sampling,
            "models": {m: {"spec": f"/specs/{m}"} for m in names}, **extra,
            **compare.summarise(names, battles, responses, bootstrap=100, seed=0)}


def test_position_disagreement_is_reported_per_pair(tmp_path):
    prompts = [f"p{i}" for i in range(9)]
    responses = {"x": ["long answer"] * 9, "y": ["short"] * 9}
    battles = compare.judge_all(_BothOrdersJudge(), prompts, responses, seed=0)
    assert [b["position_disagreement"] for b in battles] == [i % 3 == 0 for i in range(9)]
    result = _result(["x", "y"], battles, responses)
    (pair,) = result["pairs"]
    assert pair["position_disagreement_rate"] == pytest.approx(3 / 9) and pair["position_disagreements"] == 3
    assert pair["ties"] == 3 and pair["wins"] == 6
    compare.write_markdown(result, tmp_path / "compare.md")
    md = (tmp_path / "compare.md").read_text()
    assert "orders disagree" in md and "0.333" in md
    # A pointwise judge has no orders to disagree: no key, no column.
    plain = compare.judge_all(load_judge("oracle:length"), prompts, responses, seed=0)
    assert all("position_disagreement" not in b for b in plain)
    assert "position_disagreement_rate" not in _result(["x", "y"], plain, responses)["pairs"][0]


def test_summarise_clusters_by_prompt_and_warns_when_a_model_never_loses(tmp_path):
    names = ["top", "mid", "low"]
    responses = {m: ["r"] * 30 for m in names}
    rng = np.random.default_rng(0)
    battles = []
    for i in range(30):
        battles.append({"prompt_index": i, "model_a": "top", "model_b": "mid", "winner": "a"})
        battles.append({"prompt_index": i, "model_a": "low", "model_b": "top", "winner": "b"})
        battles.append({"prompt_index": i, "model_a": "mid", "model_b": "low", "winner": "a" if rng.random() < 0.6 else "b"})
    result = _result(names, battles, responses)
    assert "top never lost or tied" in result["ratings_warning"]
    assert result["ratings_connectivity"]["groups"][0] == ["top"]
    assert result["pairs"][0]["ci_method"] == "wilson-over-prompts" and result["pairs"][0]["ci_low"] < 0.9
    assert result["ratings"]["top"]["rating"] - result["ratings"]["mid"]["rating"] < 800  # finite, not thousands
    compare.write_markdown(result, tmp_path / "compare.md")
    md = (tmp_path / "compare.md").read_text()
    assert "**Warning:** No finite maximum-likelihood ratings" in md and "wilson-over-prompts" in md
    # Ratings resample prompts, not battles (every pair meets on every prompt).
    tuples = [(b["model_a"], b["model_b"], b["winner"]) for b in battles]
    by_prompt = stats.bootstrap_ratings(tuples, rounds=100, seed=0, clusters=[b["prompt_index"] for b in battles])
    assert result["ratings"] == {m: by_prompt[m] for m in result["ratings"]}
    assert result["ratings"] != {m: r for m, r in stats.bootstrap_ratings(tuples, rounds=100, seed=0).items()}


def test_summarise_reports_a_length_controlled_win_rate_beside_the_raw_one(tmp_path):
    """Two equally good models; the judge prefers the longer response by construction."""
    rng = np.random.default_rng(4)
    n = 300
    responses = {"long": ["x" * max(1, int(rng.normal(150, 40))) for _ in range(n)],
                 "short": ["x" * max(1, int(rng.normal(100, 40))) for _ in range(n)]}
    d = np.array([len(a) - len(b) for a, b in zip(responses["long"], responses["short"])])
    p_long = 1 / (1 + np.exp(-2.0 * np.tanh(d / d.std())))
    battles = [{"prompt_index": i, "model_a": "long", "model_b": "short", "winner": "a" if rng.random() < p_long[i]
                else "b"} for i in range(n)]
    result = compare.summarise(["long", "short"], battles, responses, bootstrap=300, seed=0)
    (pair,) = result["pairs"]
    assert pair["win_rate"] > 0.7 and pair["ci_low"] > 0.6  # raw: long looks better
    assert pair["lc_ci_low"] < 0.5 < pair["lc_ci_high"]  # at equal length it is not
    compare.write_markdown({**result, "judge": "x", "n_prompts": n, "bootstrap": 300, "models": {},
                            "sampling": {"seed": 0, "max_new_tokens": 1, "temperature": 1.0, "top_p": 1.0}},
                           tmp_path / "compare.md")
    assert "length-controlled" in (tmp_path / "compare.md").read_text()
