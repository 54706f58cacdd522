"""The gold reward of the rl stage (#21): a second reward, scored on held-out prompts at every evaluation
beside the training (proxy) reward, from the same greedy answers."""

import json

import pytest
import yaml

import alignkit.train.rl as rl
from alignkit.config import ConfigError, Grants, ModelConfig, TrainConfig, granted, load, validate
from alignkit.generation import PromptSource
from alignkit.rewards.backends import RewardConfig
from alignkit.train.loop import read_metrics
from alignkit.train.rl import GoldRewardConfig, RLConfig, RLParams


def gold_cfg(out, model_dir, data_dir, gold=None, **train) -> RLConfig:
    base = dict(max_steps=2, batch_size=4, grad_accum=1, learning_rate=1e-3, scheduler="constant", save_steps=None,
                logging_steps=1, precision="fp32", metric_for_best="eval_reward", greater_is_better=True)
    return RLConfig(output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(model_dir)),
                    prompts=PromptSource(dataset=str(data_dir), split="train"),
                    eval_prompts=PromptSource(dataset=str(data_dir), split="test", max_prompts=8),
                    reward=RewardConfig(kind="rule", rule="toy"), gold_reward=gold or GoldRewardConfig(),
                    rl=RLParams(k=4, max_new_tokens=8, beta=0.0, log_samples_steps=0), train=TrainConfig(**(base | train)))


# --------------------------------------------------------------------------- the config


def test_unset_by_default_and_on_the_command_line():
    cfg = load(RLConfig)
    assert cfg.gold_reward.kind == "none"
    assert rl.gold_backend(cfg, "unused") is None
    cfg = load(RLConfig, overrides={"gold_reward.kind": "rule", "gold_reward.rule": "toy", "eval_prompts.dataset": "h4/x"})
    assert cfg.gold_reward.as_reward() == RewardConfig(kind="rule", rule="toy")
    with pytest.raises(ConfigError, match="gold_reward.kind: 'judge' is not one of none, hf, remote, rule"):
        load(RLConfig, overrides={"gold_reward.kind": "judge"})


def test_a_gold_reward_needs_held_out_prompts_and_is_checked_like_reward(tmp_path):
    with pytest.raises(ConfigError, match="gold_reward.kind: rule scores greedy answers to held-out prompts.*"
                                          "set eval_prompts.dataset"):
        load(RLConfig, overrides={"gold_reward.kind": "rule"})
    prompts = {"eval_prompts.dataset": "h4/x"}
    with pytest.raises(ConfigError, match="gold_reward.batch_size: 0 is not allowed"):
        load(RLConfig, overrides={**prompts, "gold_reward.kind": "rule", "gold_reward.batch_size": 0})
    with pytest.raises(ConfigError, match="gold_reward.base_url and gold_reward.model are required"):
        load(RLConfig, overrides={**prompts, "gold_reward.kind": "remote"})
    with pytest.raises(ConfigError, match="gold_reward.model: './no-rm': no such reward model folder"):
        load(RLConfig, overrides={**prompts, "gold_reward.kind": "hf", "gold_reward.model": "./no-rm"})
    # unset, its fields are not checked: a saved config.yaml with the defaults loads again
    validate(RLConfig(gold_reward=GoldRewardConfig(batch_size=0)))
    # run_rl's up-front check (configs built in Python skip load's)
    for gold, match in [(GoldRewardConfig(kind="hf"), "gold_reward.model is required for gold_reward.kind 'hf'"),
                        (GoldRewardConfig(kind="rule", rule="no_such_verifier"), "gold_reward: .*no_such_verifier"),
                        (GoldRewardConfig(kind="rule", rule="toy", tolerance=0.1), "gold_reward.tolerance")]:
        with pytest.raises(ConfigError, match=match):
            rl.check_rl_config(RLConfig(eval_prompts=PromptSource(dataset="h4/x"), gold_reward=gold))
    with pytest.raises(ConfigError, match="set eval_prompts.dataset"):
        rl.check_rl_config(RLConfig(gold_reward=GoldRewardConfig(kind="rule")))


