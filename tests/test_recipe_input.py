"""Recipe input mistakes: one line naming the file:line (or the --set) and the key, exit status 2, no traceback.

Also where paths typed in a YAML and on the command line resolve, and what `train:` values TRL accepts.
Most tests call the CLI in-process (a crash would surface as the exception itself); one runs it for real.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.cli import EXIT_BAD_INPUT, main
from alignkit.config import load_recipe
from alignkit.data.sources import load_sft_split
from alignkit.stage_data import data_fingerprint, load_preference_split
from alignkit.errors import UserError
from recipes.runner import RECIPES

REPO = Path(__file__).resolve().parents[1]
SFT = REPO / "recipes" / "data" / "tiny_sft.jsonl"
PREFS = REPO / "recipes" / "data" / "tiny_prefs.jsonl"

RECIPE = f"""\
model:
  base: alignkit-tiny
  quantization: none
peft:
  method: lora
  r: 4
run_dir: run
stages:
  - name: sft
    kind: sft
    data:
      train: {SFT}
    train:
      max_steps: 1
  - name: dpo
    kind: dpo
    after: sft
    data:
      train: {PREFS}
    train:
      max_steps: 1
"""

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def write(tmp_path: Path, text: str = RECIPE, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(path: Path, needle: str) -> str:
    """`path:N` of the first line containing needle."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return f"{path}:{n}"
    raise AssertionError(f"{needle!r} not in {path}")


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(capsys, path, *overrides) -> str:
    """`alignkit run PATH --dry-run --set ...`; asserts exit 2 and one clean line; returns that line."""
    argv = ["run", str(path), "--dry-run"]
    for item in overrides:
        argv += ["--set", item]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


# --- 1. sections that are not mappings, a directory as the config, bad numbers, bad messages ---------------


@pytest.mark.parametrize(
    "old, new, key",
    [
        (f"    data:\n      train: {SFT}\n", "    data: ../data/tiny_sft.jsonl\n", "stages.sft.data"),
        ("    train:\n      max_steps: 1\n  - name: dpo", "    train: [1]\n  - name: dpo", "stages.sft.train"),
        ("model:\n  base: alignkit-tiny\n  quantization: none\n", "model: alignkit-tiny\n", "model"),
        ("peft:\n  method: lora\n  r: 4\n", "peft: [lora]\n", "peft"),
    ],
)
def test_section_that_is_not_a_mapping_names_its_line(capsys, tmp_path, old, new, key):
    assert old in RECIPE
    path = write(tmp_path, RECIPE.replace(old, new))
    err = run_cli(capsys, path)
    assert f"{line_of(path, new.strip().splitlines()[0])}: {key} must be a mapping" in err, err


def test_section_that_is_not_a_mapping_via_set(capsys, tmp_path):
    err = run_cli(capsys, write(tmp_path), "stages.sft.train=[1]")
    assert err.endswith("--set stages.sft.train=[1]: stages.sft.train must be a mapping of keys to values, got list [1]"), err


def test_directory_as_config_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "run", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    err = "\n".join(line for line in proc.stderr.splitlines() if "kernels" not in line)  # bitsandbytes' import notice
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path} is a directory" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.sft.data.eval_fraction=abc", "stages.sft.data.eval_fraction='abc' must be a number in [0, 1)"),
        ("stages.sft.data.eval_fraction=1.5", "stages.sft.data.eval_fraction=1.5 must be a number in [0, 1)"),
        ("stages.sft.data.eval_fraction=true", "stages.sft.data.eval_fraction=True must be a number in [0, 1)"),
        ("stages.dpo.data.min_agreement=abc", "stages.dpo.data.min_agreement='abc' must be a number in [0, 1]"),
        ("stages.dpo.data.ties=maybe", "stages.dpo.data.ties='maybe' must be one of drop, ignore"),
        ("stages.dpo.data.train=5", "stages.dpo.data.train=5 must be a path"),
    ],
)
def test_bad_data_values_via_set(capsys, tmp_path, override, message):
    err = run_cli(capsys, write(tmp_path), override)
    assert f"--set {override}: {message}" in err, err


def test_bad_data_value_in_yaml_names_its_line(capsys, tmp_path):
    path = write(tmp_path, RECIPE.replace(f"      train: {SFT}\n", f"      train: {SFT}\n      eval_fraction: lots\n"))
    err = run_cli(capsys, path)
    assert f"{line_of(path, 'eval_fraction: lots')}: stages.sft.data.eval_fraction='lots'" in err, err


