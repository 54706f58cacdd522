"""LoRA through peft (model.lora): SFT learns, only adapters train, DPO's reference is the base with
the adapters off (no second model), final/ is an adapter folder that generation loads and `alignkit
merge` turns into a plain model with the same logits, and a killed LoRA run resumes exactly.

The toy task: the 12 prompts of tests/test_rl_learning.py (repeat, capitals, reverse, add, sort),
whose answers alignkit.rewards.toy.solve computes; a 2-layer model of hidden size 64 from random init.
"""

import json

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs peft (pip install 'alignkit[peft]')")

from alignkit.config import DataConfig, LoRAConfig, ModelConfig, TrainConfig  # noqa: E402
from alignkit.demo.world import build_tokenizer, write_jsonl, write_model_config  # noqa: E402
from alignkit.generation import SamplingParams, generate  # noqa: E402
from alignkit.models import init_model, is_adapter_dir, load_causal_lm, load_tokenizer  # noqa: E402
from alignkit.rewards.toy import solve  # noqa: E402
from alignkit.train import checkpoint as ckpt  # noqa: E402
from alignkit.train.loop import Callback, read_metrics  # noqa: E402
from alignkit.train.sft import SFTConfig, run_sft  # noqa: E402

PROMPTS = [
    "Repeat the word cat 2 times.", "Repeat the word sun 3 times.", "Write dog in capital letters.",
    "Write moon in capital letters.", "Spell fish backwards.", "Spell tree backwards.", "What is 3 plus 4?",
    "What is 7 plus 8?", "What is 2 plus 9?", "Sort these numbers: 3 1 2", "Sort these numbers: 9 4 7 1",
    "Sort these numbers: 5 0 8",
]
LORA = LoRAConfig(r=16, alpha=32)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tok = build_tokenizer(root / "tokenizer")
    chat = load_tokenizer(ModelConfig(name_or_path=str(tok)))
    write_model_config(root / "config", vocab_size=len(chat.tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2)
    init_model(str(root / "config"), root / "random", tokenizer_source=str(tok), seed=0)
    chats = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": solve(p)}]} for p in PROMPTS]
    write_jsonl(chats[:6] * 32, root / "pretrain" / "train.jsonl")  # repeat, capitals, reverse
    write_jsonl(chats * 16, root / "data" / "train.jsonl")  # all five kinds (add and sort too)
    # The base: a full fine-tune on three of the five kinds. (LoRA from random weights cannot learn this
    # task: with the embeddings and the final norm frozen at init, its logits stay within about +-1.3.)
    run_sft(sft_cfg(root / "pretrained", root / "random", root / "pretrain", LoRAConfig(), max_steps=40))
    (root / "base").symlink_to(root / "pretrained" / "final")
    return root


def sft_cfg(out, model_dir, data_dir, lora=LORA, **train) -> SFTConfig:
    base = dict(max_steps=60, batch_size=16, learning_rate=1e-2, logging_steps=10, save_steps=None, precision="fp32",
                scheduler="constant")
    return SFTConfig(output_dir=str(out), seed=0, quiet=True,
                     model=ModelConfig(name_or_path=str(model_dir), lora=lora),
                     data=DataConfig(dataset=str(data_dir)), train=TrainConfig(**(base | train)))


def exact_match(model_dir) -> float:
    """Greedy answers equal to the toy solver's, over the 12 prompts."""
    cfg = ModelConfig(name_or_path=str(model_dir))
    chat = load_tokenizer(cfg)
    outs = generate(load_causal_lm(cfg, chat), chat, [[{"role": "user", "content": p}] for p in PROMPTS],
                    SamplingParams(max_new_tokens=24), batch_size=12)
    return sum(o[0].text.strip() == solve(p) for p, o in zip(PROMPTS, outs)) / len(PROMPTS)


@pytest.fixture(scope="module")
def lora_sft(toy):
    run_sft(sft_cfg(toy / "sft", toy / "base", toy / "data"))
    return toy / "sft"


def test_lora_sft_raises_exact_match_and_final_is_an_adapter(toy, lora_sft):
    final = lora_sft / "final"
    assert is_adapter_dir(final) and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter only, never the base's weights
    assert (final / "tokenizer_config.json").is_file() and (final / "chat_template.jinja").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["base_model_name_or_path"] == str((toy / "base").resolve())
    before, after = exact_match(toy / "base"), exact_match(final)
    assert after >= before + 0.15, (before, after)  # measured 0.33 -> 0.67 (1 thread), 0.33 -> 0.5 (2 threads)
    losses = [m["loss"] for m in read_metrics(lora_sft) if "loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses


def test_merge_as_a_pipeline_stage_reruns_when_the_adapters_base_changes(toy, lora_sft, tmp_path, capsys):
    """`merge` is a pipeline kind whose output `model` is its folder; the adapter's base (named in
    adapter_config.json, outside the pipeline) is an input: the same adapter over a retrained base is
    merged again instead of skipped with yesterday's model."""
    import shutil

    import yaml

    from alignkit.pipeline import RunConfig, read_pipeline, run_pipeline

    base = tmp_path / "base"
    shutil.copytree(toy / "pretrained" / "final", base)
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_sft / "final", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": {
        "merged": {"kind": "merge", "source": str(adapter)}}}))
    assert read_pipeline(pipeline).stages[0].outputs["model"] == str(tmp_path / "run" / "merged")

    def plan() -> dict:
        capsys.readouterr()
        run_pipeline(RunConfig(pipeline=str(pipeline), quiet=True, dry_run=True))
        out = capsys.readouterr().out
        return next(line.split(maxsplit=2)[1:] for line in out.splitlines() if line.startswith("  merged "))

    run_pipeline(RunConfig(pipeline=str(pipeline), quiet=True))
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    assert not is_adapter_dir(tmp_path / "run" / "merged")
    assert plan() == ["skip", "done, unchanged"]
    shutil.copy(toy / "random" / "model.safetensors", base / "model.safetensors")  # the base retrained in place
    action, why = plan()
    assert action == "run" and str(base) in why, why