def test_a_recipe_cannot_grant_powers_through_the_gold_reward(tmp_path, monkeypatch):
    """The trust boundary covers gold_reward like reward: a file cannot turn on a Python verifier or
    insecure http for it, nor send a key to a host of its choosing; the command line can."""
    recipe = tmp_path / "recipe.yaml"
    gold = {"kind": "rule", "rule": "tests.test_trust_boundary:echo_length", "allow_python_verifier": True}
    recipe.write_text(yaml.safe_dump({"eval_prompts": {"dataset": "h4/x"}, "gold_reward": gold}))
    with pytest.raises(ConfigError, match="gold_reward.allow_python_verifier: True is not honoured from a file.*"
                                          "--allow-python-verifier"):
        load(RLConfig, recipe)
    with granted(Grants(allow_python_verifier=True)):
        assert load(RLConfig, recipe).gold_reward.allow_python_verifier is True
    assert load(RLConfig, recipe, {"gold_reward.allow_python_verifier": True}).gold_reward.allow_python_verifier

    recipe.write_text(yaml.safe_dump({"eval_prompts": {"dataset": "h4/x"}, "gold_reward": {
        "kind": "remote", "model": "m", "base_url": "http://judge.example:8000/v1", "allow_insecure_http": True}}))
    with pytest.raises(ConfigError, match="gold_reward.allow_insecure_http: True is not honoured"):
        load(RLConfig, recipe)
    monkeypatch.setenv("NVIDIA_API_KEY", "nvapi-test")
    recipe.write_text(yaml.safe_dump({"eval_prompts": {"dataset": "h4/x"}, "gold_reward": {
        "kind": "remote", "model": "m", "base_url": "https://collector.example/v1", "api_key_env": "NVIDIA_API_KEY"}}))
    with pytest.raises(ConfigError, match="gold_reward.api_key_env: NVIDIA_API_KEY would be sent to collector.example.*"
                                          "--allow-key NVIDIA_API_KEY=collector.example"):
        load(RLConfig, recipe)


# --------------------------------------------------------------------------- one generation, two scores


class Recorder:
    """A backend that scores by length and remembers what it was asked to score."""

    def __init__(self, identity, scale=1.0):
        self.identity, self.scale, self.seen = identity, scale, []

    def score(self, prompts, responses, columns=None):
        self.seen.append(list(responses))
        return [self.scale * len(r) for r in responses]


