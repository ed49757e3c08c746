"""Best-of-N through `alignkit run` on the tiny model: SFT -> reward -> best_of_n.

The stage must sample from the SFT policy (the same texts come back when the test samples again), keep per
prompt the sample the reward stage scores highest (scores recomputed here with the reward model), train on
exactly those (the loss covers their assistant tokens), record the reward distribution in stage.json, move
the SFT adapter and not the base, skip on a rerun, and refuse bad settings in one line naming file:line:key.
"""

import numpy as np
import pytest
from safetensors.torch import load_file

from alignkit.artifacts import file_fingerprint, read_stage
from alignkit.cli import EXIT_BAD_INPUT, main
from alignkit.rejection_sampling import read_samples
from tests.conftest import REPO
from tests.test_reward_stage import write_recipe as rlhf_recipe

PROMPTS = REPO / "recipes" / "data" / "tiny_prompts.jsonl"
N = 4
# The SFT -> reward -> best_of_n chain takes ~30 s on two CPU cores; the bad-input tests below need none of it.
slow = pytest.mark.slow


def write_recipe(tmp, edit=None):
    """tiny_rlhf's SFT and reward stages, then a best_of_n stage sampling N responses to the tiny prompts."""

    def with_best_of_n(raw):
        raw["stages"][1]["train"]["max_steps"] = 20  # enough for the easy preference; the accuracy gate checks it
        raw["stages"].append({"name": "bon", "kind": "best_of_n", "after": "sft", "reward": "reward",
                              "data": {"prompts": str(PROMPTS)},
                              "train": {"num_samples": N, "sample_max_new_tokens": 12, "sample_temperature": 1.0,
                                        "max_steps": 6, "per_device_train_batch_size": 8, "learning_rate": 2e-3,
                                        "max_length": 128, "logging_steps": 2, "save_steps": 6,
                                        "gradient_checkpointing": False}})
        if edit:
            edit(raw)

    return rlhf_recipe(tmp, edit=with_best_of_n)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("best_of_n")
    path = write_recipe(tmp)
    base_before = file_fingerprint(tiny_model_dir)
    assert main(["run", str(path)]) == 0
    run = tmp / "run"
    return {"recipe": path, "run": run, "base": tiny_model_dir, "base_before": base_before,
            "record": read_stage(run / "bon"), "candidates": read_samples(run / "bon" / "samples.jsonl")}


@pytest.fixture(scope="module")
def rescored(run):
    """Every sample scored again by the reward stage, one list of N scores per prompt."""
    from alignkit.reward_model import load_reward_scorer

    scorer = load_reward_scorer(run["run"] / "reward")
    cands = run["candidates"]
    flat = scorer.score([c.prompt for c in cands for _ in c.texts], [t for c in cands for t in c.texts])
    return [flat[i * N:(i + 1) * N] for i in range(len(cands))]


@slow
def test_samples_are_the_sft_policys_own(run):
    """Sampling the SFT stage again with the recorded settings gives back every text, character for character."""
    from alignkit.generation import SamplingParams, generate_batch
    from alignkit.modeling import ModelSettings, attach_adapter, load_base_model, load_tokenizer

    cands = run["candidates"]
    assert len(cands) == len(PROMPTS.read_text().splitlines()) and all(len(c.texts) == N for c in cands)
    settings = ModelSettings(**{**run["record"]["model"], "base": str(run["base"])})
    model = attach_adapter(load_base_model(settings), run["run"] / "sft", trainable=False).eval()
    params = SamplingParams(**run["record"]["data"]["sampling"])
    again = generate_batch(model, load_tokenizer(str(run["run"] / "sft"), padding_side="left"),
                           [c.prompt for c in cands], params)
    assert again.texts == [t for c in cands for t in c.texts]
    assert len({t for c in cands for t in c.texts}) > len(cands)  # N different samples, not one repeated


@slow
def test_kept_sample_is_the_top_scored_one(run, rescored):
    cands = run["candidates"]
    for c, scores in zip(cands, rescored):
        assert c.scores == pytest.approx(scores, abs=1e-4)
        assert c.best == int(np.argmax(scores))
    assert len({c.best for c in cands}) > 1  # not always the first sample


