"""Issue 19's defects in RL's learning signal, each with a test that failed before its fix
(dropout, normalisers, seeds of repeated prompts, padding of truncated samples, tied groups,
temperature of the log-probs, metrics, GSPO's aggregation, stop ids across engines)."""

import json
import math
import re
import shutil

import pytest
import torch

from alignkit.generation import PromptSource
from alignkit.train import rl
from alignkit.train.loop import read_metrics

from .test_rl import rl_cfg


def model_with(src, dst, **config):
    """A copy of a checkpoint with some config.json values changed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --------------------------------------------------------------------------- 19.1 dropout


def test_dropout_is_off_so_the_first_ratio_of_a_batch_is_one(tmp_path, trained_toy_model, toy_data_dir):
    """With attention_dropout 0.1 the first optimizer step on a batch of samples (no update yet since
    sampling) has ratio 1: no clipping. rl.disable_dropout false keeps dropout (and the clipping)."""
    model = model_with(trained_toy_model, tmp_path / "dropout", attention_dropout=0.5)
    signal = rl.LengthPenalty("linear", 0.1)  # the toy reward may tie; lengths differ
    kw = dict(rl=dict(algo="grpo", num_iterations=2, epsilon=0.02, length_penalty=signal), train=dict(max_steps=1))
    rl.run_rl(rl_cfg(tmp_path / "off", model, toy_data_dir, **kw))
    assert read_metrics(tmp_path / "off")[0]["clip_fraction"] == 0
    kw["rl"]["disable_dropout"] = False
    rl.run_rl(rl_cfg(tmp_path / "on", model, toy_data_dir, **kw))
    assert read_metrics(tmp_path / "on")[0]["clip_fraction"] > 0.05


# --------------------------------------------------------------------------- 19.2 normalisers with masked sequences


def trl_grpo_loss(loss_type, level, lp, old, ref, adv, mask, max_len, beta=0.04, eps=0.2, eps_high=0.28):
    """TRL's GRPOTrainer._compute_loss on given per-token log-probs (a stand-in trainer object)."""
    from collections import defaultdict
    from types import SimpleNamespace

    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is a dev dependency")
    B, T = lp.shape
    fake = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x),
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros(B, T), None),
    )
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("trl_loss, ours", [("grpo", "sequence_mean"), ("dr_grpo", "constant"), ("bnpo", "token_mean")])
def test_masked_truncated_sequences_still_count_in_the_normaliser_as_in_trl(trl_loss, ours):
    """3 of 6 sequences masked (mask_truncated): TRL zeroes their completion mask and keeps dividing by all
    6 sequences (x max_completion_length for dr_grpo); so do we (before: a ratio of 2.000)."""
    g = torch.Generator().manual_seed(1)
    B, T, max_len = 6, 5, 7
    lengths = [5, 3, 1, 4, 5, 2]
    truncated = torch.tensor([1.0, 0, 1, 0, 1, 0])
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    lp0 = -torch.rand(B, T, generator=g) * 3
    old = lp0 + 0.3 * torch.randn(B, T, generator=g)
    ref = lp0 + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    trl_mask = mask * (1 - truncated.long()).unsqueeze(1)
    theirs = trl_grpo_loss(trl_loss, "token", lp0, old, ref, adv, trl_mask, max_len)

    m = mask.bool()
    rows, n_tokens = m.nonzero()[:, 0], m.sum(-1)
    token_losses, _ = rl.policy_token_losses(lp0[m], old[m], adv, rows, n_tokens, "grpo", 0.2, 0.28)
    token_losses = token_losses + 0.04 * rl.k3_kl(lp0[m], ref[m])
    total, count = rl.aggregate(token_losses, rows, n_tokens, 1 - truncated, ours, max_len)
    assert (total / count).item() == pytest.approx(theirs.item(), rel=1e-5)


# --------------------------------------------------------------------------- 19.3 a prompt twice in one step


def rollout_source(cfg, chat, prompts, ref_model=None, engine=None, backend=None):
    from alignkit.rewards.backends import build_backend

    return rl.RolloutSource(cfg, chat, prompts, backend or build_backend(cfg.reward, None), ref_model, 1, 0, None,
                            False, engine)


