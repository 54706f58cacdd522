"""Online RL (train/rl.py): estimators against hand-computed values, gradients against the formulas,
and the stage in the one loop (split invariance, exact resume, reward failures, no reference at beta 0)."""

import math

import pytest
import torch

from alignkit.config import ConfigError, ModelConfig, TrainConfig
from alignkit.generation import PromptSource
from alignkit.rewards.backends import RewardConfig
from alignkit.train import rl
from alignkit.train.loop import StepFailed, read_metrics
from alignkit.train.rl import (
    RLConfig, RLParams, aggregate, grpo_advantages, k3_kl, kl_shaped_rewards, length_penalty, policy_token_losses,
    rloo_advantages, sampler_mismatch_kl, truncated_is_weights,
)

from .test_train import Interrupt

# --------------------------------------------------------------------------- pure functions


def test_rloo_advantage_is_reward_minus_mean_of_the_others():
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]]))
    assert adv[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # second group: 3 - (1+2+2)/3 = 4/3; 1 - 7/3 = -4/3; 2 - 6/3 = 0
    assert adv[1].tolist() == pytest.approx([4 / 3, -4 / 3, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3, 1))


def test_grpo_advantage_normalises_by_the_group_std_unless_told_not_to():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    std = math.sqrt((4 * 0.25) / 3)  # unbiased, as TRL
    assert grpo_advantages(r)[0].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1 + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert grpo_advantages(r, scale=False)[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert grpo_advantages(torch.tensor([[2.0, 2.0, 2.0]])).abs().max() == 0  # no signal, no NaN


def test_k3_kl_estimator_and_kl_in_the_reward():
    kl = k3_kl(torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.25])))
    assert kl.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])
    shaped = kl_shaped_rewards(torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([-5.0]), beta=0.1)
    assert shaped.item() == pytest.approx(1.0 - 0.1 * 3.0)


def test_length_penalties():
    lengths = torch.tensor([[2, 5]])
    assert length_penalty(lengths, "linear", 0.1, 3, 8)[0].tolist() == pytest.approx([0.0, 0.2])
    assert length_penalty(lengths, "quadratic", 0.1, 3, 8)[0].tolist() == pytest.approx([0.0, 0.4])
    assert length_penalty(torch.tensor([[2, 6]]), "group", 0.5, 0, 8)[0].tolist() == pytest.approx([-0.125, 0.125])  # 0.5 * (2 - 4) / 8
    assert length_penalty(lengths, "none", 1.0, 0, 8).abs().sum() == 0


def test_clipped_policy_loss():
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    rows = torch.arange(4)
    loss, clipped = policy_token_losses(logps, old, adv, rows, torch.ones(4), "grpo", epsilon=0.2)
    # A>0, ratio 1.5: min(1.5, 1.2) -> -1.2 (clipped); A<0, ratio 1.5: -min(-1.5, -1.2) = 1.5 (not);
    # A>0, ratio 0.5: -min(0.5, 0.8) = -0.5 (not); A<0, ratio 0.5: -min(-0.5, -0.8) = 0.8 (clipped)
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert clipped.tolist() == [True, False, False, True]
    loss_hi, _ = policy_token_losses(logps, old, adv, rows, torch.ones(4), "grpo", epsilon=0.2, epsilon_high=0.6)
    assert loss_hi[0].item() == pytest.approx(-1.5)  # clip-higher: 1.5 is inside [0.8, 1.6]


def test_sequence_level_ratio_is_the_geometric_mean_of_token_ratios():
    """GSPO: one ratio per sequence, exp(mean_t log ratio)."""
    logps = torch.tensor([math.log(2.0), 0.0, 0.0])
    rows = torch.tensor([0, 0, 1])
    loss, _ = policy_token_losses(logps, torch.zeros(3), torch.tensor([-1.0, -1.0]), rows, torch.tensor([2, 1]), "grpo",
                                  epsilon=10.0, importance_level="sequence")
    assert loss.tolist() == pytest.approx([math.sqrt(2), math.sqrt(2), 1.0])


