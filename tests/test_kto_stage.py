"""KTO from a label store's votes, both-bad ones included, and DPO from the same chat-prompt store.

One SFT -> {KTO, DPO} run on the tiny model. The store holds chat prompts with text responses (what
`alignkit label import` keeps for `messages` rows): TRL's DPO crashed on that shape before the data layer
made it one. The KTO stage must take both-bad comparisons as two undesirable examples, move its adapter away
from the SFT one it starts from, leave the base alone, and prefer the desirable responses on held-out prompts.
"""

import json

import pytest
import yaml
from safetensors.torch import load_file

from alignkit.artifacts import file_fingerprint, read_stage
from alignkit.store import next_item, open_store, submit_vote
from alignkit.store.importer import import_file
from recipes.runner import run_recipe
from tests.conftest import REPO

KTO_RECIPE = REPO / "recipes" / "configs" / "tiny_sft_kto.yaml"
PREFS = REPO / "recipes" / "data" / "tiny_prefs.jsonl"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("kto")
    pairs = [json.loads(line) for line in PREFS.read_text().splitlines()]
    rows = [{"messages": [{"role": "user", "content": f"{p['prompt'][0]['content']} (#{i})"}],
             "responses": [p["chosen"][0]["content"], p["rejected"][0]["content"]]} for i, p in enumerate(pairs)]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = str(tmp / "labels.db")
    store = open_store(db, overlap=1)
    import_file(store, tmp / "in.jsonl", progress=False)
    votes = {"a": 0, "both_bad": 0}
    while (item := next_item(store, "ann")) is not None:
        # Response a is the better one; every fourth comparison is voted both bad instead.
        label = "both_bad" if item.comparison_id % 4 == 0 else "a"
        votes[label] += 1
        submit_vote(store, "ann", item.comparison_id, {"a": "b"}.get(label, label) if item.swapped else label)
    store.close()

    raw = yaml.safe_load(KTO_RECIPE.read_text())
    raw["run_dir"] = str(tmp / "run")
    sft, kto = raw["stages"]
    sft["data"]["train"] = str((KTO_RECIPE.parent / sft["data"]["train"]).resolve())
    kto["data"] = {"labels_db": db, "both_bad": "undesirable", "eval_fraction": 0.2}
    kto["train"].update(max_steps=32, learning_rate=5e-3, desirable_weight=1.8)  # 3 undesirable to 2 desirable
    dpo = {"name": "dpo", "kind": "dpo", "after": "sft", "data": {"labels_db": db},
           "train": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 128, "gradient_checkpointing": False}}
    raw["stages"].append(dpo)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(raw))
    base_before = file_fingerprint(tiny_model_dir)
    run_recipe(tmp / "recipe.yaml", log=lambda *_: None)
    return {"run": tmp / "run", "votes": votes, "base": tiny_model_dir, "base_before": base_before}


def test_both_bad_votes_become_undesirable_examples(run):
    record = read_stage(run["run"] / "kto")
    assert record["complete"] and record["kind"] == "kto"
    data = record["data"]
    kept, both_bad = run["votes"]["a"], run["votes"]["both_bad"]
    assert both_bad > 10
    assert data["train_rows"] + data["eval_rows"] == 2 * (kept + both_bad)
    assert data["desirable_rows"] + data["undesirable_rows"] == data["train_rows"]
    # Every training prompt's comparison gave one desirable row, or none when voted both bad.
    assert data["undesirable_rows"] > data["desirable_rows"] > 0


def test_kto_adapter_moved_from_sft_and_base_untouched(run):
    sft = load_file(str(run["run"] / "sft" / "adapter_model.safetensors"))
    kto = load_file(str(run["run"] / "kto" / "adapter_model.safetensors"))
    assert kto.keys() == sft.keys() and all("lora_" in k for k in kto)
    assert sum((kto[k].float() - sft[k].float()).norm() for k in kto) > 1e-3
    assert read_stage(run["run"] / "kto")["data"]["initialized_from_sha256"] == file_fingerprint(
        run["run"] / "sft" / "adapter_model.safetensors")
    assert file_fingerprint(run["base"]) == run["base_before"]


def test_kto_prefers_desirable_responses_on_held_out_prompts(run):
    """TRL's implicit rewards (beta * log-ratio to the SFT reference) on the held-out prompts' responses."""
    metrics = read_stage(run["run"] / "kto")["metrics"]
    assert metrics["eval_rewards/chosen"] - metrics["eval_rewards/rejected"] > 0.05, metrics


def test_dpo_trains_on_chat_prompts_with_text_responses(run):
    record = read_stage(run["run"] / "dpo")
    assert record["complete"] and record["data"]["rows_kept"] == run["votes"]["a"]
    assert record["metrics"]["global_step"] == 2
