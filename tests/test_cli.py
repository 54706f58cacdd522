"""The console command end to end: init-model, data-stats, sft from a recipe, demo."""

import json
import subprocess
import sys

import pytest
from transformers import AutoConfig

from alignkit.cli import main

from .conftest import need_shared
from .test_report import check_demo_report


def test_missing_recipe_is_a_clear_error(tmp_path, capsys):
    assert main(["init-model", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_version_names_the_code(capsys):
    """`alignkit --version` prints what pipelines and reports record: the version and the code's digest."""
    from alignkit import __version__, code_version

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"alignkit {code_version()}\n" and out.startswith(f"alignkit {__version__}+")
    ran = subprocess.run([sys.executable, "-m", "alignkit", "--version"], capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout) == (0, out)  # python -m alignkit: the same command


def test_init_model_cli(tmp_path):
    src = need_shared("models", "qwen2.5-0.5b")
    out = tmp_path / "m"
    recipe = tmp_path / "init.yaml"
    recipe.write_text(f"model_config: {src}\noutput_dir: {out}\n")
    assert main(["init-model", "--config", str(recipe), "hidden_size=64", "num_hidden_layers=2", "num_attention_heads=4", "num_key_value_heads=2", "intermediate_size=128"]) == 0
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, 151936)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    with pytest.raises(ValueError, match="has no field 'hidden_sise'"):
        main(["init-model", "--config", str(recipe), "hidden_sise=64"])


def test_data_stats_prints_percentiles(capsys, toy_tokenizer_dir, toy_data_dir):
    assert main(["data-stats", "--dataset", str(toy_data_dir), "--tokenizer", str(toy_tokenizer_dir), "--max-examples", "50"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert out.splitlines()[1].split() == ["p50", "p90", "p95", "p99", "max", "n"]
    assert set(lines) == {"prompt", "response", "total"} and lines["prompt"][-1] == "50"
    p = [int(v) for v in lines["response"][:5]]
    assert p == sorted(p) and p[0] > 1


def test_data_stats_on_preference_pairs(capsys):
    need_shared("models", "qwen2.5-0.5b")
    data = need_shared("data", "ultrafeedback_binarized")
    assert main(["data-stats", "--dataset", str(data), "--split", "test_prefs", "--tokenizer", str(need_shared("models", "qwen2.5-0.5b")), "--max-examples", "40"]) == 0
    out = capsys.readouterr().out
    assert "preference schema" in out and "chosen" in out and "rejected" in out


def test_sft_from_recipe_with_override(tmp_path, tiny_model_dir, toy_data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  dataset: {toy_data_dir}\n  eval_split: test\n"
        "train:\n  max_steps: 3\n  batch_size: 4\n  precision: fp32\n  logging_steps: 1\n"
    )
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "alignkit.cli", "sft", "--config", str(recipe), "--output-dir", str(out), "--train.max-steps", "2", "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    saved = (out / "config.yaml").read_text()
    assert "max_steps: 2" in saved and f"output_dir: {out}" in saved
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "final", "metrics.jsonl"]


def test_demo_runs_and_reports(tmp_path):
    argv = ["demo", "--output-dir", str(tmp_path / "demo"), "--steps", "30", "--dpo-steps", "5", "--rl-steps", "3",
            "--rm-steps", "4", "--quiet"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    for stage in ("base", "sft", "dpo", "rloo", "rloo_rm"):
        assert set(results[stage]) == {"accuracy", "stop_rate", "sign_off_rate", "right_ignoring_sign_off", "per_task",
                                       "content_per_task"}
        assert set(results[stage]["content_per_task"]) == {"repeat", "flip", "last", "count"}
    assert results["dpo_vs_sft"]["n"] == results["data"]["held_out_prompts"] == 160  # distinct prompts, each counted once
    assert not {"bon", "self_refinement", "grpo", "self_dpo"} & set(results)  # behind --full
    assert set(results["reward_model"]) >= {"eval_accuracy", "length_baseline", "eval_pairs"}
    c = results["content"]["rloo_rm_vs_sft"]
    assert c["wins"] + c["losses"] + c["ties"] == results["rloo_rm_vs_sft"]["n"] == 160
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| after SFT (30 steps) |" in report and "| after DPO-Positive (5 steps) |" in report
    assert "| after RLOO, verifier (3 steps) |" in report and "| after RLOO, reward model (3 steps) |" in report
    assert "held-out pair accuracy" in report and "longer reply wins" in report
    check_demo_report(tmp_path / "demo")  # the full report with plots, written at the demo's end