def test_loss_aggregations():
    losses, rows, n = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]), torch.tensor([2, 1])
    w = torch.ones(2)
    assert [float(x) for x in aggregate(losses, rows, n, w, "token_mean", 4)] == [6.0, 3.0]
    assert [float(x) for x in aggregate(losses, rows, n, w, "sequence_mean", 4)] == [1.5 + 3.0, 2.0]
    assert [float(x) for x in aggregate(losses, rows, n, w, "sequence_sum", 4)] == [6.0, 2.0]
    assert [float(x) for x in aggregate(losses, rows, n, w, "constant", 4)] == [1.5, 2.0]
    assert [float(x) for x in aggregate(losses, rows, n, torch.tensor([0.0, 1.0]), "token_mean", 4)] == [3.0, 1.0]


def test_truncated_importance_weights_and_the_mismatch_kl():
    """#8 Algorithms (TIS, Yao et al. 2025): w = min(exp(logp_trainer - logp_sampler), C), and the
    k3 estimate of KL(sampler || trainer), against hand-computed values."""
    trainer = torch.log(torch.tensor([0.5, 0.6, 0.2, 0.3]))
    sampler = torch.log(torch.tensor([0.5, 0.2, 0.4, 0.3]))
    w, capped = truncated_is_weights(trainer, sampler, threshold=2.0)
    assert w.tolist() == pytest.approx([1.0, 2.0, 0.5, 1.0])  # ratios 1, 3 (capped at 2), 0.5, 1
    assert capped.tolist() == [False, True, False, False]
    # k3 with d = log(trainer / sampler): exp(d) - d - 1
    assert sampler_mismatch_kl(trainer, sampler).tolist() == pytest.approx([0.0, 3 - math.log(3) - 1, 0.5 - math.log(0.5) - 1, 0.0])


def test_importance_weights_scale_each_tokens_policy_term():
    """#8: the TIS weight multiplies each token's policy-gradient term (RLOO and the clipped GRPO term)."""
    logps = torch.log(torch.tensor([0.5, 0.25, 0.5]))
    rows, n = torch.tensor([0, 0, 1]), torch.tensor([2, 1])
    adv, w = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 2.0, 1.0])
    loss, _ = policy_token_losses(logps, logps.detach(), adv, rows, n, "rloo", is_weights=w)
    assert loss.tolist() == pytest.approx([-2 * 0.5 * math.log(0.5), -2 * 2.0 * math.log(0.25), 1.0 * math.log(0.5)])
    old = torch.log(torch.tensor([0.25, 0.25, 0.5]))  # GRPO ratios 2 (clipped to 1.2 for A > 0), 1, 1
    loss, clipped = policy_token_losses(logps, old, adv, rows, n, "grpo", epsilon=0.2, is_weights=w)
    assert loss.tolist() == pytest.approx([-1.2 * 2 * 0.5, -1.0 * 2 * 2.0, 1.0])
    assert clipped.tolist() == [True, False, False]


def test_sampler_correction_of_a_rollout():
    """#8: per-sample weights for the loss and token-mean metrics from the sampler's log-probs."""
    old = [[math.log(0.5), math.log(0.6)], [math.log(0.2)]]
    samples = [{"sampler_logps": [math.log(0.5), math.log(0.2)]}, {"sampler_logps": [math.log(0.4)]}]
    metrics = rl.sampler_correction(samples, old, threshold=2.0)
    assert samples[0]["is_weights"] == pytest.approx([1.0, 2.0]) and samples[1]["is_weights"] == pytest.approx([0.5])
    assert metrics["vllm_is_clipped"] == pytest.approx((1.0, 3.0))
    assert metrics["vllm_is_weight"] == pytest.approx((3.5, 3.0))
    assert metrics["vllm_mismatch_kl"] == pytest.approx((3 - math.log(3) - 1 + 0.5 - math.log(0.5) - 1, 3.0))
    with pytest.raises(RuntimeError, match="2 log-probs for 1"):
        rl.sampler_correction([{"sampler_logps": [0.0, 0.0]}], [[0.0]], None)
    plain = [{"sampler_logps": [0.0]}]
    assert set(rl.sampler_correction(plain, [[0.0]], None)) == {"vllm_mismatch_kl", "vllm_logp_diff"} and "is_weights" not in plain[0]


