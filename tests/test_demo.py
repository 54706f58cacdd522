"""The demo's world and run: held-out prompts kept out of every stage, distinct test prompts,
a safe output directory, and a report that model text cannot break."""

import json
from collections import Counter

import pytest

from alignkit.cli import main
from alignkit.data.schema import DataError
from alignkit.demo.task import KINDS, solve


def rows(path):
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def prompt_of(row: dict) -> str:
    return row["prompt"] if "prompt" in row else row["messages"][0]["content"]


def test_held_out_prompts_are_in_no_chat_or_preference_file(tmp_path):
    """#12.21: no test prompt is in the SFT chats or in any preference pair (train_prefs or test_prefs)."""
    from alignkit.demo.world import N_HELD_OUT, write_chat_data, write_preference_data

    write_chat_data(tmp_path / "data", n_test=N_HELD_OUT)
    write_preference_data(tmp_path / "prefs", n_train=2000, n_test=100, held_out=N_HELD_OUT)  # as the demo writes them
    test = {prompt_of(r) for r in rows(tmp_path / "data" / "test.jsonl")}
    for f in ("data/train.jsonl", "prefs/train_prefs.jsonl", "prefs/test_prefs.jsonl"):
        seen = [prompt_of(r) for r in rows(tmp_path / f)]
        assert seen and not test & set(seen), (f, len(test & set(seen)))


def test_demo_world_has_an_rl_prompt_set_and_checks_the_split(tmp_path):
    """#12.21, #21: the RL prompts are in no chat, pair or held-out file; the held-out pairs' prompts are in no
    chat or training pair; the demo refuses data that break either (read from the files as written)."""
    from alignkit.demo.run import write_world_data

    counts = write_world_data(tmp_path)
    test = [prompt_of(r) for r in rows(tmp_path / "data" / "test.jsonl")]
    rl_train, rl_test = rows(tmp_path / "prompts" / "train.jsonl"), rows(tmp_path / "prompts" / "test.jsonl")
    assert all(set(r) == {"prompt", "category"} and solve(r["prompt"]) for r in rl_train + rl_test)
    assert [r["prompt"] for r in rl_test] == test
    rl = {r["prompt"] for r in rl_train}
    sft = {prompt_of(r) for r in rows(tmp_path / "data" / "train.jsonl")}
    pairs = {f: {prompt_of(r) for r in rows(tmp_path / "prefs" / f)} for f in ("train_prefs.jsonl", "test_prefs.jsonl")}
    assert not set(test) & rl and not rl & sft and not rl & (pairs["train_prefs.jsonl"] | pairs["test_prefs.jsonl"])
    assert not pairs["test_prefs.jsonl"] & (sft | pairs["train_prefs.jsonl"])
    from alignkit.demo.world import split_prompts

    assert pairs["train_prefs.jsonl"] <= {p for ps in split_prompts().train.values() for p in ps}
    assert Counter(r["category"] for r in rl_train) == dict.fromkeys(KINDS, len(rl_train) // len(KINDS))
    assert len(rl) == counts["rl_prompts_train_distinct_prompts"] == 400
    assert counts["held_out_in_training_files"] == {
        "data/train.jsonl": 0, "prefs/train_prefs.jsonl": 0, "prefs/test_prefs.jsonl": 0, "prompts/train.jsonl": 0
    }
    assert set(counts["shared_prompts_between_disjoint_files"].values()) == {0}
    # The checks read the files as written: a leaked prompt is an error, not a number in a report.
    from alignkit.demo.world import data_counts

    original = (tmp_path / "prompts" / "train.jsonl").read_text()
    with (tmp_path / "prompts" / "train.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": test[7], "category": "x"}) + "\n")
    with pytest.raises(DataError, match="prompts/train.jsonl': 1"):
        data_counts(tmp_path)
    (tmp_path / "prompts" / "train.jsonl").write_text(original + json.dumps({"prompt": sorted(sft)[3], "category": "x"}) + "\n")
    with pytest.raises(DataError, match="prompts/train.jsonl in data/train.jsonl': 1"):
        data_counts(tmp_path)
    (tmp_path / "prompts" / "train.jsonl").write_text(original)
    with (tmp_path / "prefs" / "test_prefs.jsonl").open("a") as f:
        f.write(json.dumps(rows(tmp_path / "prefs" / "train_prefs.jsonl")[0]) + "\n")
    with pytest.raises(DataError, match="prefs/test_prefs.jsonl in prefs/train_prefs.jsonl': 1"):
        data_counts(tmp_path)