def test_adapters_that_name_each_other_as_base_are_a_clear_error(lora_sft, tmp_path):
    """A chain of adapters must end in a full model: two folders naming each other as base (a hand edit,
    a copy gone wrong) are a ConfigError naming the loop, not a RecursionError from the loader or the
    generate cache's fingerprint; an adapter_config.json without a base is one too."""
    import shutil

    from alignkit.config import ConfigError
    from alignkit.generation import model_fingerprint
    from alignkit.models import adapter_base

    a, b = tmp_path / "a", tmp_path / "b"
    for here, other in ((a, b), (b, a)):
        shutil.copytree(lora_sft / "final", here)
        config = json.loads((here / "adapter_config.json").read_text())
        (here / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(ConfigError, match=r"name each other as base .*/a -> .*/b -> .*/a"):
        adapter_base(a)
    with pytest.raises(ConfigError, match="name each other"):
        model_fingerprint(ModelConfig(name_or_path=str(b)))
    (a / "adapter_config.json").write_text(json.dumps({"r": 16}))
    with pytest.raises(ConfigError, match="names no base_model_name_or_path"):
        adapter_base(a)
    assert adapter_base(lora_sft / "final") == str((lora_sft.parent / "pretrained" / "final").resolve())


def test_only_adapter_parameters_get_gradients(toy):
    from alignkit.models import with_lora
    from alignkit.train.sft import sft_loss
    from alignkit.data.collate import collate_lm
    from alignkit.data.prepare import load_examples, tokenize_conversations

    cfg = sft_cfg(toy / "unused", toy / "base", toy / "data")
    chat = load_tokenizer(cfg.model)
    model = with_lora(load_causal_lm(cfg.model, chat), cfg.model)
    rows, _ = load_examples(cfg.data, "text", 0)
    batch = collate_lm(list(tokenize_conversations(rows[:8], chat, cfg.data, "t"))[:8], pad_token_id=chat.pad_id)
    sft_loss(model, batch).loss_sum.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in n for n in with_grad), sorted(with_grad)[:5]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if "lora_" in n}
    # At init B = 0, so only B has a gradient (A's is B^T times something); all-linear: the MLPs have adapters too.
    assert all("lora_B" in n for n in with_grad) and any("mlp" in n for n in with_grad)