def test_two_copies_of_a_prompt_in_one_step_get_different_samples(toy_chat, trained_toy_model, toy_data_dir):
    from alignkit.models import load_causal_lm

    cfg = rl_cfg("/unused", trained_toy_model, toy_data_dir, rl=dict(k=3, temperature=1.5, max_new_tokens=12))
    model = load_causal_lm(cfg.model, toy_chat)
    same = [{"role": "user", "content": "Spell moon backwards."}]
    prompts = [{"id": i, "messages": m} for i, m in enumerate([same, same, [{"role": "user", "content": "What is 1 plus 2?"}],
                                                                 [{"role": "user", "content": "Spell cat backwards."}]])]
    buffer = rollout_source(cfg, toy_chat, prompts).rollout(0, model)
    by_prompt = {}
    for s in (s for mb in buffer["micro"] for s in mb):
        by_prompt.setdefault(s["prompt"], []).append(s["completion_ids"])
    assert by_prompt[0] != by_prompt[1]


# --------------------------------------------------------------------------- 19.4 pad tokens inside a truncated sample


def test_a_truncated_completion_keeps_its_tokens_equal_to_pad(toy_chat, tiny_model_dir):
    """Qwen-Instruct style: the end of turn stops, the pad token does not. A completion that ran to
    max_new_tokens keeps every sampled token, those equal to pad_id too; a stopped one is cut at its stop."""
    import copy

    from alignkit.generation import SamplingParams, generate
    from alignkit.models import ChatTokenizer, load_causal_lm

    tok = copy.deepcopy(toy_chat.tokenizer)
    tok.eos_token = toy_chat.end_of_turn
    chat = ChatTokenizer(tok, toy_chat.end_of_turn, [])
    pad, stop = chat.pad_id, chat.stop_ids()
    assert pad not in stop
    model = load_causal_lm(rl_cfg("/unused", tiny_model_dir, "/unused").model, chat)
    for tail, want, reason in [([5, pad, 7, pad], [5, pad, 7, pad], "length"), ([5, stop[0], pad, pad], [5], "stop")]:
        model.generate = lambda input_ids, tail=tail, **kw: torch.cat([input_ids, torch.tensor([tail])], 1)
        out = generate(model, chat, [[{"role": "user", "content": "Spell cat backwards."}]], SamplingParams(max_new_tokens=4))
        assert out[0][0].token_ids == want and out[0][0].finish_reason == reason


# --------------------------------------------------------------------------- 19.5 tied groups


def test_groups_all_equal_counts_ties_of_the_shaped_total(toy_chat, trained_toy_model, toy_data_dir):
    """A length penalty breaks the ties of a reward that is 0 everywhere: groups_all_equal is the share
    of groups whose advantages are all 0 (before: 1.0 while advantage_abs > 0)."""
    from alignkit.models import load_causal_lm

    cfg = rl_cfg("/unused", trained_toy_model, toy_data_dir, rl=dict(k=4, temperature=1.5, max_new_tokens=8,
                                                                     length_penalty=rl.LengthPenalty("linear", 0.1)))
    model = load_causal_lm(cfg.model, toy_chat)
    prompts = [{"id": i, "messages": [{"role": "user", "content": f"Spell {w} backwards."}]}
               for i, w in enumerate(["cat", "moon", "bird", "king"])]
    buffer = rollout_source(cfg, toy_chat, prompts).rollout(0, model)
    adv = torch.tensor([s["advantage"] for mb in buffer["micro"] for s in mb]).view(4, 4)
    tied = float((adv.abs().max(-1).values < 1e-9).sum())
    got, n = buffer["metrics"]["groups_all_equal"]
    assert n == 4 and got == tied and tied < 4


# --------------------------------------------------------------------------- 19.6 log-probs at the sampling temperature


