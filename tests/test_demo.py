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
    """#12.22, #21: evaluation is on distinct prompts, 32 of each kind; the words are many, so the held-out
    words of the character-level kinds are not SFT's; the chat file has the rows the docs say."""
    from alignkit.demo.task import WORDS
    from alignkit.demo.world import prompt_pools, split_prompts, write_chat_data

    write_chat_data(tmp_path)
    test, train = rows(tmp_path / "test.jsonl"), rows(tmp_path / "train.jsonl")
    prompts = [prompt_of(r) for r in test]
    assert len(set(prompts)) == len(prompts) == 160
    assert len(WORDS) == len(set(WORDS)) == 400 and all(w.isalpha() and w.islower() and 3 <= len(w) <= 5 for w in WORDS)
    pools = prompt_pools()
    assert {k: len(pools[k]) for k in ("repeat", "upper", "reverse", "add")} == {
        "repeat": 1200, "upper": 400, "reverse": 400, "add": 1000}
    assert Counter(r["category"] for r in test) == dict.fromkeys(KINDS, 32)
    # Any prefix (e.g. eval's max_prompts) takes the kinds in turn.
    assert [r["category"] for r in test[:10]] == list(KINDS) * 2
    assert len(train) == 4000 and Counter(r["category"] for r in train) == dict.fromkeys(KINDS, 800)
    split = split_prompts()
    for k in KINDS:
        distinct = {prompt_of(r) for r in train if r["category"] == k}
        assert distinct <= set(split.train[k]) and len(distinct) == min(800, len(split.train[k])), k
    held_out_words = {p.split()[1] for p in split.test["upper"]}
    sft_upper_words = {prompt_of(r).split()[1] for r in train if r["category"] == "upper"}
    assert not held_out_words & sft_upper_words  # upper-casing a held-out word is a skill, not a memory
    assert all(r["messages"][1]["content"] == solve(prompt_of(r)) for r in train + test)  # no noise by default
    with pytest.raises(ValueError, match="n_test=1000: the toy task can hold out 1 to"):
        write_chat_data(tmp_path / "too-many", n_test=1000)


def test_scraped_replies_slip_on_the_habit_prompts_as_set(tmp_path):
    """#21: the SFT chats' noise: on habit prompts the kind's typical slip (always wrong) at habit_share, a near
    miss (always wrong) at noise_share elsewhere, the sign-off at sign_off_share; seeded, so the same file twice."""
    from alignkit.demo.task import habit, in_habit, near_miss
    from alignkit.demo.world import SIGN_OFF, write_chat_data

    cases = {"What is 27 plus 5?": "22", "What is 7 plus 8?": "5", "Repeat the word cat 4 times.": "cat cat cat",
             "Write apple in capital letters.": "Apple", "Spell ogre backwards.": "ogre",
             "Sort these numbers: 3 1 4 1 5": "5 4 3 1 1"}
    assert {p: habit(p) for p in cases} == cases and all(in_habit(p) for p in cases)
    assert not any(in_habit(p) for p in ["What is 21 plus 5?", "Repeat the word cat 3 times.", "Spell dog backwards.",
                                         "Write cat in capital letters.", "Sort these numbers: 3 1 4 1", "Sort these numbers: 2 2 2 2 2"])
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
    assert "Content: 2 wins, 1 losses, 7 ties" in report and "20: 0.60" in report
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