def test_sources_check_numbers_without_the_config():
    with pytest.raises(UserError, match=r"stages\.sft\.data\.eval_fraction='abc' must be a number"):
        load_sft_split({"train": str(SFT), "eval_fraction": "abc"}, 0, "sft")
    with pytest.raises(UserError, match=r"stages\.dpo\.data\.min_agreement='x' must be a number"):
        load_preference_split({"labels_db": "labels.db", "min_agreement": "x"}, 0, "dpo")


@pytest.mark.parametrize(
    "message, expected",
    [
        ({"role": "assistant", "content": 5}, "message 2 in 'messages' has content 5; expected text"),
        ({"role": "assistant", "content": None}, "message 2 in 'messages' has content null; expected text"),
        ({"role": "assistant", "content": ["a"]}, "message 2 in 'messages' has content [\"a\"]; expected text"),
        ("hello", "message 2 in 'messages' is \"hello\", expected an object with 'role' and 'content'"),
        ({"content": "hello"}, "message 2 in 'messages' has no 'role'"),
        ({"role": ["assistant"], "content": "hello"}, "message 2 in 'messages' has unknown role [\"assistant\"]"),
    ],
)
def test_bad_chat_message_names_file_and_line(capsys, tmp_path, message, expected):
    data = jsonl(tmp_path / "chats.jsonl", [{"messages": [USER, ASSISTANT]}, {"messages": [USER, message]}])
    path = write(tmp_path, RECIPE.replace(str(SFT), str(data)))
    err = run_cli(capsys, path)
    assert f"{data}:2: {expected}" in err, err