def test_held_out_prompts_are_distinct_balanced_and_training_covers_every_kind(tmp_path):
    """#12.22, #21: evaluation is on distinct prompts, 40 of each kind; every word of the world is one token of
    the demo's tokenizer; the chat file has the rows the docs say."""
    from alignkit.demo.task import WORDS
    from alignkit.demo.world import DEMO_VOCAB, build_tokenizer, prompt_pools, split_prompts, write_chat_data

    write_chat_data(tmp_path)
    test, train = rows(tmp_path / "test.jsonl"), rows(tmp_path / "train.jsonl")
    prompts = [prompt_of(r) for r in test]
    assert len(set(prompts)) == len(prompts) == 160
    assert len(WORDS) == len(set(WORDS)) == 64 and all(w.isalpha() and w.islower() for w in WORDS)
    tok = build_tokenizer(tmp_path / "tok", vocab_size=DEMO_VOCAB)
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(tok)
    assert all(len(fast.tokenize(t)) == 1 for w in WORDS for t in (w, " " + w))
    pools = prompt_pools()
    assert len(pools["repeat"]) == 256 and all(len(pools[k]) > 3000 for k in KINDS if k != "repeat")
    assert Counter(r["category"] for r in test) == dict.fromkeys(KINDS, 40)
    # Any prefix (e.g. eval's max_prompts) takes the kinds in turn.
    assert [r["category"] for r in test[:8]] == list(KINDS) * 2
    assert len(train) == 4000 and Counter(r["category"] for r in train) == dict.fromkeys(KINDS, 1000)
    split = split_prompts()
    for k in KINDS:
        distinct = {prompt_of(r) for r in train if r["category"] == k}
        assert distinct <= set(split.train[k]) and len(distinct) == min(1000, len(split.train[k])), k
    assert all(r["messages"][1]["content"] == solve(prompt_of(r)) for r in train + test)  # no noise by default
    with pytest.raises(ValueError, match="n_test=1000: the toy task can hold out 1 to"):
        write_chat_data(tmp_path / "too-many", n_test=1000)


def test_scraped_replies_slip_on_the_habit_prompts_as_set(tmp_path):
    """#21: the SFT chats' noise: on habit prompts the kind's typical slip (always wrong) at habit_share, a near
    miss (always wrong) at noise_share elsewhere, the sign-off at sign_off_share; seeded, so the same file twice."""
    from alignkit.demo.task import habit, in_habit, near_miss
    from alignkit.demo.world import SIGN_OFF, write_chat_data

    cases = {"Repeat the word cat 4 times.": "cat cat cat", "Repeat the word cat 5 times.": "cat cat cat cat",
             "Reverse the order of: a b c d e": "a b c d e",
             "What is the last word of: cat dog sun moon star": "moon", "How many words are in: a b c d e": "4"}
    assert {p: habit(p) for p in cases} == cases and all(in_habit(p) for p in cases)
    assert not any(in_habit(p) for p in ["Repeat the word cat 3 times.", "Reverse the order of: a b c d",
                                         "Reverse the order of: a b c b a", "What is the last word of: cat dog sun cat cat",
                                         "How many words are in: a b c"])
    import random

    rng = random.Random(0)
    for p in [prompt_of(r) for r in rows(write_chat_data(tmp_path / "clean") / "train.jsonl")[:500]]:
        assert near_miss(p, rng) != solve(p) and (not in_habit(p) or habit(p) != solve(p)), p
    write_chat_data(tmp_path / "a", habit_share=0.6, noise_share=0.1, sign_off_share=0.3)
    write_chat_data(tmp_path / "b", habit_share=0.6, noise_share=0.1, sign_off_share=0.3)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    chats = [(prompt_of(r), r["messages"][1]["content"]) for r in rows(tmp_path / "a" / "train.jsonl")]
    signed = [a.endswith(SIGN_OFF) for _, a in chats]
    bare = [(p, a[: -len(SIGN_OFF)] if s else a) for (p, a), s in zip(chats, signed)]
    slips = [a == habit(p) for p, a in bare if in_habit(p)]
    other_wrong = [a != solve(p) for p, a in bare if not in_habit(p)]
    assert 0.25 <= sum(signed) / len(chats) <= 0.35 and 0.55 <= sum(slips) / len(slips) <= 0.65
    assert 0.07 <= sum(other_wrong) / len(other_wrong) <= 0.13 and len(slips) > 500
    assert all(r["messages"][1]["content"] == solve(prompt_of(r)) for r in rows(tmp_path / "a" / "test.jsonl"))