def test_one_generation_pass_scored_by_both_rewards(toy_chat, trained_toy_model, toy_data_dir, monkeypatch):
    from alignkit.models import load_causal_lm

    cfg = gold_cfg("/unused", trained_toy_model, toy_data_dir, GoldRewardConfig(kind="rule", rule="toy"))
    calls = []
    real = rl.generate
    monkeypatch.setattr(rl, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    proxy, gold = Recorder("proxy"), Recorder("gold", scale=-2.0)
    model = load_causal_lm(cfg.model, toy_chat)
    got = rl.make_eval_fn(cfg, toy_chat, proxy, gold)(model)
    assert len(calls) == 1
    assert proxy.seen == gold.seen and len(proxy.seen[0]) == 8
    texts = proxy.seen[0]
    assert got["eval_reward"] == pytest.approx(sum(map(len, texts)) / 8)
    assert got["eval_gold_reward"] == pytest.approx(-2.0 * sum(map(len, texts)) / 8)
    assert "eval_gold_reward" not in rl.make_eval_fn(cfg, toy_chat, proxy)(model)


def test_eval_logs_proxy_and_gold_rewards_and_caches_gold_scores(tmp_path, trained_toy_model, toy_data_dir):
    """At every evaluation (eval_steps and the final one) metrics.jsonl holds eval_reward and
    eval_gold_reward; the gold scores go to <output_dir>/scores.sqlite, so a greedy answer seen at an
    earlier evaluation is not scored again."""
    gold = GoldRewardConfig(kind="rule", rule="toy")
    out = tmp_path / "run"
    rl.run_rl(gold_cfg(out, trained_toy_model, toy_data_dir, gold, max_steps=2, eval_steps=1,
                       metric_for_best="eval_gold_reward"))
    evals = [m for m in read_metrics(out) if "eval_reward" in m]
    assert [m["step"] for m in evals] == [0, 1, 2]
    for m in evals:
        assert 0.0 <= m["eval_gold_reward"] <= 1.0
        # proxy and gold are the same verifier here: the same score of the same answers
        assert m["eval_gold_reward"] == pytest.approx(m["eval_reward"])
    from alignkit.remote import SQLiteCache

    stored = SQLiteCache(out / "scores.sqlite").db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    assert 8 <= stored <= 3 * 8  # each distinct (prompt, answer) once
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["gold_reward"]["kind"] == "rule"


def test_gold_rows_are_checked_before_the_model_loads(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    """A gold verifier that cannot score an eval prompt stops the run before any model is loaded."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "What is 1 plus 2?"}) + "\n")
    (data / "test.jsonl").write_text(json.dumps({"prompt": "Make 10 from 2 3 5."}) + "\n")
    loaded = []
    monkeypatch.setattr(rl, "load_causal_lm", lambda *a, **k: loaded.append(1))
    cfg = gold_cfg(tmp_path / "run", trained_toy_model, data, GoldRewardConfig(kind="rule", rule="countdown"))
    with pytest.raises(ConfigError, match=r"eval_prompts \(gold_reward\): .*cannot score it"):
        rl.run_rl(cfg)
    assert not loaded


def test_two_processes_score_the_gold_reward_like_one(tmp_path, trained_toy_model, toy_data_dir):
    """torchrun with 2 processes: each scores its share of the 9 held-out prompts, the sums are
    all-reduced, and metrics.jsonl holds the same eval_reward and eval_gold_reward as one process's
    (greedy answers do not depend on the process)."""
    import subprocess
    import sys

    from .test_distributed import free_port

    common = [
        "--model.name-or-path", str(trained_toy_model), "--prompts.dataset", str(toy_data_dir), "--prompts.split", "train",
        "--eval-prompts.dataset", str(toy_data_dir), "--eval-prompts.split", "test", "--eval-prompts.max-prompts", "9",
        "--reward.kind", "rule", "--reward.rule", "toy", "--gold-reward.kind", "rule", "--gold-reward.rule", "toy",
        "--rl.k", "4", "--rl.max-new-tokens", "8", "--rl.beta", "0", "--train.max-steps", "1", "--train.precision", "fp32",
        "--train.learning-rate", "1e-3", "--train.save-steps", "0", "--quiet",
    ]
    one = subprocess.run([sys.executable, "-m", "alignkit.cli", "rl", *common, "--output-dir", str(tmp_path / "one"),
                          "--train.batch-size", "4"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "alignkit.cli", "rl"]
    two = subprocess.run([*launch, *common, "--output-dir", str(tmp_path / "two"), "--train.batch-size", "2"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = [m for m in read_metrics(tmp_path / "one") if "eval_gold_reward" in m]
    b = [m for m in read_metrics(tmp_path / "two") if "eval_gold_reward" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1]
    for x, y in zip(a, b):
        for key in ("eval_reward", "eval_gold_reward", "eval_completion_length"):
            assert y[key] == pytest.approx(x[key], rel=1e-6), key


# --------------------------------------------------------------------------- the report


def rl_stage(path, gold: bool, steps: int = 20, eval_steps: int = 5):
    """An rl stage folder as run_rl leaves it: config.yaml and metrics.jsonl, with a proxy that keeps
    rising and (with `gold`) a gold reward that peaks at step 10 and falls."""
    path.mkdir(parents=True)
    config = {"output_dir": str(path), "model": {"name_or_path": "sft/final"}, "prompts": {"dataset": "prompts"},
              "reward": {"kind": "hf", "model": str(path.parent / "rm" / "final"), "rule": "toy"},
              "gold_reward": {"kind": "rule" if gold else "none", "rule": "toy"},
              "rl": {"algo": "rloo", "k": 4, "beta": 0.0}, "train": {"max_steps": steps}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for step in range(steps + 1):
        if step:
            rows.append({"step": step, "loss": 0.1, "reward": 0.1 * step})
        if step % eval_steps == 0:
            ev = {"step": step, "eval_reward": 0.2 * step, "eval_completion_length": 5.0}
            if gold:
                ev["eval_gold_reward"] = 0.3 + 0.04 * step if step <= 10 else 0.7 - 0.05 * (step - 10)
            rows.append(ev)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_draws_proxy_against_gold(tmp_path):
    from alignkit.report import write_report

    run = tmp_path / "run"
    rl_stage(run / "rl", gold=True)
    report = write_report(run).read_text()
    section = report.split("## Proxy and gold reward", 1)[1]
    assert "Proxy: hf rm/final. Gold: rule toy." in section  # both rewards named
    assert "| step | proxy, training samples | proxy, held-out | gold, held-out |" in section
    assert "| 0 | - | 0 | 0.3 |" in section and "| 10 | 1 | 2 | 0.7 |" in section and "| 20 | 2 | 4 | 0.2 |" in section
    assert "peaked at step 10 (0.7) and fell while the proxy kept rising: over-optimisation" in section
    png = run / "report" / "proxy-gold-rl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(proxy-gold-rl.png)" in section and "proxy reward (hf rm/final) and gold reward (rule toy)" in section


def test_no_gold_no_proxy_gold_section(tmp_path):
    from alignkit.report import write_report

    run = tmp_path / "run"
    rl_stage(run / "rl", gold=False)
    report = write_report(run).read_text()
    assert "Proxy and gold" not in report and not (run / "report" / "proxy-gold-rl.png").exists()
    assert "## Training curves" in report


def test_a_long_run_lists_a_short_table_and_a_rising_gold_is_not_called_over_optimised(tmp_path):
    from alignkit.report import GOLD_TABLE_ROWS, write_report

    run = tmp_path / "run"
    rl_stage(run / "rl", gold=True, steps=200, eval_steps=2)
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # gold rising all along
        if "eval_gold_reward" in r:
            r["eval_gold_reward"] = r["step"] / 200
    (run / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = write_report(run, draw=False).read_text().split("## Proxy and gold reward", 1)[1]
    table = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) <= GOLD_TABLE_ROWS and table[0].startswith("| 0 |") and table[-1].startswith("| 200 |")
    assert f"{len(table)} of 101 evaluations listed" in section
    assert "over-optimisation" not in section.split("Gold reward 0 at step 0", 1)[1]