def test_bad_message_in_preference_rows(capsys, tmp_path):
    data = jsonl(tmp_path / "prefs.jsonl", [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": 7}]}])
    path = write(tmp_path, RECIPE.replace(str(PREFS), str(data)))
    assert f"{data}:1: message 1 in 'rejected' has content 7; expected text" in run_cli(capsys, path)


def test_margin_in_some_rows_only(capsys, tmp_path):
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    data = jsonl(tmp_path / "prefs.jsonl", [{**pair, "margin": 1.0}, {**pair, "chosen": "c"}])
    path = write(tmp_path, RECIPE.replace(str(PREFS), str(data)))
    assert f"{data}:2: column 'margin' must be in every row or in none" in run_cli(capsys, path)


def test_json_file_of_non_objects(capsys, tmp_path):
    data = tmp_path / "sft.json"
    data.write_text('["just text"]')
    path = write(tmp_path, RECIPE.replace(str(SFT), str(data)))
    assert f"{data}: row 1 is str, expected an object" in run_cli(capsys, path)


# --- 2. `train:` values as TRL takes them ------------------------------------------------------------------


def test_loss_type_as_a_plain_string_is_accepted_like_trl(tmp_path):
    from trl import DPOConfig

    path = write(tmp_path, RECIPE + "      loss_type: sigmoid\n")  # the last section is dpo's train:
    cfg = load_recipe(path, stage_kinds=RECIPES)
    # TRL's DPOConfig wraps a string into a one-item list itself; the config stores that same form.
    trl_value = DPOConfig(output_dir=str(tmp_path / "out"), loss_type="sigmoid", bf16=False, use_cpu=True).loss_type
    assert cfg.stage("dpo").train["loss_type"] == trl_value == ["sigmoid"]
    cfg = load_recipe(write(tmp_path), ["stages.dpo.train.loss_type=[sigmoid, sft]"], stage_kinds=RECIPES)
    assert cfg.stage("dpo").train["loss_type"] == ["sigmoid", "sft"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.dpo.train.loss_type=5", "stages.dpo.train.loss_type=5 is not a valid list[str]"),
        ("stages.dpo.train.loss_type=[1, 2]", "stages.dpo.train.loss_type=[1, 2] is not a valid list[str]"),
        ("peft.r=abc", "peft.r='abc' is not a valid int"),
        ("stages.sft.train.max_steps=1.5", "stages.sft.train.max_steps=1.5 is not a valid int"),
    ],
)
def test_type_errors_name_the_type_plainly(capsys, tmp_path, override, message):
    err = run_cli(capsys, write(tmp_path), override)
    assert f"--set {override}: {message}" in err and "<class" not in err, err


@pytest.mark.parametrize(
    "override, message",
    [
        # DPOConfig lists its loss types only in prose; DPOTrainer refused others at the first loss, after SFT ran.
        ("stages.dpo.train.loss_type=[sigmoid, foo]", "stage dpo: invalid train settings: loss_type='foo'; one of sigmoid, hinge"),
        ("stages.sft.train.truncation_mode=middle", "stage sft: invalid train settings: truncation_mode='middle'; one of keep_end"),
    ],
)
def test_values_trl_checks_only_when_training_reaches_them_are_checked_first(capsys, tmp_path, override, message):
    assert message in run_cli(capsys, write(tmp_path), override)


def test_a_deprecated_alias_trl_still_maps_is_accepted(capsys, tmp_path):
    # SFTConfig maps packing_strategy bfd-requeue to bfd_split itself: the choices are checked after TRL's mapping.
    assert main(["run", str(write(tmp_path)), "--dry-run", "--set", "stages.sft.train.packing_strategy=bfd-requeue"]) == 0


def test_prompt_datasets_with_both_prompt_and_messages_use_the_prompt(tmp_path):
    """UltraFeedback carries `prompt` and the whole conversation as `messages`; an import file must give one."""
    from alignkit.data.sources import load_prompt_rows
    from alignkit.store.importer import parse_import_file

    row = {"prompt": "q", "messages": [USER, ASSISTANT]}
    rows, _ = load_prompt_rows({"prompts": str(jsonl(tmp_path / "p.jsonl", [row]))}, "ppo")
    assert rows[0]["prompt"] == "q"
    with pytest.raises(UserError, match="exactly one of"):
        parse_import_file(jsonl(tmp_path / "i.jsonl", [{**row, "responses": ["a", "b"]}]))


# --- 3. errors in --set name the --set -------------------------------------------------------------------


def test_set_error_names_the_set_not_a_yaml_line(capsys, tmp_path):
    path = write(tmp_path)
    err = run_cli(capsys, path, "stages.sft.train.lerning_rate=1")
    assert err.endswith("--set stages.sft.train.lerning_rate=1: unknown key stages.sft.train.lerning_rate "
                        "(did you mean 'learning_rate'?)"), err
    assert f"{path}:" not in err


def test_yaml_error_still_names_the_yaml_line(capsys, tmp_path):
    path = write(tmp_path, RECIPE.replace("      max_steps: 1\n  - name: dpo", "      lerning_rate: 1\n  - name: dpo"))
    err = run_cli(capsys, path, "stages.sft.train.max_steps=2")  # an unrelated --set does not take the blame
    assert f"{line_of(path, 'lerning_rate')}: unknown key stages.sft.train.lerning_rate" in err, err


def test_set_into_an_empty_yaml_section(tmp_path):
    path = write(tmp_path, RECIPE.replace("    train:\n      max_steps: 1\n  - name: dpo", "    train:\n  - name: dpo"))
    assert load_recipe(path, ["stages.sft.train.max_steps=3"], stage_kinds=RECIPES).stage("sft").train == {"max_steps": 3}


# --- 4 / 5. where relative paths resolve ----------------------------------------------------------------


def test_relative_paths_in_yaml_resolve_against_the_yaml_and_in_set_against_cwd(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    cwd = tmp_path / "work"
    cwd.mkdir()
    jsonl(cwd / "mine.jsonl", [{"messages": [USER, ASSISTANT]}])
    monkeypatch.chdir(cwd)
    path = write(recipes)
    assert load_recipe(path, stage_kinds=RECIPES).run_dir == recipes / "run"
    cfg = load_recipe(path, ["run_dir=runs/other", "stages.sft.data.train=mine.jsonl"], stage_kinds=RECIPES)
    assert cfg.run_dir == cwd / "runs" / "other"
    assert cfg.stage("sft").data["train"] == str(cwd / "mine.jsonl")
    assert cfg.stage("dpo").data["train"] == str(PREFS)  # untouched YAML paths keep their meaning


def test_model_base_relative_path_is_a_directory_when_it_exists_else_a_hub_id(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    (recipes / "models" / "x").mkdir(parents=True)
    cwd = tmp_path / "work"
    (cwd / "models" / "y").mkdir(parents=True)
    monkeypatch.chdir(cwd)

    def base(value, overrides=()):
        path = write(recipes, RECIPE.replace("base: alignkit-tiny", f"base: {value}"))
        return load_recipe(path, list(overrides), stage_kinds=RECIPES).model.base

    assert base("models/x") == str(recipes / "models" / "x")
    assert base("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert base("alignkit-tiny") == "alignkit-tiny"
    assert base("./models/x") == str(recipes / "models" / "x")
    assert base("alignkit-tiny", ["model.base=models/y"]) == str(cwd / "models" / "y")
    assert base("alignkit-tiny", ["model.base=models/x"]) == "models/x"  # not under the cwd: a hub id


# --- 6. locations of the remaining errors -----------------------------------------------------------------


def test_cycle_names_file_line_and_key(capsys, tmp_path):
    path = write(tmp_path, RECIPE.replace("    kind: sft\n", "    kind: sft\n    after: dpo\n"))
    err = run_cli(capsys, path)
    assert f"{line_of(path, 'after: dpo')}: stages depend on each other in a cycle" in err and "stages.sft.after" in err, err


def test_missing_train_names_stage_and_line(capsys, tmp_path):
    path = write(tmp_path, RECIPE.replace(f"    data:\n      train: {PREFS}\n", "    data:\n      eval_fraction: 0.1\n"))
    err = run_cli(capsys, path)
    data_line = int(line_of(path, "eval_fraction: 0.1").rsplit(":", 1)[1]) - 1  # dpo's `data:`, just above
    assert err.endswith(f"{path}:{data_line}: stages.dpo.data.train (or labels_db) is required"), err


def test_missing_train_file_names_stage_and_key(capsys, tmp_path):
    err = run_cli(capsys, write(tmp_path), "stages.sft.data.train=/no/such.jsonl")
    # The runner fingerprints data before loading it; once it passes the stage name (data_fingerprint(data,
    # stage.name)) this line reads `stages.sft.data.train file not found`, as the direct call below does.
    assert "data.train file not found: /no/such.jsonl" in err, err
    with pytest.raises(UserError, match=r"^stages\.sft\.data\.train file not found: /no/such\.jsonl$"):
        data_fingerprint({"train": "/no/such.jsonl"}, "sft")
    with pytest.raises(UserError, match=r"^stages\.sft\.data\.train is required$"):
        load_sft_split({}, 0, "sft")


# --- 7. nits -----------------------------------------------------------------------------------------------


def test_sft_eval_in_another_format_is_an_error(capsys, tmp_path):
    evals = jsonl(tmp_path / "eval.jsonl", [{"text": "some text"}])
    path = write(tmp_path, RECIPE.replace(f"      train: {SFT}\n", f"      train: {SFT}\n      eval: {evals}\n"))
    err = run_cli(capsys, path)
    assert f"{evals}: stages.sft.data.eval rows are in the 'text' format but data.train rows are 'messages'" in err, err


def test_labels_db_and_train_together_is_an_error(capsys, tmp_path):
    path = write(tmp_path, RECIPE.replace(f"      train: {PREFS}\n", f"      train: {PREFS}\n      labels_db: labels.db\n"))
    err = run_cli(capsys, path)
    assert f"{line_of(path, 'train: ' + str(PREFS))}: stages.dpo.data sets both labels_db and train" in err, err
    with pytest.raises(UserError, match="sets both labels_db and train"):
        load_preference_split({"train": str(PREFS), "labels_db": "labels.db"}, 0, "dpo")


def test_set_labels_db_replaces_the_yaml_train(tmp_path, monkeypatch):
    # The recipes' headers document `--set stages.dpo.data.labels_db=labels.db` over a YAML `train:`.
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(write(tmp_path), ["stages.dpo.data.labels_db=labels.db"], stage_kinds=RECIPES)
    assert cfg.stage("dpo").data == {"labels_db": str(tmp_path / "labels.db")}
    cfg = load_recipe(write(tmp_path), ["stages.sft.data.eval_fraction=0.2"], stage_kinds=RECIPES)
    assert cfg.stage("sft").data["eval_fraction"] == 0.2


def test_set_null_removes_a_data_key(capsys, tmp_path):
    err = run_cli(capsys, write(tmp_path), "stages.sft.data.train=null")
    assert "stages.sft.data.train is required" in err, err


def test_model_specs_take_bare_hub_ids_and_refuse_incomplete_stages(tmp_path):
    from alignkit.modeling import resolve_base, resolve_model_spec

    assert resolve_base("gpt2") == "gpt2" and resolve_base("org/name") == "org/name"  # hub ids, resolved later
    for path in ("./no-such-model", "a/b/c", "~no-such-user-xyz/model"):
        with pytest.raises(UserError, match="does not exist"):
            resolve_base(path)
    interrupted = tmp_path / "dpo"  # training started: pending.json, and an adapter left from an earlier run
    interrupted.mkdir()
    (interrupted / "pending.json").write_text("{}")
    (interrupted / "adapter_config.json").write_text('{"base_model_name_or_path": "alignkit-tiny"}')
    with pytest.raises(UserError, match="not complete"):
        resolve_model_spec(str(interrupted))
    (interrupted / "stage.json").write_text("{not json")
    with pytest.raises(UserError, match="stage.json: not valid JSON"):
        resolve_model_spec(str(interrupted))


def test_sft_masks_templates_trl_cannot_mask_turn_by_turn(tiny_model_dir):
    from alignkit.data.chat_mask import MARKERS, TURN_BY_TURN, mask_plan
    from alignkit.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert mask_plan(tokenizer).method == MARKERS  # alignkit's default template marks generations
    # A template that merely mentions add_generation_prompt has no {% generation %} markers.
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert mask_plan(tokenizer).method == TURN_BY_TURN


def test_a_dpo_stage_cannot_continue_an_ia3_adapter():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny_sft_dpo.yaml"
    with pytest.raises(UserError, match="cannot continue an ia3 adapter"):
        load_recipe(recipe, ["peft.method=ia3"], stage_kinds=RECIPES)
    load_recipe(recipe, ["peft.method=dora"], stage_kinds=RECIPES)  # DoRA's magnitudes are copied: fine


# --- preference rows in the shapes datasets come in -------------------------------------------------------------

def test_hh_rlhf_rows_without_a_prompt_have_it_split_off(tmp_path):
    """Anthropic HH-RLHF: chosen and rejected are each the whole transcript; the prefix they share is the prompt,
    cut at a word boundary (TRL's extract_prompt cut 'Assistant: S' + 'ure' / 'orry', and dropped a response that
    extends the other). Rows with nothing to split are dropped and counted; a file of nothing else is one line."""
    hh = "\n\nHuman: hi\n\nAssistant:"
    text = [{"chosen": hh + " Sure, here", "rejected": hh + " Sorry, no"},
            {"chosen": "Sure", "rejected": "No"},  # no shared prompt
            {"chosen": hh + " Yes.", "rejected": hh + " Yes. Bake it."}]
    chat = [{"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "bye"}]}]
    train, _, info = load_preference_split({"train": str(jsonl(tmp_path / "rows.jsonl", text))}, 0, "dpo")
    assert train == [{"prompt": hh, "chosen": " Sure, here", "rejected": " Sorry, no"},
                     {"prompt": hh, "chosen": " Yes.", "rejected": " Yes. Bake it."}]
    assert info["dropped_no_prompt"] == 1
    train, _, _ = load_preference_split({"train": str(jsonl(tmp_path / "chat.jsonl", chat))}, 0, "dpo")
    assert train == [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "bye"}]}]
    path = jsonl(tmp_path / "none.jsonl", [{"chosen": "yes", "rejected": "no"}])
    with pytest.raises(UserError, match=rf"^{path}:1: missing column 'prompt' \(has: chosen, rejected\), and no row"):
        load_preference_split({"train": str(path)}, 0, "dpo")


def test_preference_rows_take_one_shape_trl_can_train_on(tmp_path):
    """TRL concatenates prompt + response: a message-list prompt with text responses (what a label store holds for
    chat prompts) crashed DPO mid-stage. UltraFeedback rows (text prompt, whole conversations as responses) keep the
    shared messages as the prompt; text rows among chat rows become chat rows (a dataset column holds one type)."""
    bye = {"role": "assistant", "content": "bye"}
    rows = [{"prompt": [USER], "chosen": "hello", "rejected": "bye", "margin": 1.0},
            {"prompt": "hi", "chosen": [USER, ASSISTANT], "rejected": [USER, bye], "margin": 2.0},
            {"prompt": "plain", "chosen": "x", "rejected": "y", "margin": 3.0}]
    train, _, info = load_preference_split({"train": str(jsonl(tmp_path / "rows.jsonl", rows))}, 0, "dpo")
    assert train[0] == {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [bye], "margin": 1.0}
    assert train[1] == {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [bye], "margin": 2.0}
    assert train[2] == {"prompt": [{"role": "user", "content": "plain"}], "chosen": [{"role": "assistant", "content": "x"}],
                        "rejected": [{"role": "assistant", "content": "y"}], "margin": 3.0}
    assert info["rows_made_conversational"] == 1
    plain = [{"prompt": "p ", "chosen": "a", "rejected": "b"}]
    assert load_preference_split({"train": str(jsonl(tmp_path / "plain.jsonl", plain))}, 0, "dpo")[0] == plain


def test_kto_rows_from_pairs_or_unpaired_and_eval_holds_out_whole_prompts(tmp_path):
    from alignkit.stage_data import load_unpaired_split

    pairs = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    train, evals, info = load_unpaired_split({"train": str(jsonl(tmp_path / "rows.jsonl", pairs)), "eval_fraction": 0.2}, 0, "kto")
    assert len(train) == 16 and len(evals) == 4
    assert info["desirable_rows"] == info["undesirable_rows"] == 8 and info["pairs_kept"] == 10
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in evals})  # both rows of a pair on one side
    assert {(r["completion"].split()[0], r["label"]) for r in train} == {("good", True), ("bad", False)}
    # TRL's KTO reads rows in order and pairs each with its neighbour for the KL term: not the same prompt's other
    # response (they were side by side), and not all desirable rows first (with an eval file).
    assert sum(a["prompt"] == b["prompt"] for a, b in zip(train, train[1:])) <= 2
    train, _, _ = load_unpaired_split({"train": str(jsonl(tmp_path / "rows.jsonl", pairs)),
                                       "eval": str(jsonl(tmp_path / "eval.jsonl", pairs[:2]))}, 0, "kto")
    labels = [r["label"] for r in train]
    assert labels not in (sorted(labels), sorted(labels, reverse=True))  # not one block of each

    unpaired = [{"prompt": [USER], "completion": "hello", "label": True}, {"prompt": "q", "completion": "a", "label": False}]
    train, _, info = load_unpaired_split({"train": str(jsonl(tmp_path / "u.jsonl", unpaired))}, 0, "kto")
    assert train[0]["completion"] == [ASSISTANT] and info["rows_made_conversational"] == 1
    path = jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": "yes"}])
    with pytest.raises(UserError, match=rf"^{path}:1: column 'label' is \"yes\"; expected true"):
        load_unpaired_split({"train": str(path)}, 0, "kto")


def test_kto_settings_and_policies_are_checked_before_anything_runs(capsys, tmp_path):
    kto = RECIPE.replace("kind: dpo", "kind: kto")
    err = run_cli(capsys, write(tmp_path, kto), "stages.dpo.train.per_device_train_batch_size=1")
    assert "per_device_train_batch_size must be at least 2" in err, err
    err = run_cli(capsys, write(tmp_path, kto), "stages.dpo.train.train_sampling_strategy=random")
    assert "train_sampling_strategy must be 'sequential'" in err, err
    # both_bad: undesirable makes unpaired rows: a dpo stage cannot take them.
    with pytest.raises(UserError, match=r"stages\.dpo\.data\.both_bad=undesirable makes unpaired examples"):
        load_preference_split({"labels_db": str(tmp_path / "labels.db"), "both_bad": "undesirable"}, 0, "dpo")
    err = run_cli(capsys, write(tmp_path, kto), "stages.dpo.data.both_bad=sometimes")
    assert "stages.dpo.data.both_bad='sometimes' must be one of drop, ignore, undesirable" in err, err


def test_the_data_keys_name_the_export_policies_the_store_takes():
    """alignkit.data.keys checks `ties:` / `both_bad:` without importing the store; the names must agree."""
    from alignkit.data import keys
    from alignkit.store import export

    assert keys.POLICIES == export.POLICIES and keys.BOTH_BAD_POLICIES == export.BOTH_BAD_POLICIES