def test_rl_config_is_checked_up_front():
    for bad, match in [(dict(k=1), "at least 2"), (dict(k=4, temperatures=[1.0, 1.0]), "one per sample"),
                       (dict(temperatures=[0.0, 0.0]), "greedy"), (dict(algo="rloo", num_iterations=2), "GRPO options"),
                       (dict(beta=-1.0), "beta"), (dict(vllm_is_threshold=2.0), "needs rl.engine: vllm"),
                       (dict(engine="vllm", vllm_is_threshold=0.5), "expected a number >= 1"),
                       (dict(engine="vllm", max_new_tokens=64, vllm=rl.RLVLLMOptions(max_model_len=64)), "max_model_len")]:
        k = bad.pop("k", len(bad.get("temperatures", [])) or 2)
        with pytest.raises(ConfigError, match=match):
            rl.check_rl_config(RLConfig(rl=RLParams(k=k, **bad)))


def test_vllm_keys_are_validated_on_load():
    """#8: the config loader checks rl.vllm_is_threshold and rl.vllm's ranges, naming the key; --help
    documents rl.vllm's keys, those inherited from generate's VLLMOptions too."""
    from alignkit.config import leaf_fields, validate

    fields = leaf_fields(RLConfig)
    assert fields["rl.vllm.gpu_memory_utilization"][1] == 0.3 and "KV cache" in fields["rl.vllm.gpu_memory_utilization"][2]
    assert fields["rl.vllm.max_model_len"][2].startswith("Longest prompt + reply") and fields["rl.vllm.sleep"][2]

    validate(RLConfig(rl=RLParams(engine="vllm", vllm_is_threshold=2.0)))
    with pytest.raises(ConfigError, match=r"rl.vllm_is_threshold: 0.5 is not allowed; expected a number >= 1"):
        validate(RLConfig(rl=RLParams(engine="vllm", vllm_is_threshold=0.5)))
    with pytest.raises(ConfigError, match=r"rl.vllm.gpu_memory_utilization: 1.5 is not allowed"):
        validate(RLConfig(rl=RLParams(engine="vllm", vllm=rl.RLVLLMOptions(gpu_memory_utilization=1.5))))


# --------------------------------------------------------------------------- gradients against the formulas


def rollout_batch(chat, rewards_per_group, seed=0):
    """Prompts with k made-up completions each, collated as the rollout source does."""
    from alignkit.data.chat import tokenize_prompt
    from alignkit.train.rl import collate_rollout

    g = torch.Generator().manual_seed(seed)
    prompts = ["What is 2 plus 3?", "Spell cat backwards."]
    samples = []
    for p, rewards in zip(prompts, rewards_per_group):
        pid = tokenize_prompt(chat.tokenizer, [{"role": "user", "content": p}])
        for _ in rewards:
            n = int(torch.randint(2, 6, (1,), generator=g))
            samples.append({"prompt_ids": pid, "completion_ids": torch.randint(3, 200, (n,), generator=g).tolist(), "weight": 1.0})
    return samples, collate_rollout