@slow
def test_trained_on_exactly_the_kept_samples(run):
    """TRL's labels cover the kept responses' assistant tokens (as alignkit's turn-by-turn mask counts them),
    and no other choice of samples has the same count."""
    from alignkit.data.chat_mask import turn_by_turn_mask
    from alignkit.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(run["run"] / "sft"))
    cands = run["candidates"]

    def assistant_tokens(picks):
        return sum(sum(turn_by_turn_mask(tokenizer, [*c.prompt, {"role": "assistant", "content": c.texts[i]}])
                       .assistant_masks) for c, i in zip(cands, picks))

    data = run["record"]["data"]
    assert data["train_rows"] == len(cands) and data["format"] == "messages"
    assert data["loss_tokens"] == assistant_tokens([c.best for c in cands])
    assert all(data["loss_tokens"] != assistant_tokens([(c.best + k) % N for c in cands]) for k in range(1, N))


@slow
def test_reward_distribution_recorded(run, rescored):
    sel = run["record"]["metrics"]["best_of_n"]
    every = np.array(rescored).ravel()
    kept = np.array([max(s) for s in rescored])
    assert sel["num_samples"] == N and sel["prompts"] == len(rescored) and sel["all"]["count"] == N * len(rescored)
    for name, values in (("all", every), ("chosen", kept)):
        d = sel[name]
        assert d["mean"] == pytest.approx(values.mean(), abs=1e-4) and d["std"] == pytest.approx(values.std(), abs=1e-4)
        expected = np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
        assert [d[k] for k in ("min", "q25", "median", "q75", "max")] == pytest.approx(expected, abs=1e-4)
    assert sel["chosen"]["mean"] > sel["all"]["mean"]


@slow
def test_adapter_moved_from_sft_and_base_untouched(run):
    sft, bon = (load_file(str(run["run"] / n / "adapter_model.safetensors")) for n in ("sft", "bon"))
    assert bon.keys() == sft.keys() and all("lora_" in k for k in bon)
    assert sum((bon[k].float() - sft[k].float()).norm() for k in bon) > 1e-3
    record = run["record"]
    assert record["complete"] and record["lineage"] == ["sft"] and record["parents"]["reward"]["name"] == "reward"
    assert record["metrics"]["global_step"] == 6
    assert file_fingerprint(run["base"]) == run["base_before"]


@slow
def test_rerun_is_a_skip(run, capsys):
    assert main(["run", str(run["recipe"])]) == 0
    out = capsys.readouterr().out
    assert out.count("complete, skipped") == 3 and "training into" not in out
    assert read_stage(run["run"] / "bon")["run_id"] == run["record"]["run_id"]


@pytest.mark.parametrize("key, value, needle", [
    ("num_samples", 1, "num_samples=1 must be at least 2"),
    ("num_samples", "many", "stages.bon.train.num_samples='many'"),
    ("sample_temperature", 0, "the N samples would be identical"),
    ("sample_top_p", 1.5, "sample_top_p=1.5: sampling: top_p must be in (0, 1]"),
    ("num_sample", 4, "unknown key stages.bon.train.num_sample (did you mean 'num_samples'?)"),
])
def test_bad_setting_is_one_line_naming_file_line_key(tmp_path, capsys, tiny_model_dir, key, value, needle):
    def edit(raw):
        train = raw["stages"][-1]["train"]
        train.pop(key, None)
        raw["stages"][-1]["train"] = {key: value, **train}

    path = write_recipe(tmp_path, edit)
    code = main(["run", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "Traceback" not in err and len(err.splitlines()) == 1, err
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- name: bon")
    line = next(i for i, text in enumerate(lines[start:], start + 1) if text.strip().startswith(f"{key}:"))
    assert f"error: {path}:{line}: " in err and needle in err, err
    assert not list(tmp_path.rglob("stage.json"))


@pytest.mark.parametrize("drop, needle", [("reward", "a best_of_n stage needs `reward:`"),
                                          ("after", "a best_of_n stage samples from its parent policy")])
def test_missing_parent_is_one_line(tmp_path, capsys, tiny_model_dir, drop, needle):
    path = write_recipe(tmp_path, lambda raw: raw["stages"][-1].pop(drop))
    code = main(["run", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"error: {path}:" in err and needle in err, err
    assert not list(tmp_path.rglob("stage.json"))
