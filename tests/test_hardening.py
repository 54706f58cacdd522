"""#11 hardening: bad input is one clear error (exit status 2) before any work; TRL's dataset formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from alignkit import config as config_lib
from alignkit.cli import main
from alignkit.config import ConfigError, DataConfig
from alignkit.data.chat import IGNORE_INDEX, tokenize_chat, tokenize_prompt, tokenize_reply
from alignkit.data.loading import Source, load_rows
from alignkit.data.prepare import load_examples, tokenize_conversations
from alignkit.data.schema import DataError, normalise

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, friend"}]}
PAIR = {"prompt": "say hi", "chosen": "hello there", "rejected": "go away"}


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def parquet(path: Path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


# Each case: (id, stage, files to write -> argv extras, substrings the one-line message must hold).
# `{d}` in an argument is the case's data folder; every case also gets a model and an output dir.
FILE_CASES = [
    ("malformed-line-2", "sft", {"d.jsonl": jsonl([CHAT]) + '{"messages": [\n'}, ["d.jsonl, line 2", "not valid JSON"]),
    ("empty-file", "sft", {"d.jsonl": ""}, ["d.jsonl", "empty"]),
    ("array-in-jsonl", "sft", {"d.jsonl": json.dumps([CHAT]) + "\n"}, ["d.jsonl, line 1", "JSON array"]),
    ("binary-file", "sft", {"d.jsonl": b'{"a": 1}\n\x00\x01\x02\xff'}, ["d.jsonl, line 2", "binary"]),
    ("undecodable-byte", "sft", {"d.jsonl": jsonl([CHAT, CHAT]).encode() + b'{"text": "caf\xe9"}\n'}, ["d.jsonl, line 3", "0xe9"]),
    ("not-an-object", "sft", {"d.jsonl": jsonl([CHAT]) + '"just a string"\n'}, ["d.jsonl, line 2", "object"]),
    ("json-array-syntax", "sft", {"d.json": "[\n" + json.dumps(CHAT) + ",\n]"}, ["d.json, line 3", "not valid JSON"]),
    ("unsupported-type", "sft", {"d.csv": "messages\nx\n"}, ["d.csv", "unsupported file type"]),
    ("not-parquet", "sft", {"d.parquet": "hello"}, ["d.parquet", "Parquet"]),
    ("parquet-wrong-column", "sft", {"d.parquet": {"messages": ["[]", "x"]}}, ["d.parquet", "column 'messages'"]),
    ("unknown-role", "sft", {"d.jsonl": jsonl([CHAT, {"messages": [{"role": "robot", "content": "x"}]}])}, ["d.jsonl, line 2", "unknown role"]),
    ("all-filtered", "sft", {"d.jsonl": jsonl([CHAT] * 4)}, ["4 valid row(s) read", "response shorter than 1000"]),
    ("prompt-only-for-sft", "sft", {"d.jsonl": jsonl([{"prompt": "hi"}])}, ["prompt-only", "prompts.dataset"]),
    ("text-for-dpo", "dpo", {"d.jsonl": jsonl([{"text": "plain"}])}, ["language-modelling", "alignkit sft"]),
    ("unpaired-for-dpo", "dpo", {"d.jsonl": jsonl([{"prompt": "p", "completion": "c", "label": True}])}, ["unpaired preference"]),
    ("all-pairs-invalid", "dpo", {"d.jsonl": jsonl([{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3)},
     ["read 3 row(s), all invalid", "identical to rejected"]),
    ("folder-without-split", "sft", {"other.jsonl": jsonl([CHAT])}, ["no file for split 'train'"]),
    ("empty-prompts", "generate", {"d.jsonl": "\n\n"}, ["d.jsonl", "empty"]),
]
EXTRA = {"all-filtered": ["--data.min-response-chars", "1000"], "all-pairs-invalid": ["--data.skip-invalid", "true"]}


def data_arg(files: dict, d: Path) -> str:
    for name, content in files.items():
        if isinstance(content, dict):
            parquet(d / name, content)
        else:
            write(d / name, content)
    return str(d) if len(files) == 1 and "other.jsonl" in files else str(d / next(iter(files)))


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_malformed_files_exit_2_naming_file_and_line(case, tmp_path, toy_tokenizer_dir, capsys):
    """#11: each malformed data file: exit 2, the file (and line) named, no traceback, nothing written."""
    name, stage, files, expected = case
    (tmp_path / "data").mkdir()
    data = data_arg(files, tmp_path / "data")
    out = tmp_path / "out"
    key = "--prompts.dataset" if stage == "generate" else "--data.dataset"
    argv = [stage, key, data, "--model.name-or-path", str(toy_tokenizer_dir), "--output-dir", str(out), *EXTRA.get(name, [])]
    if stage == "generate":
        argv += ["--prompts.split", "train"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists() or not list(out.iterdir())


OPTION_CASES = [
    ("negative-batch-size", "sft", ["--train.batch-size", "-3"], ["train.batch_size", "-3", ">= 1"]),
    ("negative-learning-rate", "sft", ["--train.learning-rate", "-1"], ["train.learning_rate", "-1.0", "> 0"]),
    ("zero-epochs", "sft", ["--train.epochs", "0"], ["train.epochs", ">= 1"]),
    ("nan-learning-rate", "dpo", ["--train.learning-rate", "nan"], ["train.learning_rate", "finite"]),
    ("warmup-ratio", "sft", ["--train.warmup-ratio", "1.5"], ["train.warmup_ratio", "[0, 1]"]),
    ("eval-ratio", "sft", ["--data.eval-ratio", "1"], ["data.eval_ratio", "[0, 1)"]),
    ("beta-zero", "dpo", ["--dpo.beta", "0"], ["dpo.beta", "> 0"]),
    ("smoothing-ipo", "dpo", ["--dpo.loss-type", "ipo", "--dpo.label-smoothing", "0.1"], ["dpo.label_smoothing", "sigmoid"]),
    ("top-p", "generate", ["--sampling.top-p", "0"], ["sampling.top_p", "(0, 1]"]),
    ("temperature", "generate", ["--sampling.temperature", "-0.5"], ["sampling.temperature", ">= 0"]),
    ("n-over-beams", "generate", ["--sampling.n", "4", "--sampling.num-beams", "2"], ["sampling.n", "num_beams 2"]),
    ("n-greedy", "generate", ["--sampling.n", "3"], ["sampling.n", "temperature"]),
    ("patience-without-evals", "sft", ["--train.early-stopping-patience", "2"], ["train.early_stopping_patience", "eval_steps"]),
    ("eval-steps-no-eval-data", "dpo", ["--train.eval-steps", "5"], ["train.eval_steps", "single file"]),
    ("metric-not-produced", "rm", ["--data.eval-ratio", "0.2", "--train.eval-steps", "5", "--train.metric-for-best", "eval_reward_accuracy"],
     ["train.metric_for_best", "eval_accuracy"]),
    ("missing-dataset", "sft", ["--data.dataset", "{d}/nope.jsonl"], ["data.dataset", "nope.jsonl", "no such"]),
    ("missing-template", "sft", ["--model.chat-template", "{d}/t.jinja"], ["model.chat_template", "t.jinja"]),
    ("missing-responses", "eval", ["--model", "{d}/a.jsonl", "--reward.kind", "rule"], ["model", "a.jsonl", "no such"]),
    ("reward-model-unset", "eval", ["--model", "{d}/d.jsonl", "--reference", "{d}/d.jsonl"], ["reward.model", "required"]),
    ("bad-port", "serve-reward", ["--port", "70000", "--reward.kind", "rule"], ["port", "70000"]),
    ("unknown-option", "sft", ["--train.lr", "1"], ["unknown option", "train.learning_rate"]),
    ("not-a-number", "sft", ["--train.batch-size", "eight"], ["train.batch_size", "integer"]),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_options_exit_2_naming_key(case, tmp_path, toy_tokenizer_dir, capsys):
    """#11: each bad option or combination: exit 2 naming key, value and what is allowed, before any data is read."""
    name, stage, extra, expected = case
    d = tmp_path / "data"
    d.mkdir()
    data = write(d / "d.jsonl", jsonl([PAIR] * 4 if stage in ("dpo", "rm") else [CHAT] * 4))
    out = tmp_path / "out"
    argv = [stage]
    if stage in ("sft", "dpo", "rm"):
        argv += ["--data.dataset", data, "--model.name-or-path", str(toy_tokenizer_dir), "--output-dir", str(out)]
    if stage == "generate":
        argv += ["--prompts.dataset", data, "--model.name-or-path", str(toy_tokenizer_dir), "--output-dir", str(out)]
    if stage == "eval":
        argv += ["--output-dir", str(out)]
    argv += [a.replace("{d}", str(d)) for a in extra]  # last: an option given twice takes the later value
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()


def test_cli_process_exit_status_and_debug(tmp_path):
    """#11: `python -m alignkit.cli` exits 2 with one message; --debug adds the traceback."""
    cmd = [sys.executable, "-m", "alignkit.cli", "sft", "--train.batch-size", "-3", "--output-dir", str(tmp_path / "o")]
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 2, plain.stderr
    assert "train.batch_size: -3" in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "train.batch_size: -3" in debug.stderr
    assert not (tmp_path / "o").exists()


def test_user_errors_exit_2_unexpected_errors_keep_traceback(monkeypatch, capsys):
    """#11: every user-facing error class exits 2 (DataError, a missing input file); other errors raise."""
    import alignkit.cli as cli

    def stage(exc):
        def run(cfg):
            raise exc
        return cli.Stage(cli.DemoConfig, run, "test")

    for exc in (DataError("d.jsonl, line 2: bad"), FileNotFoundError("input not found: x"), ConfigError("k: v")):
        monkeypatch.setitem(cli.STAGES, "demo", stage(exc))
        assert main(["demo"]) == 2
        assert str(exc) in capsys.readouterr().err
    monkeypatch.setitem(cli.STAGES, "demo", stage(KeyError("bug")))
    with pytest.raises(KeyError):
        main(["demo"])


def test_zero_step_plan_is_an_error():
    """#11: a plan with no optimizer step (programmatic config, no CLI validation) stops instead of exiting 0."""
    from alignkit.config import TrainConfig
    from alignkit.train.loop import StepPlan

    with pytest.raises(ConfigError, match="no optimizer step"):
        StepPlan(100, TrainConfig(batch_size=-3), 1, 0, 0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        StepPlan(3, TrainConfig(batch_size=4), 1, 0, 0)


def test_stage_metric_tables_match_the_losses():
    """#11: STAGE_METRICS (what metric_for_best may name) is what the DPO and RM losses report."""
    import torch

    from alignkit.train import dpo, rm

    class Scores:
        def __call__(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(len(input_ids), 1)})()

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    assert {"eval_loss"} | {f"eval_{k}" for k in rm.rm_loss(Scores(), batch).metrics} == config_lib.STAGE_METRICS["RMConfig"]
    fake = (torch.zeros(4), torch.ones(4))
    original = dpo.batch_sequence_logps
    dpo.batch_sequence_logps = lambda model, batch: fake
    try:
        metrics = dpo.dpo_loss_fn(dpo.DPOParams())(None, dict(batch, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))).metrics
    finally:
        dpo.batch_sequence_logps = original
    assert {"eval_loss"} | {f"eval_{k}" for k in metrics} == config_lib.STAGE_METRICS["DPOConfig"]


# --------------------------------------------------------------------------- TRL's dataset formats


def rows_of(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def one(row: dict, shape: str) -> dict:
    return normalise(rows_of([row]), Source("x.jsonl", True), shape)[0]


def reply_ids(tok) -> tuple[list[int], list[int]]:
    labels = [t for t in tok.labels if t != IGNORE_INDEX]
    return tok.input_ids[: tok.prompt_tokens], labels


def trl_prompt_and(tokenizer, text: dict) -> dict:
    return {k: tokenizer(v, add_special_tokens=False)["input_ids"] for k, v in text.items()}


def assert_reply_matches_trl(ours: list[int], trl_text: str, tokenizer) -> None:
    # TRL's completion runs to the end of the template's turn, incl. the newline after <|im_end|>; ours stops at it.
    decoded = tokenizer.decode(ours)
    assert trl_text.startswith(decoded) and not trl_text[len(decoded):].strip(), (decoded, trl_text)


USER = [{"role": "user", "content": "What color is the sky?"}]


def test_trl_conversational_prompt_completion(toy_chat):
    """#11: conversational prompt-completion (prompt messages, completion = the assistant message): TRL's tokens."""
    from trl.data_utils import apply_chat_template

    row = {"prompt": USER, "completion": [{"role": "assistant", "content": "It is blue."}]}
    conv = one(row, "conversation")
    assert conv["messages"] == USER + row["completion"]
    prompt, reply = reply_ids(tokenize_chat(toy_chat.tokenizer, conv["messages"], toy_chat.end_of_turn))
    trl = apply_chat_template(row, toy_chat.tokenizer)
    assert prompt == toy_chat.tokenizer(trl["prompt"], add_special_tokens=False)["input_ids"]
    assert_reply_matches_trl(reply, trl["completion"], toy_chat.tokenizer)


def test_trl_standard_prompt_completion_reads_as_its_conversational_form(toy_chat):
    """#11: standard prompt-completion strings are read as the one-turn conversation (the same tokens)."""
    std = one({"prompt": "What color is the sky?", "completion": "It is blue."}, "conversation")
    conv = one({"prompt": USER, "completion": [{"role": "assistant", "content": "It is blue."}]}, "conversation")
    assert std == conv


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit-prompt", "implicit-prompt"])
def test_trl_conversational_preference(implicit, toy_chat):
    """#11: conversational preference, explicit prompt (assistant-only chosen/rejected) or implicit: TRL's tokens."""
    from trl.data_utils import apply_chat_template, extract_prompt

    chosen, rejected = [{"role": "assistant", "content": "It is blue."}], [{"role": "assistant", "content": "It is green."}]
    row = {"chosen": USER + chosen, "rejected": USER + rejected} if implicit else {"prompt": USER, "chosen": chosen, "rejected": rejected}
    pair = one(row, "preference")
    assert pair == {"prompt": USER, "chosen": "It is blue.", "rejected": "It is green."}
    trl = apply_chat_template(extract_prompt(row) if implicit else row, toy_chat.tokenizer)
    tok = toy_chat.tokenizer
    for side in ("chosen", "rejected"):
        prompt_ids, ids = tokenize_reply(tok, pair["prompt"], pair[side], toy_chat.end_of_turn)
        assert prompt_ids == tok(trl["prompt"], add_special_tokens=False)["input_ids"]
        assert_reply_matches_trl(ids, trl[side], tok)


def test_trl_standard_implicit_preference_prompt_is_the_common_prefix():
    """#11: standard implicit-prompt preference strings: prompt and replies split as TRL's extract_prompt does."""
    from trl.data_utils import extract_prompt

    row = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    pair = one(row, "preference")
    trl = extract_prompt(row)
    assert pair == {"prompt": [{"role": "user", "content": trl["prompt"]}], "chosen": trl["chosen"], "rejected": trl["rejected"]}


def test_trl_language_modelling_trains_every_token(toy_chat, tmp_path):
    """#11: language modelling (`text`) for SFT: TRL's tokens (the text and EOS), all of them trained on."""
    tok = toy_chat.tokenizer
    data = write(tmp_path / "lm.jsonl", jsonl([{"text": "the sky is blue"}, {"text": "grass is green"}]))
    rows, _ = load_examples(DataConfig(dataset=data), "text", 0)
    ds = tokenize_conversations(rows, toy_chat, DataConfig(dataset=data))
    for row, ex in zip(rows, ds):
        trl_ids = tok(row["text"] + tok.eos_token, add_special_tokens=False)["input_ids"]  # TRL's add_eos + tokenize
        assert ex["input_ids"] == trl_ids and ex["labels"] == trl_ids
    with pytest.raises(DataError, match="language-modelling"):
        load_examples(DataConfig(dataset=data), "conversation", 0)  # text-metrics needs chats


def test_trl_prompt_only_gives_prompts_not_training_rows(toy_chat, tmp_path):
    """#11: prompt-only rows are prompts (generate/eval, TRL's prompt tokens); training stages say so."""
    from trl.data_utils import apply_chat_template

    from alignkit.generation import PromptSource, load_prompts

    data = write(tmp_path / "p.jsonl", jsonl([{"prompt": USER}, {"prompt": "What color is grass?"}]))
    prompts = load_prompts(PromptSource(dataset=data, split="train"))
    for p, row in zip(prompts, [{"prompt": USER}, {"prompt": [{"role": "user", "content": "What color is grass?"}]}]):
        trl = apply_chat_template(row, toy_chat.tokenizer)["prompt"]
        assert tokenize_prompt(toy_chat.tokenizer, p["messages"]) == toy_chat.tokenizer(trl, add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="prompt-only"):
        load_examples(DataConfig(dataset=data), "text", 0)


def test_trl_unpaired_preference_is_a_clear_error(tmp_path):
    """#11: unpaired preference (prompt/completion/label) names why no stage trains on it."""
    data = write(tmp_path / "u.jsonl", jsonl([{"prompt": "p", "completion": "c", "label": False}]))
    for shape in ("text", "preference"):
        with pytest.raises(DataError, match="unpaired preference"):
            load_examples(DataConfig(dataset=data), shape, 0)


# --------------------------------------------------------------------------- property tests

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=3),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": st.text(max_size=6)})
VALUE = JSON | st.lists(MESSAGE, max_size=3) | st.text(max_size=12)
ROW = st.dictionaries(st.sampled_from(["messages", "prompt", "completion", "chosen", "rejected", "text", "label", "x"]), VALUE, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=0, max_size=3), shape=st.sampled_from(["text", "conversation", "preference"]))
def test_random_rows_are_accepted_or_a_clear_error(rows, shape, tmp_path_factory):
    """#11: random JSON rows through the front door and the schema: rows, or DataError, never another exception."""
    path = tmp_path_factory.mktemp("rows") / "d.jsonl"
    path.write_text(jsonl(rows))
    try:
        ds, source = load_rows(str(path))
        out = normalise(ds, source, shape)
    except DataError:
        return
    assert out and all(("messages" in r or "text" in r) if shape != "preference" else {"prompt", "chosen", "rejected"} <= set(r) for r in out)


