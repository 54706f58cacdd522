"""#22 `alignkit curriculum`: categories, loss rates, the weakest pick, generation from seeds, a classifier
that answers garbage. Every endpoint is a loopback stub (tests/loops_stub.py) with an ephemeral port."""

import json
import re
import threading

import pytest

from alignkit import config as C
from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.data.loading import DataError
from alignkit.loops import textgen
from alignkit.loops.categories import (OTHER, category_rates, keyword_category, parse_category, parse_keyword_rules,
                                       pick_weakest)
from alignkit.loops.curriculum import CurriculumConfig, clean_prompt, run_curriculum

from .conftest import ROOT, read_jsonl
from .loops_stub import Endpoint, endpoint, fast_backoff  # noqa: F401 (fixtures)

# planted: math loses 8 of 10, coding 3 of 10, writing 1 of 10; five uncategorised rows lose every time
PLANTED = {"math": (10, 8), "coding": (10, 3), "writing": (10, 1)}


def write_eval(path, with_category=True):
    rows = []
    for cat, (n, losses) in PLANTED.items():
        for i in range(n):
            rows.append({"prompt": f"{cat} eval prompt {i}: please help with this {cat} task",
                         "outcome": "loss" if i < losses else ("win" if i % 2 else "tie"),
                         "category": cat if with_category else None})
    rows += [{"prompt": f"misc question {i}", "outcome": "loss", "category": None} for i in range(5)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_seeds(path):
    rows = [{"prompt": f"seed {cat} prompt number {i} about {cat}", "category": cat}
            for cat in PLANTED for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def generator_stub(leak: str | None = None):
    """New prompts numbered by call; the first reply is `leak` (an eval prompt), the second empty."""
    count = {"n": 0}
    lock = threading.Lock()

    def answer(text, body):
        with lock:
            count["n"] += 1
            k = count["n"]
        cat = re.search(r'category "([^"]+)"', text).group(1)
        if k == 1 and leak:
            return leak
        if k == 2:
            return "   "
        return f'Prompt: "A fresh {cat} exercise, variant {k}, with a twist"'

    return answer


def cfg_for(tmp_path, url, **over):
    cfg = CurriculumConfig(output_dir=str(tmp_path / "out"), eval=write_eval(tmp_path / "eval"),
                           quiet=True, weakest=1, min_prompts=5, new_prompts=4)
    cfg.prompts.dataset, cfg.prompts.split, cfg.prompts.column = write_seeds(tmp_path / "seeds.jsonl"), "train", None
    cfg.prompts.max_prompts = None
    cfg.generator.kind, cfg.generator.base_url, cfg.generator.model = "openai", url, "gen"
    cfg.generator.sampling.n, cfg.generator.concurrency = 1, 1
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


# --------------------------------------------------------------------------- the pure rules, by hand


def test_keyword_rules_first_match_whole_words():
    rules = parse_keyword_rules(["math: sum | solve for", "coding: python | code"])
    assert rules == [("math", ["sum", "solve for"]), ("coding", ["python", "code"])]
    assert keyword_category("Write Python code to sum a list", rules) == "math"  # first rule wins
    assert keyword_category("Please SOLVE   FOR x", rules) == "math"  # case and spacing
    assert keyword_category("my encoder is slow", rules) == OTHER  # 'code' inside a word is no match
    assert keyword_category("summary of python", rules) == "coding"
    for bad in (["math sum"], ["math:"], [": sum"], ["a: x", "a: y"]):
        with pytest.raises(ConfigError):
            parse_keyword_rules(bad)


@pytest.mark.parametrize("answer,expected", [
    ("math", "math"), (" Math.\n", "math"), ('"coding"', "coding"), ("`coding`.", "coding"), ('"Coding".', "coding"),
    ("math or coding", None), ("The category is math", None), ("", None), ("other", None), (None, None),
    ({"category": "math"}, None), ("mathematics", None),
])
def test_classifier_answers_are_parsed_strictly(answer, expected):
    assert parse_category(answer, ["math", "coding"]) == expected


def test_loss_rates_and_the_weakest_pick_by_hand():
    rows = [("a", "loss")] * 3 + [("a", "win")] + [("b", "loss")] * 3 + [("b", "tie")] + [("c", "loss")] * 2 \
        + [("c", "win"), ("c", "win")] + [("d", "loss")] + [(OTHER, "loss")] * 9
    rates = category_rates(rows)
    assert rates["a"] == {"n": 4, "wins": 1, "losses": 3, "ties": 0, "loss_rate": 0.75}
    assert rates["b"]["loss_rate"] == 0.75 and rates["c"]["loss_rate"] == 0.5 and rates["d"]["loss_rate"] == 1.0
    # d has too few prompts; other is excluded; a and b tie at 0.75 with 4 prompts each: by name
    picked, why = pick_weakest(rates, k=2, min_prompts=2)
    assert picked == ["a", "b"]
    assert why == {"c": "rank 3 of 3 (k = 2)", "d": "1 prompts < min_prompts 2", OTHER: "excluded"}
    rates["b"]["n"] = 8  # more evidence breaks the tie
    assert pick_weakest(rates, k=1, min_prompts=2)[0] == ["b"]
    assert pick_weakest(rates, k=3, min_prompts=1, min_loss_rate=0.8)[0] == ["d"]
    with pytest.raises(ValueError):
        category_rates([("a", "draw")])


def test_generated_prompts_lose_their_labels_and_quotes():
    assert clean_prompt('Prompt: "Name three rivers."') == "Name three rivers."
    assert clean_prompt("New instruction 2: Sort these.") == "Sort these."
    assert clean_prompt("Promptly reply to me") == "Promptly reply to me"
    assert clean_prompt("  ") is None and clean_prompt(None) is None


# --------------------------------------------------------------------------- the stage


def test_curriculum_picks_the_planted_weakest_category_and_writes_a_prompt_set(tmp_path, endpoint):
    leak = "math eval prompt 0: please help with this math task"
    gen = endpoint(generator_stub(leak))
    cfg = cfg_for(tmp_path, gen.url)
    out = run_curriculum(cfg)
    card = json.loads((out / "card.json").read_text())
    assert card["picked"] == ["math"]
    assert card["rates"]["math"] == {"n": 10, "wins": 1, "losses": 8, "ties": 1, "loss_rate": 0.8}
    assert card["rates"][OTHER]["loss_rate"] == 1.0 and card["not_picked"][OTHER] == "excluded"
    rows = read_jsonl(out / "prompts.jsonl")
    assert {r["category"] for r in rows} == {"math"}
    # 4 requests: one leaked an eval prompt, one was empty, two new prompts survive (labels stripped)
    assert len(gen.calls) == 4 and all('category "math"' in c for c in gen.calls)
    assert card["dropped"] == {"same as a seed or eval prompt": 1, "empty or unusable reply": 1}
    assert len(rows) == card["kept"] == 2 and all(r["prompt"].startswith("A fresh math exercise") for r in rows)
    assert all(len(r["seeds"]) == 3 for r in rows)
    shown = [int(re.search(r"number (\d+)", s).group(1)) for s in gen.calls[0].split("seed math prompt")[1:]]
    assert len(shown) == 3  # each request shows three seed prompts of the category
    cats = read_jsonl(out / "categories.jsonl")
    assert len(cats) == 35 and cats[0]["category"] == "math"
    # the prompt set loads as a prompt source for `alignkit pairs` / `alignkit rl`
    from alignkit.data.prompts import PromptSource, load_prompts
    loaded = load_prompts(PromptSource(dataset=str(out / "prompts.jsonl"), split="train"))
    assert [p["category"] for p in loaded] == ["math", "math"]

    # a rerun pays only for the reply that was unusable (never cached), nothing else
    before = len(gen.calls)
    run_curriculum(cfg)
    assert len(gen.calls) == before + 1


def test_keyword_categories_and_two_weakest(tmp_path, endpoint):
    gen = endpoint(generator_stub())
    cfg = cfg_for(tmp_path, gen.url, weakest=2)
    cfg.eval = write_eval(tmp_path / "eval2", with_category=False)
    cfg.categorize.method = "keywords"
    cfg.categorize.keywords = ["math: math", "coding: coding", "writing: writing"]
    out = run_curriculum(cfg)
    card = json.loads((out / "card.json").read_text())
    assert card["picked"] == ["math", "coding"] and card["rates"][OTHER]["n"] == 5
    assert {r["category"] for r in read_jsonl(out / "prompts.jsonl")} == {"math", "coding"}


def classifier_answer(text, body):
    """Math prompts: a clean answer; coding: a padded one; writing: prose naming two categories;
    misc: alternately not JSON and empty. Generation requests get new prompts."""
    if text.startswith("Below are example"):
        return f"A new prompt, made from request {len(text)} {body.get('seed')}"
    prompt = text.split(">\n", 1)[1]
    if "math" in prompt:
        return "math"
    if "coding" in prompt:
        return "  Coding.  "
    if "writing" in prompt:
        return "I think this is writing, or maybe coding."
    i = int(re.search(r"misc question (\d+)", prompt).group(1))
    return b"not json at all" if i % 2 == 0 else ""


def test_a_classifier_answering_garbage_is_counted_not_trusted(tmp_path, endpoint):
    judge = endpoint(classifier_answer)
    cfg = cfg_for(tmp_path, judge.url)
    cfg.eval = write_eval(tmp_path / "eval3", with_category=False)
    cfg.categorize.method = "classifier"
    cfg.categorize.categories = ["math", "coding", "writing"]
    cfg.categorize.classifier.kind, cfg.categorize.classifier.base_url = "openai", judge.url
    cfg.categorize.classifier.model = "judge"
    out = run_curriculum(cfg)
    card = json.loads((out / "card.json").read_text())
    rates = card["rates"]
    assert rates["math"]["n"] == 10 and rates["coding"]["n"] == 10 and "writing" not in rates
    assert rates[OTHER]["n"] == 15  # 10 writing prompts answered in prose + 5 misc answered garbage
    un = card["classifier"]["unparsed"]
    assert un == {"classify": 15, "classify-seeds": 4}  # the 4 writing seeds too
    assert sum(card["classifier"]["unusable_replies"].values()) == 5  # not JSON or empty: also unusable
    assert card["picked"] == ["math"]
    assert "counted as other): 19" in (out / "report.md").read_text()


def test_bad_inputs_stop_before_any_model_call(tmp_path, endpoint, capsys):
    gen = endpoint(generator_stub())
    cfg = cfg_for(tmp_path, gen.url)
    bad = tmp_path / "bad" / "per_prompt.jsonl"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"prompt": "p", "outcome": "loss"}) + "\n" + json.dumps({"prompt": "q", "outcome": "lost"}) + "\n")
    cfg.eval = str(bad.parent)
    with pytest.raises(DataError, match=r"per_prompt.jsonl, line 2: field 'outcome': 'lost'"):
        run_curriculum(cfg)
    cfg.eval = write_eval(tmp_path / "nocat", with_category=False)
    with pytest.raises(DataError, match="no row has a category"):
        run_curriculum(cfg)
    cfg.eval, cfg.min_prompts = write_eval(tmp_path / "eval"), 50
    with pytest.raises(DataError, match="no category can be picked.*math: 10 prompts < min_prompts 50"):
        run_curriculum(cfg)
    assert gen.calls == []
    with pytest.raises(ConfigError, match="categorize.categories"):
        C.validate(CurriculumConfig(eval=cfg.eval, categorize=C.build(
            type(cfg.categorize), {"method": "classifier", "categories": ["math"]})))
    with pytest.raises(ConfigError, match=r"template: needs the field\(s\) \{examples\}"):
        C.validate(CurriculumConfig(eval=cfg.eval, template="Write a {category} prompt"))
    code = main(["curriculum", "--eval", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "no such eval folder or per_prompt.jsonl" in capsys.readouterr().err
    code = main(["curriculum", "--eval", cfg.eval, "--output-dir", str(tmp_path / "o"), "--categorize.method",
                 "keywords", "--categorize.keywords", "math sum", "--quiet"])
    assert code == 2 and "expected 'category: keyword" in capsys.readouterr().err


def test_the_curriculum_recipe_is_a_valid_pipeline():
    from alignkit.pipeline import read_pipeline

    pipe = read_pipeline(ROOT / "recipes" / "curriculum-qwen2.5-0.5b.yaml")
    kinds = [s.kind for s in pipe.stages]
    names = [s.name for s in pipe.stages]
    assert kinds.index("curriculum") < kinds.index("pairs") < kinds.index("dpo") < names.index("eval-after")
    assert names.index("eval-before") < kinds.index("curriculum")
    stages = {s.name: s for s in pipe.stages}  # the pairs are built on the curriculum's prompts, DPO on the pairs
    assert set(stages["pairs"].upstream) == {"curriculum"} and set(stages["dpo"].upstream) == {"pairs"}
    assert stages["pairs"].config.prompts.dataset.endswith("curriculum/prompts.jsonl")


def test_the_report_shows_loss_rates_before_and_after(tmp_path, endpoint):
    """Before: the curriculum's own eval; after: a later eval of the same prompts, placed by categories.jsonl."""
    from alignkit.report import write_report

    gen = endpoint(generator_stub())
    run = tmp_path / "run"
    cfg = cfg_for(tmp_path, gen.url, output_dir=str(run / "curriculum"))
    cfg.eval = write_eval(run / "eval-before")
    run_curriculum(cfg)
    after = [dict(r, outcome="win" if r["category"] == "math" and i % 5 else r["outcome"], category=None)
             for i, r in enumerate(read_jsonl(run / "eval-before" / "per_prompt.jsonl"))]
    (run / "eval-after").mkdir()
    (run / "eval-after" / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after))
    for name, kind in (("eval-before", "eval"), ("curriculum", "curriculum"), ("eval-after", "eval")):
        (run / name / "stage.json").write_text(json.dumps({"name": name, "kind": kind, "status": "done"}))
    report = write_report(run, stages=["eval-before", "curriculum", "eval-after"]).read_text()
    section = report[report.index("## Data loops"):]
    assert "| category | before | after: eval-after |" in section
    # math lost 8 of 10 before; after, prompts 1-4 and 6-9 of math win: 2 of 10 (0 and 5) still lose
    assert "| math (picked) | 0.800 (8 of 10) | 0.200 (2 of 10) |" in section
    assert "| coding | 0.300 (3 of 10) | 0.300 (3 of 10) |" in section
    assert (run / "report" / "curriculum-curriculum.png").is_file()


def test_both_stages_are_pipeline_kinds_with_their_outputs():
    from alignkit.pipeline import outputs_of, stage_kinds

    assert {"curriculum", "augment"} <= set(stage_kinds())
    assert outputs_of("curriculum") == {"dir": "", "prompts": "prompts.jsonl", "card": "card.json"}
    assert outputs_of("augment")["sft"] == "sft.jsonl" and outputs_of("augment")["merged"] == "merged.jsonl"