def test_rloo_gradient_equals_the_leave_one_out_reinforce_formula(toy_chat, tiny_model_dir):
    from alignkit.models import load_causal_lm
    from alignkit.train.dpo import sequence_logps

    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)), toy_chat)
    rewards = [[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]]
    samples, collate = rollout_batch(toy_chat, rewards)
    adv = rloo_advantages(torch.tensor(rewards)).flatten()
    for s, a in zip(samples, adv.tolist()):
        s["advantage"] = a
    batch = collate(samples, toy_chat.pad_id)
    out = rl.rl_loss_fn(RLParams(algo="rloo", beta=0.0))(model, batch)
    (out.loss_sum / out.count).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # By hand: (1/N) sum_i -(r_i - mean_{j != i} r_j) * log pi(y_i), on full logits.
    k = 3
    manual_adv = [r[i] - sum(r[j] for j in range(k) if j != i) / (k - 1) for r in rewards for i in range(k)]
    seq, _ = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    (-(torch.tensor(manual_adv) * seq).sum() / len(manual_adv)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


def test_the_loss_reads_the_rollouts_importance_weights(toy_chat, tiny_model_dir):
    """#8: a rollout's `is_weights` reach the loss through the collated batch (all 2: twice the loss)."""
    from alignkit.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)), toy_chat)
    samples, collate = rollout_batch(toy_chat, [[1.0, 0.0], [0.0, 2.0]])
    for s, a in zip(samples, [1.0, -1.0, -2.0, 2.0]):
        s["advantage"] = a
    loss_fn = rl.rl_loss_fn(RLParams(algo="rloo", beta=0.0))
    plain = loss_fn(model, collate(samples, toy_chat.pad_id)).loss_sum.item()
    weighted = loss_fn(model, collate([s | {"is_weights": [2.0] * len(s["completion_ids"])} for s in samples], toy_chat.pad_id))
    assert plain != 0 and weighted.loss_sum.item() == pytest.approx(2 * plain)