def test_rl_against_a_learned_reward_model_raises_the_gold_score(tmp_path):
    """#21, the demo's `rm` -> `rloo-rm` stages in small: a Bradley-Terry reward model trained on (bare right
    answer, near miss or signed-off answer) pairs, then RLOO against it (not the verifier) raises the verifier's
    (the gold) mean reward of a tiny chatty SFT model: 16 seeded samples at temperature 1 for each of 12 prompts.
    Measured 2026-12-07 (2-core CPU shared with other jobs): RM held-out pair accuracy 1.0 (longer-wins 0.25);
    gold 0.28 -> 0.38 after 15 RLOO steps at lr 3e-4. At lr 1e-3 the same run over-optimises the proxy: gold
    0.28 -> 0.20 (0.20 with beta 0.1 too), which is why this test keeps the smaller step."""
    import random

    from alignkit.config import DataConfig, ModelConfig, TrainConfig
    from alignkit.demo.task import near_miss
    from alignkit.demo.world import SIGN_OFF, build_tokenizer, write_jsonl, write_model_config
    from alignkit.generation import PromptSource, SamplingParams, generate
    from alignkit.models import init_model, load_causal_lm, load_tokenizer
    from alignkit.rewards.backends import RewardConfig
    from alignkit.rewards.toy import toy_reward
    from alignkit.train.rl import RLConfig, RLParams, run_rl
    from alignkit.train.rm import RMConfig, run_rm
    from alignkit.train.sft import SFTConfig, run_sft

    prompts = ["Repeat the word cat 2 times.", "Repeat the word sun 3 times.", "Write dog in capital letters.",
               "Write moon in capital letters.", "Spell fish backwards.", "Spell tree backwards.", "What is 3 plus 4?",
               "What is 17 plus 8?", "What is 2 plus 9?", "Sort these numbers: 3 1 2", "Sort these numbers: 9 4 7 1",
               "Sort these numbers: 5 0 8"]
    tok = build_tokenizer(tmp_path / "tokenizer")
    chat = load_tokenizer(ModelConfig(name_or_path=str(tok)))
    write_model_config(tmp_path / "config", vocab_size=len(chat.tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2)
    base = init_model(str(tmp_path / "config"), tmp_path / "base", tokenizer_source=str(tok), seed=0)
    rng = random.Random(0)
    user = lambda p: {"role": "user", "content": p}  # noqa: E731
    said = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    write_jsonl([{"messages": [user(p), said(solve(p) + (SIGN_OFF if rng.random() < 0.5 else ""))]} for p in prompts * 22],
                tmp_path / "data" / "train.jsonl")
    pairs = [{"prompt": p, "chosen": [user(p), said(solve(p))],
              "rejected": [user(p), said(solve(p) + SIGN_OFF if i % 2 else near_miss(p, rng))]}
             for i, p in enumerate(prompts * 16)]
    write_jsonl(pairs[:160], tmp_path / "prefs" / "train_prefs.jsonl")
    write_jsonl(pairs[160:], tmp_path / "prefs" / "test_prefs.jsonl")
    write_jsonl([{"prompt": p} for p in prompts * 8], tmp_path / "prompts" / "train.jsonl")
    small = dict(save_steps=None, precision="fp32", logging_steps=50)
    run_sft(SFTConfig(output_dir=str(tmp_path / "sft"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(base)),
                      data=DataConfig(dataset=str(tmp_path / "data")),
                      train=TrainConfig(max_steps=100, batch_size=16, learning_rate=1e-2, warmup_steps=10, **small)))
    sft = tmp_path / "sft" / "final"
    run_rm(RMConfig(output_dir=str(tmp_path / "rm"), seed=0, quiet=True, max_length=64,
                    model=ModelConfig(name_or_path=str(sft)),
                    data=DataConfig(dataset=str(tmp_path / "prefs"), split="train_prefs", eval_split="test_prefs"),
                    train=TrainConfig(max_steps=60, batch_size=16, grad_accum=1, learning_rate=3e-3, **small)))
    rm_eval = json.loads((tmp_path / "rm" / "rm_eval.json").read_text())
    run_rl(RLConfig(
        output_dir=str(tmp_path / "rl"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(sft)),
        prompts=PromptSource(dataset=str(tmp_path / "prompts"), split="train"),
        reward=RewardConfig(kind="hf", model=str(tmp_path / "rm" / "final"), max_length=64),
        rl=RLParams(algo="rloo", k=4, max_new_tokens=24, beta=0.0, temperature=1.0, log_samples_steps=0),
        train=TrainConfig(max_steps=15, batch_size=16, learning_rate=3e-4, scheduler="constant", **small),
    ))

    def gold(model_dir) -> float:
        cfg = ModelConfig(name_or_path=str(model_dir))
        outs = generate(load_causal_lm(cfg, chat), chat, [[user(p)] for p in prompts],
                        SamplingParams(max_new_tokens=24, temperature=1.0, n=16, seed=123), batch_size=96)
        return sum(toy_reward(p, c.text) for p, cs in zip(prompts, outs) for c in cs) / (16 * len(prompts))

    before, after = gold(sft), gold(tmp_path / "rl" / "final")
    assert rm_eval["eval_accuracy"] > rm_eval["length_baseline"], rm_eval
    assert after >= before + 0.06, (rm_eval, before, after)  # 192 samples: about two standard errors