def hand_logps(model, prompt_ids, completion_ids, t):
    """log softmax(logits / t) of the completion's tokens, on full logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float() / t
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1)


def test_label_logps_divide_each_rows_logits_by_its_temperature(toy_chat, tiny_model_dir):
    from alignkit.models import load_causal_lm
    from alignkit.train.logprobs import label_logps, label_logps_entropy

    from .test_rl import rollout_batch

    model = load_causal_lm(rl_cfg("/unused", tiny_model_dir, "/unused").model, toy_chat)
    samples, collate = rollout_batch(toy_chat, [[1.0, 0.0], [0.0, 2.0]])
    temps = [0.2, 1.0, 0.7, 2.5]
    batch = collate([s | {"advantage": 0.0, "temperature": t} for s, t in zip(samples, temps)], toy_chat.pad_id)
    logps, mask = label_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["temperatures"])
    want = torch.cat([hand_logps(model, s["prompt_ids"], s["completion_ids"], t) for s, t in zip(samples, temps)])
    torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-6)
    logps.sum().backward()  # the gradient flows through the scaled logits too
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = sum(hand_logps(model, s["prompt_ids"], s["completion_ids"], t).sum() for s, t in zip(samples, temps))
    want.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        _, ent, _ = label_logps_entropy(model, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["temperatures"])
        s, t = samples[0], temps[0]
        ids = torch.tensor([s["prompt_ids"] + s["completion_ids"]])
        lp = (model(input_ids=ids).logits[0, len(s["prompt_ids"]) - 1 : -1] / t).log_softmax(-1)
        torch.testing.assert_close(ent[: len(s["completion_ids"])], -(lp.exp() * lp).sum(-1), rtol=1e-5, atol=1e-6)


def test_rollout_log_probs_and_kl_are_at_each_samples_temperature(toy_chat, trained_toy_model, tiny_model_dir, toy_data_dir):
    """Old and reference log-probs of each sample at its own temperature (mixed rl.temperatures); the
    logged kl is the mean over samples of sum_t log pi_T - log pi_ref_T."""
    from alignkit.models import load_causal_lm

    cfg = rl_cfg("/unused", trained_toy_model, toy_data_dir,
                 rl=dict(algo="grpo", k=4, temperatures=[0.3, 0.3, 1.0, 2.0], beta=0.1, num_iterations=2, max_new_tokens=6))
    model = load_causal_lm(cfg.model, toy_chat)
    ref = load_causal_lm(rl_cfg("/unused", tiny_model_dir, "/unused").model, toy_chat).eval()
    prompts = [{"id": i, "messages": [{"role": "user", "content": f"Spell {w} backwards."}]}
               for i, w in enumerate(["cat", "moon", "bird", "king"])]
    buffer = rollout_source(cfg, toy_chat, prompts, ref_model=ref).rollout(0, model)
    samples = [s for mb in buffer["micro"] for s in mb]
    kl = 0.0
    with torch.no_grad():
        for s in samples:
            t = [0.3, 0.3, 1.0, 2.0][s["index"]]
            old = hand_logps(model, s["prompt_ids"], s["completion_ids"], t)
            r = hand_logps(ref, s["prompt_ids"], s["completion_ids"], t)
            assert s["old_logps"] == pytest.approx(old.tolist(), abs=1e-5)
            assert s["ref_logps"] == pytest.approx(r.tolist(), abs=1e-5)
            kl += float((old - r).sum())
    got, n = buffer["metrics"]["kl"]
    assert got / n == pytest.approx(kl / len(samples), rel=1e-4)


# --------------------------------------------------------------------------- 19.7 metrics


class IndexReward:
    """Reward = the sample's index within its group (0, 1, 2, 3, 0, 1, ...)."""

    identity = "index"

    def __init__(self, k):
        self.k = k

    def score(self, prompts, responses, columns=None):
        return [float(i % self.k) for i in range(len(responses))]


def test_reward_std_entropy_per_token_and_timings_once_per_batch(tmp_path, toy_chat, trained_toy_model, toy_data_dir):
    from alignkit.models import load_causal_lm

    cfg = rl_cfg("/unused", trained_toy_model, toy_data_dir,
                 rl=dict(algo="grpo", num_iterations=2, k=4, temperatures=[0.5, 0.5, 1.5, 1.5], max_new_tokens=6))
    model = load_causal_lm(cfg.model, toy_chat)
    prompts = [{"id": i, "messages": [{"role": "user", "content": f"Spell {w} backwards."}]}
               for i, w in enumerate(["cat", "moon", "bird", "king"])]
    buffer = rollout_source(cfg, toy_chat, prompts, backend=IndexReward(4)).rollout(0, model)
    got, n = buffer["metrics"]["reward_std"]
    assert got / n == pytest.approx(math.sqrt(5 / 3))  # std of 0, 1, 2, 3 with ddof 1
    ent, tokens = 0.0, 0
    with torch.no_grad():
        for s in (s for mb in buffer["micro"] for s in mb):
            ids = torch.tensor([s["prompt_ids"] + s["completion_ids"]])
            t = [0.5, 0.5, 1.5, 1.5][s["index"]]
            lp = (model(input_ids=ids).logits[0, len(s["prompt_ids"]) - 1 : -1] / t).log_softmax(-1)
            ent += float(-(lp.exp() * lp).sum())
            tokens += len(s["completion_ids"])
    got, n = buffer["metrics"]["entropy"]
    assert n == tokens and got / n == pytest.approx(ent / tokens, rel=1e-4)

    rl.run_rl(rl_cfg(tmp_path / "run", trained_toy_model, toy_data_dir, rl=dict(algo="grpo", num_iterations=2),
                     train=dict(max_steps=4)))
    rows = read_metrics(tmp_path / "run")
    for name in rl.ROLLOUT_TIMINGS:
        assert [name in r for r in rows] == [True, False, True, False], name