def test_grpo_at_ratio_one_is_token_mean_reinforce_plus_the_k3_gradient(toy_chat, tiny_model_dir):
    from alignkit.models import load_causal_lm
    from alignkit.train.logprobs import label_logps

    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)), toy_chat)
    samples, collate = rollout_batch(toy_chat, [[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]], seed=1)
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]])).flatten()
    with torch.no_grad():
        b0 = collate([s | {"advantage": 0.0} for s in samples], toy_chat.pad_id)
        old, mask = label_logps(model, b0["input_ids"], b0["attention_mask"], b0["labels"])
    counts = mask.sum(-1).tolist()
    ref = [(x - 0.1).tolist() for x in old.split(counts)]  # a reference a little less likely
    for s, a, o, r in zip(samples, adv.tolist(), old.split(counts), ref):
        s.update(advantage=a, old_logps=o.tolist(), ref_logps=r)
    batch = collate(samples, toy_chat.pad_id)
    beta = 0.3
    out = rl.rl_loss_fn(RLParams(algo="grpo", beta=beta, loss_agg="token_mean"))(model, batch)
    (out.loss_sum / out.count).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logps, mask = label_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    rows = mask.nonzero()[:, 0]
    ref_flat = batch["ref_logps"]
    by_hand = -(adv[rows] * logps) + beta * (torch.exp(ref_flat - logps) - (ref_flat - logps) - 1)
    (by_hand.sum() / len(logps)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the stage in the loop


def rl_cfg(out, model_dir, data_dir, **kw) -> RLConfig:
    rlp = dict(algo="rloo", k=4, max_new_tokens=8, beta=0.0, log_samples_steps=1)
    rlp.update(kw.pop("rl", {}))
    train = dict(max_steps=4, batch_size=4, grad_accum=1, learning_rate=1e-3, scheduler="constant", save_steps=None,
                 logging_steps=1, precision="fp32", metric_for_best="eval_reward", greater_is_better=True)
    train.update(kw.pop("train", {}))
    return RLConfig(output_dir=str(out), seed=0, quiet=True, model=ModelConfig(name_or_path=str(model_dir)),
                    prompts=PromptSource(dataset=str(data_dir), split="train"), reward=RewardConfig(kind="rule", rule="toy"),
                    rl=RLParams(**rlp), train=TrainConfig(**train), **kw)


def test_rl_loss_ignores_how_a_step_is_split(tmp_path, trained_toy_model, toy_data_dir):
    """4 prompts x 4 samples per step as 1x4, 2x2 and 4x1 micro-batches: the same losses."""
    runs = {}
    for bs, accum in [(4, 1), (2, 2), (1, 4)]:
        out = tmp_path / f"b{bs}"
        rl.run_rl(rl_cfg(out, trained_toy_model, toy_data_dir, rl=dict(algo="grpo", beta=0.1), train=dict(max_steps=2, batch_size=bs, grad_accum=accum)))
        runs[bs] = read_metrics(out)
    for bs in (2, 1):
        for a, b in zip(runs[4], runs[bs]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
            assert b["reward"] == a["reward"] and b["completion_length"] == a["completion_length"]
    assert (tmp_path / "b4" / "samples.jsonl").is_file()


def test_rl_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, trained_toy_model, toy_data_dir):
    """GRPO with 2 optimizer steps per batch of samples: the checkpoint between the two keeps the batch."""
    kw = dict(rl=dict(algo="grpo", num_iterations=2, beta=0.1, temperature=1.0), train=dict(max_steps=6, save_steps=3))
    rl.run_rl(rl_cfg(tmp_path / "straight", trained_toy_model, toy_data_dir, **kw))
    cfg = rl_cfg(tmp_path / "broken", trained_toy_model, toy_data_dir, **kw)
    with pytest.raises(KeyboardInterrupt):
        rl.run_rl(cfg, callbacks=[Interrupt(at=5)])
    assert (tmp_path / "broken" / "checkpoints" / "step-3" / "source_state_0.json").is_file()
    cfg.resume = True
    rl.run_rl(cfg)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in b] == list(range(1, 7))
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("straight", "broken")]
    assert samples[0] == samples[1]  # lines logged after the checkpoint are not repeated
    for x, y in zip(a, b):
        for key in ("loss", "reward", "completion_length", "kl", "clip_fraction"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_a_reward_backend_that_fails_stops_with_a_checkpoint_and_resumes(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    from alignkit.rewards.backends import RuleReward

    class Flaky(RuleReward):
        def __init__(self, fail_at):
            super().__init__("toy")
            self.calls, self.fail_at = 0, fail_at

        def score(self, prompts, responses, columns=None):
            self.calls += 1
            if self.fail_at and self.calls >= self.fail_at:
                raise RuntimeError("HTTP 503 after 5 retries")
            return super().score(prompts, responses, columns)

    monkeypatch.setattr(rl, "build_backend", lambda cfg, cache: Flaky(fail_at=3))
    cfg = rl_cfg(tmp_path / "run", trained_toy_model, toy_data_dir)
    with pytest.raises(StepFailed, match=r"step 3 could not be prepared: the reward backend failed.*503.*step-2.*--resume"):
        rl.run_rl(cfg)
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
    monkeypatch.setattr(rl, "build_backend", lambda cfg, cache: Flaky(fail_at=0))
    cfg.resume = True
    rl.run_rl(cfg)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_non_finite_rewards_stop_before_the_update(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    from alignkit.train.loop import TrainingDiverged

    class NaNReward:
        identity = "nan"

        def score(self, prompts, responses, columns=None):
            return [float("nan")] * len(responses)

    monkeypatch.setattr(rl, "build_backend", lambda cfg, cache: NaNReward())
    with pytest.raises(TrainingDiverged, match="non-finite reward"):
        rl.run_rl(rl_cfg(tmp_path / "run", trained_toy_model, toy_data_dir))
    assert not (tmp_path / "run" / "final").exists()


def test_beta_zero_loads_no_reference_model(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    loads = []
    real = rl.load_causal_lm
    monkeypatch.setattr(rl, "load_causal_lm", lambda *a, **k: loads.append(1) or real(*a, **k))
    rl.run_rl(rl_cfg(tmp_path / "b0", trained_toy_model, toy_data_dir, train=dict(max_steps=1)))
    assert len(loads) == 1
    rl.run_rl(rl_cfg(tmp_path / "b1", trained_toy_model, toy_data_dir, rl=dict(beta=0.1), train=dict(max_steps=1)))
    assert len(loads) == 3
    assert "kl" in read_metrics(tmp_path / "b1")[0] and "kl" not in read_metrics(tmp_path / "b0")[0]


class RecordingLLM:
    """What ColocatedVLLM calls on a vLLM `LLM`, recorded (vLLM itself is tested in test_vllm.py)."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(method)
        assert len(list(kwargs["weights_iterator"])) > 0

    def apply_model(self, fn):
        self.calls.append("apply_model")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")


def test_rl_engine_vllm_wiring_without_vllm(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    """#8 Generation during RL: with rl.engine vllm, each rollout wakes the engine, pushes the weights
    only when an update changed them, samples, and sleeps; the sampler's log-probs give the TIS weights
    and the logged mismatch. The policy stands in for vLLM's sampling here (CI has no vLLM)."""
    from contextlib import contextmanager

    from alignkit.generation import ColocatedVLLM, generate

    llm = RecordingLLM()

    class PolicySamples(ColocatedVLLM):
        def sync(self, model, version):
            self.model = model
            return super().sync(model, version)

        def generate(self, chat, prompts, params, salts=None, temperatures=None):
            self.llm.calls.append("generate")
            outs = generate(self.model, chat, prompts, params, salts=salts, temperatures=temperatures)
            for c in (c for cs in outs for c in cs):  # a sampler that finds every token a little likelier
                c.logprobs = [-0.01] * (len(c.token_ids) + (c.stop_id is not None))
            return outs

    monkeypatch.setattr(rl, "colocated_engine", contextmanager(lambda cfg, chat, state: (yield PolicySamples(llm, sleep=True))))
    cfg = rl_cfg(tmp_path / "run", trained_toy_model, toy_data_dir, train=dict(max_steps=3),
                 rl=dict(algo="grpo", engine="vllm", vllm_is_threshold=1.0, length_penalty=rl.LengthPenalty("linear", 0.1)))
    rl.run_rl(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["vllm_weight_pushes"] for r in rows] == [0, 1, 2]
    push = ["wake_up", "reload_weights", "apply_model", "reset_prefix_cache", "generate", "sleep1"]
    assert llm.calls == ["generate", "sleep1"] + push + push
    for r in rows:  # trainer log-probs <= -0.01 mostly: weights below 1, few capped at C = 1
        assert r["vllm_mismatch_kl"] > 0 and r["vllm_logp_diff"] < 0 and 0 < r["vllm_is_weight"] < 1 and 0 <= r["vllm_is_clipped"] < 0.5


def test_rl_engine_vllm_one_engine_per_process(toy_chat, monkeypatch):
    """#23: under accelerate launch/torchrun each process gets its own colocated engine (vLLM's
    external_launcher backend); tensor parallelism across processes and RL under FSDP are refused."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    started = []

    @contextmanager
    def fake_engine(model, precision, options, seed, **kwargs):
        started.append(kwargs)
        yield "llm"

    monkeypatch.setattr(rl, "vllm_engine", fake_engine)
    cfg = RLConfig(rl=RLParams(engine="vllm"))
    for n in (1, 2):
        with rl.colocated_engine(cfg, toy_chat, SimpleNamespace(num_processes=n)) as engine:
            assert engine.llm == "llm"
    assert [k["external_launcher"] for k in started] == [False, True] and all(k["in_process"] for k in started)
    cfg.rl.vllm.tensor_parallel_size = 2
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        with rl.colocated_engine(cfg, toy_chat, SimpleNamespace(num_processes=2)):
            pass
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP"):
        with rl.colocated_engine(RLConfig(), toy_chat, SimpleNamespace(num_processes=2)):
            pass
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with rl.colocated_engine(RLConfig(), toy_chat, SimpleNamespace(num_processes=2)) as engine:
        assert engine is None


def test_per_sample_temperatures(toy_chat, trained_toy_model, toy_data_dir):
    """Sample index 0 at temperature 0 is the greedy reply; the others are sampled."""
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import load_causal_lm

    cfg = rl_cfg("/unused", trained_toy_model, toy_data_dir, rl=dict(k=3, temperatures=[0.0, 1.5, 1.5]))
    model = load_causal_lm(cfg.model, toy_chat)
    prompts = [{"id": i, "messages": [{"role": "user", "content": f"What is {i} plus 2?"}]} for i in range(4)]
    src = rl.RolloutSource(cfg, toy_chat, prompts, None, None, 1, 0, None, False)
    outs = src.sample(model, [p["messages"] for p in prompts], 0)
    greedy = generate(model, toy_chat, [p["messages"] for p in prompts], SamplingParams(max_new_tokens=8))
    assert [o[0].token_ids for o in outs] == [g[0].token_ids for g in greedy]
    assert all(len(o) == 3 and all(c is not None for c in o) for o in outs)
    again = src.sample(model, [p["messages"] for p in prompts], 0)
    assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in outs]  # seeded by (seed, step)


# --------------------------------------------------------------------------- agreement with TRL


@pytest.mark.parametrize("trl_loss, ours, level", [("grpo", "sequence_mean", "token"), ("bnpo", "token_mean", "token"),
                                                   ("dr_grpo", "constant", "token"), ("grpo", "sequence_mean", "sequence")])
def test_grpo_loss_agrees_with_trl(trl_loss, ours, level):
    """The clipped surrogate, clip-higher, the k3 KL term, GSPO's sequence ratio and the aggregations equal
    TRL's GRPOTrainer._compute_loss on the same per-token log-probs (value and gradient)."""
    from collections import defaultdict
    from types import SimpleNamespace

    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is a dev dependency")
    g = torch.Generator().manual_seed(0)
    B, T, max_len = 6, 5, 7
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([5, 3, 1, 4, 5, 2]):
        mask[i, n:] = 0
    lp0 = -torch.rand(B, T, generator=g) * 3
    old = lp0 + 0.3 * torch.randn(B, T, generator=g)  # ratios far enough from 1 to clip
    ref = lp0 + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    beta, eps, eps_high = 0.04, 0.2, 0.28

    lp_trl = lp0.clone().requires_grad_(True)
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=trl_loss, epsilon_low=eps, epsilon_high=eps_high,
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x),
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp_trl, torch.zeros(B, T), None),
    )
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    theirs.backward()

    lp = lp0.clone().requires_grad_(True)
    m = mask.bool()
    rows, n_tokens = m.nonzero()[:, 0], m.sum(-1)
    token_losses, _ = policy_token_losses(lp[m], old[m], adv, rows, n_tokens, "grpo", eps, eps_high, level)
    token_losses = token_losses + beta * k3_kl(lp[m], ref[m])
    total, count = aggregate(token_losses, rows, n_tokens, torch.ones(B), ours, max_len)
    mine = total / count
    mine.backward()
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.testing.assert_close(lp.grad, lp_trl.grad * mask, rtol=1e-5, atol=1e-7)


def test_seeded_sampler_draws_from_the_softmax_and_respects_top_k():
    """Gumbel-max with one generator per row samples exactly softmax(scores): checked by frequency."""
    from alignkit.generation import SamplingParams, sampling_processors

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 4000
    procs = sampling_processors(SamplingParams(temperature=1.0), list(range(n)), torch.device("cpu"))
    picks = procs(None, logits.expand(n, 4).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.025, rtol=0)  # 4 sigma at n=4000
    top2 = sampling_processors(SamplingParams(temperature=1.0, top_k=2), list(range(500)), torch.device("cpu"))
    assert set(top2(None, logits.expand(500, 4).clone()).argmax(-1).tolist()) == {0, 1}
    hot = sampling_processors(SamplingParams(temperature=0.25), list(range(n)), torch.device("cpu"))
    freq_hot = torch.bincount(hot(None, logits.expand(n, 4).clone()).argmax(-1), minlength=4).float() / n
    torch.testing.assert_close(freq_hot, (logits / 0.25).softmax(-1)[0], atol=0.025, rtol=0)


def test_batched_seeded_samples_do_not_depend_on_the_batch(toy_chat, trained_toy_model):
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(trained_toy_model)), toy_chat)
    prompts = [[{"role": "user", "content": f"Spell {w} backwards."}] for w in ("cat", "moon", "bird", "king", "rose")]
    params = SamplingParams(max_new_tokens=10, temperature=1.5, n=3, seed=7)
    together = generate(model, toy_chat, prompts, params, batch_size=15)
    alone = [generate(model, toy_chat, [p], params, batch_size=3)[0] for p in prompts]
    assert [[c.token_ids for c in cs] for cs in together] == [[c.token_ids for c in cs] for cs in alone]
    assert len({tuple(c.token_ids) for cs in together for c in cs}) > 5  # they are samples, not copies
