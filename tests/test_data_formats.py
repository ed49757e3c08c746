"""Row formats as datasets come (ShareGPT, Alpaca, their preference variants), and rows that would train
wrong without a word: each is converted, refused with file:line, or dropped and counted in stage.json."""

import json
from pathlib import Path

import pytest

from alignkit.data.sources import load_sft_split
from alignkit.stage_data import load_preference_split, load_unpaired_split
from alignkit.errors import UserError

SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(path: Path):
    return load_sft_split({"train": str(path)}, 0, "sft")


def prefs(path: Path):
    return load_preference_split({"train": str(path)}, 0, "dpo")


def without_location(rows):
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


# --- SFT: ShareGPT and Alpaca become messages, counted by the format they came in ----------------------------


def test_sharegpt_and_alpaca_rows_become_messages_and_are_counted(tmp_path):
    rows = [
        {"messages": [USER, ASSISTANT]},
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q1"},
                           {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
        {"conversations": [{"from": "user", "value": "q3"}, {"from": "assistant", "value": "a3"}]},
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye", "system": "be kind"},
    ]
    train, _, fmt, info = sft(jsonl(tmp_path / "mixed.jsonl", rows))
    assert fmt == "messages"
    assert without_location(train) == [
        {"messages": [USER, ASSISTANT]},
        {"messages": [SYSTEM, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
        {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]},
        {"messages": [{"role": "user", "content": "Translate.\n\nbonjour"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "Say bye."},
                      {"role": "assistant", "content": "bye"}]},
    ]
    assert info["formats_read"] == {"messages": 1, "sharegpt": 2, "alpaca": 3}
    assert info["rows_read"] == 6 and info["rows_kept"] == 6


def test_alpaca_history_comes_before_the_instruction(tmp_path):
    row = {"instruction": "and now?", "input": "", "output": "done", "history": [["first?", "one"], ["second?", "two"]]}
    train, _, _, _ = sft(jsonl(tmp_path / "a.jsonl", [row]))
    assert [m["content"] for m in train[0]["messages"]] == ["first?", "one", "second?", "two", "and now?", "done"]
    assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"] * 3


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
         "message 2 in 'conversations' has unknown role \"robot\"; one of"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
         "message 2 in 'conversations' has no 'value'"),
        ({"conversations": "q"}, "column 'conversations' must be a non-empty list of messages"),
        ({"instruction": "q", "input": 3, "output": "a"}, "column 'input' is 3; expected text"),
        ({"instruction": "q", "output": "a", "history": [["only a question"]]},
         "column 'history' item 1 is [\"only a question\"]; expected a [question, answer] pair"),
    ],
)
def test_bad_sharegpt_or_alpaca_row_names_file_line_and_key(tmp_path, row, expected):
    path = jsonl(tmp_path / "bad.jsonl", [{"messages": [USER, ASSISTANT]}, row])
    with pytest.raises(UserError) as err:
        sft(path)
    assert str(err.value).startswith(f"{path}:2: {expected}"), err.value
    assert "\n" not in str(err.value)


def test_unknown_sft_row_shape_names_the_formats_it_knows(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"messages": [USER, ASSISTANT]}, {"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as err:
        sft(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message
    for known in ("'messages'", "'conversations'", "'instruction'", "'output'", "'prompt' + 'completion'", "'text'"):
        assert known in message, message
    assert "(has: question, answer)" in message


# --- preference rows ----------------------------------------------------------------------------------------


def test_sharegpt_and_alpaca_preference_rows_become_prompt_chosen_rejected(tmp_path):
    """LLaMA-Factory's ranking formats: ShareGPT `conversations` + chosen / rejected messages; Alpaca
    `instruction` (+ `input`) + chosen / rejected text."""
    rows = [
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}],
         "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "go away"}},
        {"conversations": [{"from": "human", "value": "hi"}],
         "chosen": [{"from": "gpt", "value": "hey"}], "rejected": [{"from": "gpt", "value": "no"}]},
        {"instruction": "Greet.", "input": "politely", "chosen": "good day", "rejected": "yo"},
    ]
    train, _, info = prefs(jsonl(tmp_path / "ranking.jsonl", rows))
    assert train == [
        {"prompt": [SYSTEM, USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "go away"}]},
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": "hey"}], "rejected": [{"role": "assistant", "content": "no"}]},
        {"prompt": [{"role": "user", "content": "Greet.\n\npolitely"}], "chosen": [{"role": "assistant", "content": "good day"}],
         "rejected": [{"role": "assistant", "content": "yo"}]},
    ]
    assert info["formats_read"] == {"sharegpt": 2, "alpaca": 1}