# --------------------------------------------------------------------------- 19.8 GSPO's aggregation


def test_gspo_auto_aggregation_is_the_papers_per_sequence_mean():
    assert rl.RLParams(algo="grpo", importance_level="sequence").agg() == "sequence_mean"
    assert rl.RLParams(algo="grpo").agg() == "token_mean" and rl.RLParams(algo="rloo").agg() == "sequence_sum"
    assert rl.RLParams(algo="grpo", importance_level="sequence", loss_agg="token_mean").agg() == "token_mean"


# --------------------------------------------------------------------------- 19.9 which ids stop a completion


def odd_checkpoint(src, dst, chat, model, prompt):
    """A copy of a checkpoint whose generation_config lists an extra EOS: a token its greedy reply writes."""
    from alignkit.generation import SamplingParams, generate

    plain = generate(model, chat, [prompt], SamplingParams(max_new_tokens=12))[0][0]
    extra = next(t for t in plain.token_ids[1:] if t not in chat.stop_ids())
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [chat.stop_ids()[0], extra]}))
    return dst, plain, extra


def test_the_transformers_engine_stops_on_the_chats_stop_ids_only(tmp_path, toy_chat, trained_toy_model):
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import load_causal_lm

    prompt = [{"role": "user", "content": "Spell moon backwards."}]
    model = load_causal_lm(rl_cfg("/unused", trained_toy_model, "/unused").model, toy_chat)
    odd, plain, extra = odd_checkpoint(trained_toy_model, tmp_path / "odd", toy_chat, model, prompt)
    odd_model = load_causal_lm(rl_cfg("/unused", odd, "/unused").model, toy_chat)
    assert extra in odd_model.generation_config.eos_token_id
    got = generate(odd_model, toy_chat, [prompt], SamplingParams(max_new_tokens=12))[0][0]
    assert (got.token_ids, got.finish_reason, got.stop_id) == (plain.token_ids, plain.finish_reason, plain.stop_id)


class FakeVLLM:
    """vLLM's stopping rule (vllm/v1/core/sched/utils.py check_stop, sampling_params.update_from_generation_config)
    on a scripted token stream, for CI (which has no vLLM; tests/test_vllm.py runs the real one)."""

    def __init__(self, stream, generation_eos, tokenizer_eos):
        self.stream, self.generation_eos, self.tokenizer_eos = stream, set(generation_eos), tokenizer_eos
        self.requests = []

    def generate(self, prompts, requests, use_tqdm=False):
        from types import SimpleNamespace

        outs = []
        for r in requests:
            self.requests.append(r)
            eos = None if r.ignore_eos else self.tokenizer_eos
            stop_ids = set(r.stop_token_ids or ()) | (set() if r.ignore_eos else self.generation_eos - {eos})
            ids, reason = [], "length"
            for t in self.stream[: r.max_tokens]:
                ids.append(t)
                if t == eos or t in stop_ids:
                    reason = "stop"
                    break
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=ids, finish_reason=reason, logprobs=None)]))
        return outs