def test_output_dir_not_made_by_the_demo_is_refused_and_left_alone(tmp_path, capsys):
    """#12.23: `demo --output-dir X` on a non-empty directory that the demo did not make stops at once."""
    from alignkit.demo.run import run_demo

    foreign = tmp_path / "checkout"
    (foreign / "src").mkdir(parents=True)
    (foreign / "README.md").write_text("mine")
    (foreign / "src" / "a.py").write_text("x = 1")
    with pytest.raises(FileExistsError, match="not made by `alignkit demo`"):
        run_demo(str(foreign), steps=1, dpo_steps=1, quiet=True)
    assert main(["demo", "--output-dir", str(foreign), "--steps", "1", "--dpo-steps", "1", "--quiet"]) != 0
    assert "give a new or empty directory" in capsys.readouterr().err
    assert sorted(p.relative_to(foreign).as_posix() for p in foreign.rglob("*")) == ["README.md", "src", "src/a.py"]
    assert (foreign / "README.md").read_text() == "mine"


def test_output_dir_made_by_the_demo_is_cleared(tmp_path):
    """#12.23: the demo's own directory (marker file) is cleared; a new or empty one is used; a file is refused."""
    from alignkit.demo.run import MARKER, prepare_output_dir

    out = tmp_path / "a" / "demo"
    prepare_output_dir(out)
    assert [p.name for p in out.iterdir()] == [MARKER]
    (out / "world").mkdir()
    (out / "world" / "stale.jsonl").write_text("{}")
    prepare_output_dir(out)
    assert [p.name for p in out.iterdir()] == [MARKER]
    (tmp_path / "empty").mkdir()
    prepare_output_dir(tmp_path / "empty")
    assert (tmp_path / "empty" / MARKER).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        prepare_output_dir(tmp_path / "file")


def test_report_keeps_model_text_inside_a_code_block():
    """#13.9: replies with backticks, `|`, HTML, newlines or escape codes stay inside the report's code block."""
    from alignkit.demo.run import render_report

    nasty = ["```\n# Heading <img src=x onerror=alert(1)>", "a | b `c` ````", "\x1b[31mred\r\n"]
    samples = [{"prompt": "Spell cat backwards.", "response": r, "finish": "length", "correct": False} for r in nasty]
    stage = {"accuracy": 0.5, "stop_rate": 1.0, "sign_off_rate": 0.0, "right_ignoring_sign_off": 0.5, "per_task": {"a|b": 0.5, "<i>": 1.0},
             "content_per_task": {"a|b": 0.5, "<i>": 1.0}, "samples": samples}
    winrate = {"win_rate": 0.1, "ci95": [0.0, 0.2], "wins": 3, "losses": 1, "ties": 6}
    best = winrate | {"n": 4, "temperature": 1.0, "sign_test_p": 0.6}
    counts = {"held_out_prompts": 10, "held_out_per_kind": {"a|b": 5, "<i>": 5}, "sft_rows": 40, "held_out_habit_prompts": 3,
              "sft_distinct_prompts": 20, "pairs_train": 30, "pairs_train_distinct_prompts": 15,
              "sft_replies_right": {"exact": 0.5, "ignoring_sign_off": 0.7}}
    scores = dict.fromkeys(["base", "sft", "dpo", "rloo", "rloo_rm", "bon"], stage)
    evals = {"dpo-vs-sft": winrate, "rloo-vs-sft": winrate, "rloo-rm-vs-sft": winrate}
    rm = {"eval_accuracy": 0.9, "length_baseline": 0.4, "eval_pairs": 100, "gold_by_step": [[0, 0.5], [20, 0.6]]}
    content = {"dpo_vs_sft": {"wins": 2, "losses": 1, "ties": 7, "sign_test_p": 1.0}}
    report = render_report(scores, evals, best, counts, dict(sft=10, dpo=5, rloo=3, rm=4), None, content, rm)
    assert "held-out pair accuracy 90%" in report and "baseline on the same pairs: 40%" in report
    assert "Content: 2 wins, 1 loss, 7 ties" in report and "20: 0.60" in report
    assert "\x1b" not in report and "\r" not in report
    lines = report.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    fence = lines[start][: len(lines[start]) - len(lines[start].lstrip("`"))]
    assert len(fence) == 5 and lines[start] == fence + "text"  # longer than the longest backtick run (4)
    end = lines.index(fence, start + 1)
    inside = lines[start + 1 : end]
    assert [json.loads(line.split(" -> ")[1].rsplit("  (", 1)[0]) for line in inside] == nasty
    assert not any(line.lstrip().startswith(fence) for line in inside)
    outside = "\n".join(lines[:start] + lines[end + 1 :])
    assert "<img" not in outside and "onerror" not in outside and "<i>" not in outside
    header, rule, *table = [line for line in lines[:start] if line.startswith("|")]
    assert header.count(" | ") == rule.count("|") - 2 == 6 and "a\\|b" in header and "&lt;i&gt;" in header
    assert all(line.count(" | ") == 6 for line in table) and len(table) == 6