def test_a_row_without_prompt_among_rows_with_one_is_refused(tmp_path):
    """Without the check the row was taken for an HH-RLHF transcript and the words its two answers share became
    its prompt: 'The film' + ' was good.' / ' was bad.'."""
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"chosen": "The film was good.", "rejected": "The film was bad."}]
    path = jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(UserError) as err:
        prefs(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: no 'prompt' column, which other rows have") and "\n" not in message


def test_a_response_with_a_user_turn_after_the_prompt_is_dropped_and_counted(tmp_path):
    """A trailing user turn in `chosen` would be trained as part of the preferred answer."""
    follow_up = {"role": "user", "content": "and then?"}
    no = {"role": "assistant", "content": "no"}
    rows = [{"prompt": [USER], "chosen": [ASSISTANT, follow_up], "rejected": [no]},
            {"prompt": "hi", "chosen": [USER, ASSISTANT], "rejected": [USER, no, follow_up]},
            {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [no]}]
    train, _, info = prefs(jsonl(tmp_path / "rows.jsonl", rows))
    assert train == [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [no]}]
    assert info["dropped_not_assistant_reply"] == 2
    assert info["rows_read"] == 3 and info["rows_kept"] == 1
    # HH-RLHF style transcripts that part before the last user turn: the shared part is the prompt, the rest
    # holds a user turn.
    hh = [{"chosen": [USER, ASSISTANT, follow_up, ASSISTANT], "rejected": [USER, no, follow_up, no]},
          {"chosen": [USER, ASSISTANT], "rejected": [USER, no]}]
    train, _, info = prefs(jsonl(tmp_path / "hh.jsonl", hh))
    assert train == [{"prompt": [USER], "chosen": [ASSISTANT], "rejected": [no]}]
    assert info["dropped_not_assistant_reply"] == 1


def test_identical_responses_have_their_own_counter(tmp_path):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "  ", "rejected": "b"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: yes"},
            {"prompt": "p", "chosen": "a", "rejected": "b"}]
    path = jsonl(tmp_path / "rows.jsonl", rows[:2] + rows[3:])
    _, _, info = prefs(path)
    assert info["dropped_identical"] == 1 and info["dropped_empty"] == 1 and info["rows_kept"] == 1
    _, _, info = prefs(jsonl(tmp_path / "hh.jsonl", [rows[2], {"chosen": "x y", "rejected": "x z"}]))
    assert info["dropped_identical"] == 1 and "dropped_no_prompt" not in info  # not "no prompt to split off"


def test_rows_read_is_the_files_row_count(tmp_path):
    rows = [{"chosen": "Sure", "rejected": "No"},  # no shared prompt: dropped before filtering
            {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}]
    _, _, info = prefs(jsonl(tmp_path / "hh.jsonl", rows))
    assert info["rows_read"] == 3
    assert info["rows_kept"] + sum(v for k, v in info.items() if k.startswith("dropped_")) == info["rows_read"]
    pairs = [{"prompt": f"p{i}", "chosen": "a", "rejected": "a" if i == 0 else "b"} for i in range(3)]
    _, _, info = load_unpaired_split({"train": str(jsonl(tmp_path / "k.jsonl", pairs))}, 0, "kto")
    assert info["rows_read"] == 3 and info["pairs_kept"] == 2 and info["dropped_identical"] == 1


# --- dataset directories name the row ---------------------------------------------------------------------------


def test_an_error_in_a_saved_dataset_names_the_row_index(tmp_path):
    from datasets import Dataset

    rows = [{"messages": [USER, ASSISTANT]}, {"messages": [USER, ASSISTANT]}, {"messages": [USER, USER]}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError) as err:
        sft(tmp_path / "ds")
    assert str(err.value).startswith(f"{tmp_path / 'ds'}[2]: a conversation with no assistant message"), err.value
    (tmp_path / "rows.json").write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                    {"prompt": "p", "chosen": "a", "rejected": 5}]))
    with pytest.raises(UserError) as err:
        prefs(tmp_path / "rows.json")
    assert str(err.value).startswith(f"{tmp_path / 'rows.json'}[1]: column 'rejected' is 5"), err.value