def test_vllm_requests_stop_on_the_chats_stop_ids_only(toy_chat, monkeypatch):
    """vLLM adds the checkpoint's generation_config EOS ids to a request's stop ids unless ignore_eos; a
    completion that stopped there came back 'stop' with stop_id None (truncated, to RL). Now requests
    stop on the chat's stop ids alone, as the transformers engine."""
    import sys
    from types import SimpleNamespace

    from alignkit.generation import SamplingParams, generate_vllm

    class Params(SimpleNamespace):
        def __init__(self, **kw):
            super().__init__(**{"ignore_eos": False, **kw})

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=Params))
    stop = toy_chat.stop_ids()
    extra = 40
    llm = FakeVLLM([30, extra, 31, stop[0], 32], generation_eos=[stop[0], extra], tokenizer_eos=toy_chat.tokenizer.eos_token_id)
    out = generate_vllm(llm, toy_chat, [[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=8))[0][0]
    assert llm.requests[0].ignore_eos and set(llm.requests[0].stop_token_ids) == set(stop)
    assert (out.token_ids, out.finish_reason, out.stop_id) == ([30, extra, 31], "stop", stop[0])


# --------------------------------------------------------------------------- work done that need not be


@pytest.mark.parametrize("algo, beta", [("grpo", 0.1), ("rloo", 0.0)])
def test_the_skipped_policy_pass_changes_nothing_but_the_work(tmp_path, trained_toy_model, toy_data_dir, monkeypatch, algo, beta):
    """GRPO with one iteration and RLOO at beta 0 need no no-grad policy pass: the same losses, entropy
    and kl (from the loss pass) as with it, and the policy's no-grad pass never runs."""
    passes = []
    real = rl.sample_logps
    monkeypatch.setattr(rl, "sample_logps", lambda model, *a, **k: passes.append(model.training) or real(model, *a, **k))
    runs = {}
    for always in (True, False):
        monkeypatch.setattr(rl, "ALWAYS_OLD_PASS", always)
        passes.clear()
        out = tmp_path / f"always{always}"
        rl.run_rl(rl_cfg(out, trained_toy_model, toy_data_dir, rl=dict(algo=algo, beta=beta, temperatures=[0.5, 1.0, 1.0, 1.5]),
                         train=dict(max_steps=2)))
        runs[always] = (read_metrics(out), len(passes))
    (before, n_before), (after, n_after) = runs[True], runs[False]
    assert n_before == 2 * (1 + (beta > 0)) and n_after == 2 * (beta > 0)  # the reference's pass stays
    for a, b in zip(before, after):
        for key in ("loss", "entropy", "reward", "grad_norm") + (("kl",) if beta else ()):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_one_decoding_call_with_a_temperature_per_row(toy_chat, trained_toy_model, toy_data_dir, monkeypatch):
    """rl.temperatures [0, 0.5, 1.5, 1.5]: one generate() call; sample j is what a call with every sample
    at temperature T_j draws for sample j (same seed), and sample 0 is the greedy reply."""
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import load_causal_lm

    temps = [0.0, 0.5, 1.5, 1.5]
    cfg = rl_cfg("/unused", trained_toy_model, toy_data_dir, rl=dict(k=4, temperatures=temps, max_new_tokens=10))
    model = load_causal_lm(cfg.model, toy_chat)
    messages = [[{"role": "user", "content": f"Spell {w} backwards."}] for w in ("cat", "moon", "bird", "king")]
    calls = []
    monkeypatch.setattr(rl, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    src = rl.RolloutSource(cfg, toy_chat, [{"messages": m} for m in messages], None, None, 1, 0, None, False)
    outs = src.sample(model, messages, 0, salts=[0, 1, 2, 3])
    assert len(calls) == 1
    for j, t in enumerate(temps):
        params = SamplingParams(max_new_tokens=10, temperature=t, n=4 if t > 0 else 1, seed=rl.sampling_seed(0, 0, 0))
        alone = generate(model, toy_chat, messages, params, salts=[0, 1, 2, 3])
        assert [o[j].token_ids for o in outs] == [a[j if t > 0 else 0].token_ids for a in alone], t


# --------------------------------------------------------------------------- guard-rails


def test_nearly_all_truncated_or_tied_warns_loudly_and_can_stop(tmp_path, trained_toy_model, toy_data_dir, caplog):
    """max_new_tokens 2: nearly every completion is cut; the toy reward is 0 on all of them: every group ties.
    After rl.stall_rollouts rollouts in a row, a warning naming the fix; with stop_on_stall, a stop
    that keeps the last completed step."""
    import logging

    from alignkit.train.loop import StepFailed

    from alignkit.demo.world import write_chat_data

    # Prompts whose answers are two to five words: all longer than 2 tokens (the shared toy data's are a
    # word or a digit, which can fit).
    long = write_chat_data(tmp_path / "long", n_train=32, n_test=8, kinds=("repeat", "flip"))
    kw = dict(rl=dict(max_new_tokens=2, stall_rollouts=2), train=dict(max_steps=3, save_steps=1))
    with caplog.at_level(logging.WARNING, logger="alignkit.train.rl"):
        rl.run_rl(rl_cfg(tmp_path / "warn", trained_toy_model, long, **kw))
    text = caplog.text
    assert re.search(r"RL IS NOT LEARNING: (9\d|100)% of the completions were cut at rl.max_new_tokens \(2\)", text)
    assert "Raise rl.max_new_tokens" in text and "100% of the groups had all 4 shaped rewards equal" in text
    assert text.count("NOT LEARNING") == 2  # once each, at the second rollout (the third starts no new streak)
    kw["rl"]["stop_on_stall"] = True
    with pytest.raises(StepFailed, match=r"step [23] could not be prepared: rl.stop_on_stall: \d+% of the .*step-[12]"):
        rl.run_rl(rl_cfg(tmp_path / "stop", trained_toy_model, long, **kw))
    assert not (tmp_path / "stop" / "final").exists()


def test_a_reward_with_the_wrong_number_of_values_stops_before_any_update(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    from alignkit.config import ConfigError

    class Short:
        identity = "short"

        def score(self, prompts, responses, columns=None):
            return [0.0] * (len(responses) - 1)

    monkeypatch.setattr(rl, "build_backend", lambda cfg, cache: Short())
    with pytest.raises(ConfigError, match=r"returned 15 values for 16 completions \(4 prompts x rl.k 4\).*one number per completion"):
        rl.run_rl(rl_cfg(tmp_path / "run", trained_toy_model, toy_data_dir))
    assert not (tmp_path / "run" / "final").exists()


def test_stall_options_are_checked():
    from alignkit.config import ConfigError

    for bad in (dict(stall_rollouts=-1), dict(stall_share=0.0), dict(stall_share=1.5)):
        with pytest.raises(ConfigError, match="rl.stall_rollouts must be >= 0"):
            rl.check_rl_config(rl.RLConfig(rl=rl.RLParams(**bad)))


# --------------------------------------------------------------------------- 18.13 one meaning of completion length


def test_completion_length_and_eval_completion_length_both_count_the_stop_token(toy_chat, trained_toy_model, toy_data_dir):
    from alignkit.generation import SamplingParams, generate, load_prompts
    from alignkit.models import load_causal_lm
    from alignkit.rewards.backends import build_backend

    cfg = rl_cfg("/unused", trained_toy_model, toy_data_dir, eval_prompts=PromptSource(dataset=str(toy_data_dir), split="test",
                                                                                        max_prompts=8))
    model = load_causal_lm(cfg.model, toy_chat)
    backend = build_backend(cfg.reward, None)
    got = rl.make_eval_fn(cfg, toy_chat, backend)(model)["eval_completion_length"]
    prompts = [p["messages"] for p in load_prompts(cfg.eval_prompts)]
    outs = [o[0] for o in generate(model, toy_chat, prompts, SamplingParams(max_new_tokens=cfg.rl.max_new_tokens))]
    assert any(o.stop_id is not None for o in outs)
    assert got == pytest.approx(sum(len(o.token_ids) + (o.stop_id is not None) for o in outs) / len(outs))
    # and the training rollouts' completion_length: completion_ids hold the stop token
    buffer = rollout_source(cfg, toy_chat, [{"id": i, "messages": m} for i, m in enumerate(prompts[:4])]).rollout(0, model)
    samples = [s for mb in buffer["micro"] for s in mb]
    total, n = buffer["metrics"]["completion_length"]
    assert total == sum(len(s["completion_ids"]) for s in samples) and n == len(samples)
    assert all(s["truncated"] or s["completion_ids"][-1] in toy_chat.stop_ids() for s in samples)


def test_the_changed_losses_and_metrics_ignore_how_a_step_is_split(tmp_path, trained_toy_model, toy_data_dir):
    """Dr. GRPO's constant with masked truncated completions, temperatures per sample, and the entropy and kl
    taken from the loss pass: the same at 1x4, 2x2 and 4x1 micro-batches."""
    runs = {}
    for bs, accum in [(4, 1), (2, 2), (1, 4)]:
        out = tmp_path / f"b{bs}"
        rl.run_rl(rl_cfg(out, trained_toy_model, toy_data_dir,
                         rl=dict(algo="grpo", beta=0.1, loss_agg="constant", mask_truncated=True, max_new_tokens=5,
                                 temperatures=[0.5, 1.0, 1.0, 1.5], length_penalty=rl.LengthPenalty("linear", 0.1)),
                         train=dict(max_steps=2, batch_size=bs, grad_accum=accum)))
        runs[bs] = read_metrics(out)
    assert 0 < runs[4][0]["truncated"] < 1
    for bs in (2, 1):
        for a, b in zip(runs[4], runs[bs]):
            for key in ("loss", "entropy", "kl", "kl_k3", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (bs, key)