OPTIONS = {
    "train.batch_size": "SFTConfig", "train.learning_rate": "SFTConfig", "train.warmup_ratio": "SFTConfig",
    "train.eval_steps": "SFTConfig", "train.early_stopping_patience": "SFTConfig", "train.metric_for_best": "SFTConfig",
    "data.eval_ratio": "SFTConfig", "data.max_examples": "SFTConfig", "data.dataset": "SFTConfig", "dpo.beta": "DPOConfig",
    "dpo.label_smoothing": "DPOConfig", "dpo.loss_type": "DPOConfig", "sampling.n": "GenerateConfig",
    "sampling.num_beams": "GenerateConfig", "sampling.temperature": "GenerateConfig", "sampling.top_p": "GenerateConfig",
    "prompts.max_prompts": "GenerateConfig", "model.chat_template": "SFTConfig",
}
OPTION_VALUE = (st.none() | st.booleans() | st.integers(-3, 5) | st.floats(allow_nan=True, allow_infinity=True)
                | st.text(max_size=6) | st.sampled_from(["nan", "inf", "-1", "0", "1e-5", "ipo", "eval_loss", "./x.jsonl"]))


@settings(max_examples=60, deadline=None)
@given(values=st.dictionaries(st.sampled_from(sorted(OPTIONS)), OPTION_VALUE, min_size=1, max_size=3))
def test_random_option_values_are_accepted_or_a_config_error(values):
    """#11: random option values: a valid config, or ConfigError, never another exception."""
    from alignkit.generation import GenerateConfig
    from alignkit.train.dpo import DPOConfig
    from alignkit.train.sft import SFTConfig

    classes = {"SFTConfig": SFTConfig, "DPOConfig": DPOConfig, "GenerateConfig": GenerateConfig}
    stages = {OPTIONS[k] for k in values}
    for stage in stages:
        overrides = {k: v for k, v in values.items() if OPTIONS[k] == stage}
        try:
            cfg = config_lib.load(classes[stage], None, overrides)
        except ConfigError as e:
            assert str(e)
            continue
        assert cfg is not None