def test_merge_gives_the_logits_of_base_plus_adapter(toy, lora_sft, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignkit.models import merge_adapter_dir

    merged = merge_adapter_dir(lora_sft / "final", tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and not is_adapter_dir(merged)
    ids = torch.tensor([[5, 17, 42, 9, 3, 88, 21]])
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()  # plain transformers, no peft
    base = AutoModelForCausalLM.from_pretrained(toy / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    unmerged = PeftModel.from_pretrained(base, str(lora_sft / "final")).eval()  # injects the adapter into `base`
    with torch.no_grad():
        a, b = plain(ids).logits, unmerged(ids).logits
    assert not torch.allclose(a, base_logits, atol=1e-2)  # the adapter changed something
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert exact_match(merged) == exact_match(lora_sft / "final")


class Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, state, logs):
        if state.step == self.at:
            raise KeyboardInterrupt


def test_lora_resume_after_interruption_is_exact(toy, tmp_path):
    from safetensors.torch import load_file

    kw = dict(max_steps=8, save_steps=3, logging_steps=1, learning_rate=3e-3, scheduler="linear")
    lora = LoRAConfig(r=4, dropout=0.1)  # adapter dropout draws from the RNG: resume restores it
    run_sft(sft_cfg(tmp_path / "straight", toy / "base", toy / "data", lora, **kw))
    cfg = sft_cfg(tmp_path / "broken", toy / "base", toy / "data", lora, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, callbacks=[Interrupt(at=5)])
    step3 = tmp_path / "broken" / "checkpoints" / "step-3"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "broken" / "checkpoints")] == [3]
    assert is_adapter_dir(step3) and not (step3 / "model.safetensors").exists()
    cfg.resume = True
    run_sft(cfg)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]
    a = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "broken" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- DPO: the reference is the base, adapters off


def dpo_cfg(toy, out, lora=LORA, **dpo):
    from alignkit.train.dpo import DPOConfig, DPOParams

    return DPOConfig(output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(toy / "base"), lora=lora),
                     data=DataConfig(dataset=str(toy / "prefs"), split="train_prefs", eval_split=None, max_examples=16),
                     train=TrainConfig(max_steps=2, batch_size=4, grad_accum=1, learning_rate=1e-3, save_steps=None,
                                       precision="fp32", logging_steps=1),
                     dpo=DPOParams(ref_cache_dir=str(toy / "ref_cache"), **dpo))


@pytest.fixture(scope="module")
def prefs(toy):
    from alignkit.demo.world import write_preference_data

    write_preference_data(toy / "prefs", n_train=16, n_test=4)
    return toy / "prefs"


