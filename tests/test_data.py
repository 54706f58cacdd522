import json

import datasets
import pytest

from alignkit.config import DataConfig
from alignkit.data.loading import load_rows
from alignkit.data.prepare import load_examples, tokenize_conversations
from alignkit.data.schema import DataError, detect_schema, normalise

from .conftest import need_shared


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "parts, split, schema",
    [
        (("smoltalk_like",), "train", "chat"),
        (("ultrafeedback_binarized",), "train_prefs", "preference"),
        (("alpaca_eval_prefs",), "test_prefs", "preference"),
        (("hh_rlhf", "test_1000.jsonl"), "train", "preference"),
    ],
)
def test_schema_detection_on_shared_data(parts, split, schema):
    rows, source = load_rows(str(need_shared("data", *parts)), split)
    assert detect_schema(rows.column_names) == schema
    shape = "conversation" if schema == "chat" else "preference"
    out = normalise(rows.select(range(200)), source, shape, skip_invalid=True)
    assert len(out) >= 190
    if shape == "preference":
        pair = out[0]
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"] != pair["rejected"]


def test_hh_transcripts_become_messages():
    rows, source = load_rows(str(need_shared("data", "hh_rlhf", "test_1000.jsonl")))
    pair = normalise(rows.select(range(5)), source, "preference")[0]
    assert pair["prompt"][0] == {"role": "user", "content": "Can you give me facts about jumping spiders?"}
    assert [m["role"] for m in pair["prompt"]][:2] == ["user", "assistant"]
    assert pair["prompt"][-1]["role"] == "user"


def test_ultrafeedback_pairs_take_prompt_from_conversation():
    rows, source = load_rows(str(need_shared("data", "ultrafeedback_binarized")), "test_prefs")
    row = rows[0]
    pair = normalise(rows.select(range(1)), source, "preference")[0]
    assert pair["prompt"] == row["chosen"][:-1]
    assert pair["chosen"] == row["chosen"][-1]["content"] and pair["rejected"] == row["rejected"][-1]["content"]
    conv = normalise(rows.select(range(1)), source, "conversation")[0]  # SFT on preference data uses chosen
    assert conv["messages"] == row["chosen"]


def test_loaders(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    write(tmp_path / "train.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "test.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows(str(tmp_path / "train.jsonl"))[0]) == 4
    assert len(load_rows(str(tmp_path), "train")[0]) == 4
    assert len(load_rows(str(tmp_path), "test")[0]) == 4
    assert load_rows(str(tmp_path / "saved"), "train")[0][1]["messages"][1]["content"] == "a1"
    with pytest.raises(ValueError, match="no file for split 'dev'"):
        load_rows(str(tmp_path), "dev")
    with pytest.raises(FileNotFoundError):
        load_rows("./missing.jsonl")


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "q"}]}, "line 2: field 'messages': no assistant turn"),
    ({"messages": []}, "line 3: field 'messages': empty conversation"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "line 4: field 'messages[1].role': unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "line 5: field 'messages[0].content': expected a string, got int"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "line 6: field 'messages[0].content': missing"),
    ({"messages": "hello"}, "line 7: field 'messages': expected a list of messages, got str"),
]


def test_bad_rows_are_reported_with_file_line_and_field(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    # One file per bad row: JSON loaders unify column types, so mixed-type rows need separate files.
    for k, (bad, expected) in enumerate(BAD_ROWS):
        path = write(tmp_path / f"f{k}.jsonl", [good] * (k + 1) + [bad])
        rows, source = load_rows(str(path))
        with pytest.raises(DataError) as err:
            normalise(rows, source, "conversation")
        assert f"{path}, {expected}" in str(err.value), str(err.value)
        assert len(normalise(rows, source, "conversation", skip_invalid=True)) == k + 1


def test_bad_preference_rows(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "  ", "rejected": "b"},
    ]
    path = write(tmp_path / "prefs.jsonl", rows)
    ds, source = load_rows(str(path))
    with pytest.raises(DataError) as err:
        normalise(ds, source, "preference")
    msg = str(err.value)
    assert "3 invalid row(s)" in msg
    assert "line 2: field 'chosen': missing" in msg
    assert "line 3: field 'chosen': identical to rejected" in msg
    assert "line 4: field 'chosen': empty" in msg


def test_skip_invalid_counts_in_log(tmp_path, caplog):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, {"messages": [{"role": "user", "content": "q"}]}]
    ds, source = load_rows(str(write(tmp_path / "x.jsonl", rows)))
    with caplog.at_level("WARNING"):
        assert len(normalise(ds, source, "conversation", skip_invalid=True)) == 1
    assert "skipped 1 invalid row(s) of 2" in caplog.text and "no assistant turn" in caplog.text


def test_filters(tmp_path, toy_chat):
    rows = [
        {"messages": [{"role": "user", "content": "short prompt"}, {"role": "assistant", "content": "fine!"}]},
        {"messages": [{"role": "user", "content": "a very long prompt " * 20}, {"role": "assistant", "content": "fine!"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 50}]},
    ]
    write(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(dataset=str(tmp_path), max_prompt_tokens=30, min_response_chars=5, max_response_tokens=10)
    train, _ = load_examples(cfg, "conversation", seed=0)
    ds = tokenize_conversations(train, toy_chat, cfg)
    assert len(ds) == 2  # the long prompt and the 2-character reply are dropped
    assert max(sum(1 for x in r["labels"] if x != -100) for r in ds) == 10
    assert sorted(ds["truncated"]) == [False, True]


def test_max_examples_and_seeded_eval_split(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(50)]
    write(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(dataset=str(tmp_path), max_examples=40, eval_ratio=0.25)
    train, evals = load_examples(cfg, "conversation", seed=3)
    assert (len(train), len(evals)) == (30, 10)
    again = load_examples(cfg, "conversation", seed=3)
    assert again == (train, evals)
    other = load_examples(cfg, "conversation", seed=4)
    assert other[1] != evals
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in evals}


def test_prompt_completion_trains_on_the_completion_only(tmp_path, toy_chat):
    """#11: a conversational prompt-completion row whose prompt holds earlier assistant turns trains on the
    completion only (as TRL does); the same conversation as a chat row trains on every reply."""
    from alignkit.config import DataConfig
    from alignkit.data.chat import IGNORE_INDEX
    from alignkit.data.prepare import load_examples, tokenize_conversations

    prompt = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"},
              {"role": "user", "content": "What is 2 plus 2?"}]
    completion = [{"role": "assistant", "content": "4"}]
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": prompt + completion}) + "\n")
    trained = {}
    for name in ("pc", "chat"):
        cfg = DataConfig(dataset=str(tmp_path / f"{name}.jsonl"))
        rows, _ = load_examples(cfg, "conversation", 0)
        ex = tokenize_conversations(rows, toy_chat, cfg)[0]
        trained[name] = [t for t in ex["labels"] if t != IGNORE_INDEX]
    eot = toy_chat.end_of_turn_id
    four = toy_chat.tokenizer("4", add_special_tokens=False)["input_ids"]
    assert trained["pc"] == four + [eot]
    assert trained["chat"] == toy_chat.tokenizer("2", add_special_tokens=False)["input_ids"] + [eot] + four + [eot]