def counting_loads(monkeypatch):
    import alignkit.train.dpo as dpo

    calls = []
    real = dpo.load_causal_lm

    def load(*args, **kwargs):
        calls.append(kwargs.get("path"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo, "load_causal_lm", load)
    return calls


def base_pair_logps(toy, pairs) -> list[tuple[float, float]]:
    """Each pair's (chosen, rejected) log-probs under the base model, loaded on its own, without peft."""
    from functools import partial

    from alignkit.data.collate import collate_pairs
    from alignkit.train.dpo import pair_scores

    cfg = ModelConfig(name_or_path=str(toy / "base"))
    chat = load_tokenizer(cfg)
    model = load_causal_lm(cfg, chat).eval()
    batch = partial(collate_pairs, pad_token_id=chat.pad_id)([pairs[i] for i in range(len(pairs))])
    with torch.no_grad():
        chosen, rejected = pair_scores(model, batch)
    return list(zip(chosen.tolist(), rejected.tolist()))


def test_lora_dpo_reference_is_the_base_and_its_cache_is_keyed_apart(toy, prefs, monkeypatch):
    from alignkit.data.prepare import load_examples, tokenize_pairs
    from alignkit.train.dpo import run_dpo

    calls = counting_loads(monkeypatch)
    run_dpo(dpo_cfg(toy, toy / "dpo-lora"))
    assert len(calls) == 1  # one model in memory: the policy, whose base with adapters off is the reference
    caches = sorted((toy / "ref_cache").glob("*.json"))
    assert len(caches) == 1
    cached = json.loads(caches[0].read_text())
    cfg = dpo_cfg(toy, toy / "unused")
    rows, _ = load_examples(cfg.data, "preference", 0)
    pairs = tokenize_pairs(rows, load_tokenizer(cfg.model), cfg.data, "t")
    expected = base_pair_logps(toy, pairs)
    assert [pytest.approx(c, abs=1e-4) for c, _ in expected] == cached["chosen"]
    assert [pytest.approx(r, abs=1e-4) for _, r in expected] == cached["rejected"]
    assert is_adapter_dir(toy / "dpo-lora" / "final")
    # A full-model DPO from the same checkpoint has its own reference (the full model) and cache entry.
    run_dpo(dpo_cfg(toy, toy / "dpo-full", LoRAConfig()))
    assert len(sorted((toy / "ref_cache").glob("*.json"))) == 2
    # The same LoRA run again hits its cache.
    run_dpo(dpo_cfg(toy, toy / "dpo-lora-again"))
    assert len(sorted((toy / "ref_cache").glob("*.json"))) == 2


def test_lora_dpo_without_precompute_uses_the_adapters_off_view(toy, prefs, monkeypatch):
    from alignkit.models import AdaptersOff, with_lora
    from alignkit.train.dpo import batch_sequence_logps, run_dpo

    calls = counting_loads(monkeypatch)
    run_dpo(dpo_cfg(toy, toy / "dpo-live", precompute_ref=False))
    assert len(calls) == 1
    metrics = read_metrics(toy / "dpo-live")
    assert metrics[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is its reference
    # The view itself: adapters off gives the base's log-probs exactly, whatever the adapters hold.
    cfg = ModelConfig(name_or_path=str(toy / "base"), lora=LORA)
    chat = load_tokenizer(cfg)
    model = with_lora(load_causal_lm(cfg, chat), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    base = load_causal_lm(ModelConfig(name_or_path=str(toy / "base")), chat)
    ids = torch.tensor([[5, 17, 42, 9, 3, 88, 21, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        off, plain, on = (batch_sequence_logps(m, batch)[0] for m in (AdaptersOff(model), base, model))
    torch.testing.assert_close(off, plain)
    assert not torch.allclose(on, plain, atol=1e-3)


# --------------------------------------------------------------------------- trackers


def test_tensorboard_tracker_gets_the_metrics_and_config(toy, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="train.report_to: tensorboard needs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("SOME_API_KEY", "sk-not-a-real-key-123")
    cfg = sft_cfg(tmp_path / "run", toy / "base", toy / "data", max_steps=4, logging_steps=2, report_to=["tensorboard"])
    cfg.data.dataset = str(toy / "pretrain")
    run_sft(cfg)
    events = sorted((tmp_path / "run" / "tracking").rglob("events.out.tfevents.*"))
    assert events
    scalars = {}
    for f in events:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    logged = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [s for s, _ in scalars["loss"]] == [m["step"] for m in logged] == [2, 4]
    for (_, v), m in zip(scalars["loss"], logged):
        assert v == pytest.approx(m["loss"], rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(scalars)
    hparams = list((tmp_path / "run" / "tracking").rglob("hparams.yml"))
    assert hparams and "model.lora.r: 16" in hparams[0].read_text()


def test_public_config_flattens_and_never_holds_a_secret():
    from alignkit.train.tracking import numbers, public_config

    env = {"OPENAI_API_KEY": "sk-abcdef123456", "HOME": "/root"}
    values = {"reward": {"api_key_env": "OPENAI_API_KEY", "base_url": "https://x/?k=sk-abcdef123456"},
              "train": {"report_to": ["tensorboard", "wandb"], "max_steps": None, "lr": 1e-3}, "output_dir": "/root/run"}
    assert public_config(values, env) == {
        "reward.api_key_env": "OPENAI_API_KEY", "reward.base_url": "<redacted>", "train.report_to": "tensorboard, wandb",
        "train.max_steps": "none", "train.lr": 1e-3, "output_dir": "/root/run"}
    assert numbers({"step": 3, "loss": 0.5, "grad_norm": None, "ok": True, "n": 2, "x": float("nan")}) == {"loss": 0.5, "n": 2}


def test_missing_tracker_package_is_a_config_error_at_start(monkeypatch):
    import importlib.util

    from alignkit import config as config_lib

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(config_lib.ConfigError, match="report_to: mlflow needs the mlflow package"):
        config_lib.load(SFTConfig, None, {"train.report_to": ["mlflow"]})
    with pytest.raises(config_lib.ConfigError, match="report_to"):
        config_lib.load(SFTConfig, None, {"train.report_to": ["neptune"]})


# --------------------------------------------------------------------------- reward model, fingerprints


def test_lora_reward_model_trains_its_head_and_loads_as_base_plus_adapter(toy, prefs, tmp_path):
    from safetensors.torch import load_file

    from alignkit.rewards.backends import HFRewardModel
    from alignkit.stages import MergeConfig, run_merge
    from alignkit.train.rm import RMConfig, run_rm

    run_rm(RMConfig(output_dir=str(tmp_path / "rm"), seed=0, quiet=True, max_length=64,
                    model=ModelConfig(name_or_path=str(toy / "base"), lora=LoRAConfig(r=4)),
                    data=DataConfig(dataset=str(prefs), split="train_prefs", eval_split=None),
                    train=TrainConfig(max_steps=3, batch_size=4, learning_rate=1e-3, save_steps=None, precision="fp32")))
    final = tmp_path / "rm" / "final"
    saved = load_file(final / "adapter_model.safetensors")
    assert any("score" in k for k in saved) and any("lora_A" in k for k in saved)  # the head is saved in full
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    prompts, responses = ["What is 3 plus 4?", "Spell fish backwards."], ["7", "hsif"]  # scored as user turns
    rm = HFRewardModel(str(final), device="cpu")
    assert "+" in rm.identity  # the score cache key covers the adapter and its base
    assert rm.causal  # scored through the chat template, as its base was in training
    run_merge(MergeConfig(source=str(final), output_dir=str(tmp_path / "merged")))
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    from alignkit.rewards.inputs import reward_input_ids

    for p, r, s in zip(prompts, responses, rm.score([[{"role": "user", "content": p}] for p in prompts], responses)):
        ids = torch.tensor([reward_input_ids(rm.tokenizer, True, [{"role": "user", "content": p}], r, 64)])
        with torch.no_grad():
            assert merged(input_ids=ids).logits[0, 0].item() == pytest.approx(s, abs=1e-4)


def test_job_fingerprint_of_an_adapter_covers_its_base(lora_sft, toy):
    import os

    from alignkit.generation import model_fingerprint

    before = model_fingerprint(ModelConfig(name_or_path=str(lora_sft / "final")))
    assert before["base"]["path"] == str((toy / "base").resolve())
    weights = toy / "base" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the base changes
    after = model_fingerprint(ModelConfig(name_or_path=str(lora_sft / "final")))
    assert after["weights"] == before["weights"] and after["base"] != before["base"]


def test_lora_rl_reference_is_the_base_with_adapters_off(toy, monkeypatch, tmp_path):
    """RL (GRPO, beta > 0) with LoRA loads one model; the KL to the reference is 0 before the first update
    (the adapters start at B = 0) and positive after it; final/ is an adapter folder."""
    import alignkit.train.rl as rl
    from alignkit.generation import PromptSource
    from alignkit.rewards.backends import RewardConfig

    calls = []
    real = rl.load_causal_lm
    monkeypatch.setattr(rl, "load_causal_lm", lambda *a, **k: calls.append(k.get("path")) or real(*a, **k))
    write_jsonl([{"prompt": p} for p in PROMPTS], tmp_path / "prompts" / "train.jsonl")
    rl.run_rl(rl.RLConfig(
        output_dir=str(tmp_path / "rl"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(toy / "base"), lora=LORA),
        prompts=PromptSource(dataset=str(tmp_path / "prompts"), split="train"), reward=RewardConfig(kind="rule", rule="toy"),
        rl=rl.RLParams(algo="grpo", k=4, max_new_tokens=12, beta=0.1, temperature=1.0, log_samples_steps=0),
        train=TrainConfig(max_steps=2, batch_size=8, learning_rate=1e-2, scheduler="constant", save_steps=None,
                          logging_steps=1, precision="fp32")))
    assert len(calls) == 1
    kl = [m["kl"] for m in read_metrics(tmp_path / "rl") if "kl" in m]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0, kl
    assert is_adapter_dir(tmp_path / "rl" / "final")
