"""The newer RL options (train/rl.py): CISPO, REINFORCE++, DAPO's dynamic sampling and the sampler
correction under top-k/top-p, each against hand-computed values (and TRL where it has the same
thing), then in the stage: independent of how a step is split, exactly resumable."""

import math

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.train import rl
from alignkit.train.loop import read_metrics
from alignkit.train.rl import (
    RLConfig,
    RLParams,
    aggregate,
    cispo_token_losses,
    informative_groups,
    k3_kl,
    policy_token_losses,
    reinforce_pp_token_returns,
    replacement_prompts,
    sampling_logprobs,
    whiten,
)

from .test_rl import rl_cfg
from .test_train import Interrupt

# --------------------------------------------------------------------------- CISPO


def test_cispo_keeps_the_gradient_of_tokens_past_the_cap():
    """CISPO: loss -sg(min(r, cap)) * A * log pi; d loss / d log pi = -min(r, cap) * A on every token,
    also where PPO's clip gives none."""
    old = torch.zeros(3)
    logps = torch.log(torch.tensor([0.5, 1.0, 3.0])).requires_grad_(True)  # ratios 0.5, 1, 3
    adv = torch.tensor([1.0, -1.0, 2.0])
    rows, n = torch.arange(3), torch.ones(3)
    loss, capped = policy_token_losses(
        logps, old, adv, rows, n, "grpo", epsilon=0.2, epsilon_high=1.0, loss="cispo"
    )
    lp = [math.log(0.5), 0.0, math.log(3.0)]
    assert loss.tolist() == pytest.approx(
        [-0.5 * 1 * lp[0], -1.0 * -1 * lp[1], -2.0 * 2 * lp[2]]
    )  # cap 1 + 1.0 = 2
    assert capped.tolist() == [False, False, True]
    loss.sum().backward()
    assert logps.grad.tolist() == pytest.approx([-0.5, 1.0, -4.0])
    ppo = logps.detach().clone().requires_grad_(True)
    policy_token_losses(ppo, old, adv, rows, n, "grpo", epsilon=0.2, epsilon_high=1.0)[0].sum().backward()
    assert ppo.grad[2].item() == 0.0  # PPO's clip: A > 0, ratio 3 > 2, no gradient
    direct, _ = cispo_token_losses(torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([2.0]), cap=2.0)
    assert direct.item() == pytest.approx(4.0)


def test_cispo_agrees_with_trl():
    """Our CISPO with epsilon_high e equals TRL's GRPOTrainer._compute_loss with loss_type 'cispo' and
    epsilon_high 1 + e (TRL's is the cap itself), token-mean over the batch, with the k3 term: value and
    gradient."""
    from collections import defaultdict
    from types import SimpleNamespace

    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is a dev dependency")
    g = torch.Generator().manual_seed(1)
    B, T = 5, 6
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate([6, 2, 4, 1, 5]):
        mask[i, n:] = 0
    lp0 = -torch.rand(B, T, generator=g) * 3
    old = lp0 + 0.6 * torch.randn(B, T, generator=g)  # ratios well past the cap
    ref = lp0 + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    beta, eps_high = 0.04, 0.5

    lp_trl = lp0.clone().requires_grad_(True)
    reduce = SimpleNamespace(
        reduce=lambda x, reduction="sum": x,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        num_processes=1,
    )
    fake = SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type="cispo",
        epsilon_low=0.2,
        epsilon_high=1 + eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=T,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        accelerator=reduce,
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp_trl, torch.zeros(B, T), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().float(),
    }
    theirs = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    theirs.backward()

    lp = lp0.clone().requires_grad_(True)
    m = mask.bool()
    rows, n_tokens = m.nonzero()[:, 0], m.sum(-1)
    token_losses, capped = policy_token_losses(
        lp[m], old[m], adv, rows, n_tokens, "grpo", 0.2, eps_high, loss="cispo"
    )
    assert capped.any() and not capped.all()
    total, count = aggregate(
        token_losses + beta * k3_kl(lp[m], ref[m]), rows, n_tokens, torch.ones(B), "token_mean", T
    )
    mine = total / count
    mine.backward()
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-5)
    torch.testing.assert_close(lp.grad, lp_trl.grad * mask, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- REINFORCE++


def test_reinforce_pp_returns_carry_the_kl_reward_to_the_end_of_each_sequence():
    """G_t = R - beta * sum_{s >= t} kl_s: rewards [1, 0], kl [0.1, 0.2, 0.3 | 0.5], beta 0.5."""
    rows, n = torch.tensor([0, 0, 0, 1]), torch.tensor([3, 1])
    got = reinforce_pp_token_returns(
        torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.1, 0.2, 0.3, 0.5]), rows, n, 0.5
    )
    assert got.tolist() == pytest.approx([1 - 0.5 * 0.6, 1 - 0.5 * 0.5, 1 - 0.5 * 0.3, -0.5 * 0.5])
    assert reinforce_pp_token_returns(torch.tensor([2.0, 3.0]), torch.ones(4), rows, n, 0.0).tolist() == [
        2.0,
        2.0,
        2.0,
        3.0,
    ]


def test_global_whitening_over_the_step_and_its_totals():
    x = torch.tensor([0.7, 0.75, 0.85, -0.25], dtype=torch.float64)
    mean = (0.7 + 0.75 + 0.85 - 0.25) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in [0.7, 0.75, 0.85, -0.25]) / 4)  # population std, as OpenRLHF
    assert whiten(x, torch.ones(4)).tolist() == pytest.approx([(v - mean) / std for v in x.tolist()])
    # a masked token counts for nothing
    w = torch.tensor([1.0, 1.0, 1.0, 0.0])
    m3 = (0.7 + 0.75 + 0.85) / 3
    s3 = math.sqrt(sum((v - m3) ** 2 for v in [0.7, 0.75, 0.85]) / 3)
    assert whiten(x, w)[:3].tolist() == pytest.approx([(v - m3) / s3 for v in [0.7, 0.75, 0.85]])
    # split over two processes: each half normalised with the summed totals gives the whole's values
    whole = whiten(x, torch.ones(4))
    totals = tuple(
        a + b for a, b in zip(*[(2.0, float(h.sum()), float((h * h).sum())) for h in (x[:2], x[2:])])
    )
    torch.testing.assert_close(
        torch.cat([whiten(x[:2], torch.ones(2), totals), whiten(x[2:], torch.ones(2), totals)]), whole
    )
    assert (
        whiten(torch.ones(3, dtype=torch.float64), torch.ones(3)).abs().max() == 0
    )  # no spread: zeros, no NaN


def test_per_token_advantages_reach_the_loss():
    """With token_advantages the REINFORCE/clip terms use one advantage per token."""
    logps = torch.log(torch.tensor([0.5, 0.25, 0.5]))
    rows, n = torch.tensor([0, 0, 1]), torch.tensor([2, 1])
    tok = torch.tensor([1.0, -2.0, 0.5])
    loss, _ = policy_token_losses(logps, logps, torch.zeros(2), rows, n, "grpo", token_advantages=tok)
    assert loss.tolist() == pytest.approx([-1.0, 2.0, -0.5])  # ratio 1: -A_t


# --------------------------------------------------------------------------- truncated sampling distributions


def test_sampling_logprobs_under_top_p_top_k_and_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4, 4)
    targets = torch.tensor([0, 1, 2, 3])
    # top_p 0.7: ascending cumulative mass 0.05, 0.2, 0.5, 1 -> drop those <= 0.3: keep {0.5, 0.3},
    # renormalised
    got = sampling_logprobs(logits, targets, 1.0, 0, 0.7)
    assert got[:2].tolist() == pytest.approx([math.log(0.5 / 0.8), math.log(0.3 / 0.8)])
    assert got[2:].tolist() == [-math.inf, -math.inf]
    # top_k 3: keep the three largest, over 0.95
    got = sampling_logprobs(logits, targets, 1.0, 3, 1.0)
    assert (
        got[:3].tolist() == pytest.approx([math.log(p / 0.95) for p in (0.5, 0.3, 0.15)])
        and got[3] == -math.inf
    )
    # top_k 3 then top_p 0.6 over the top-k's renormalised mass: 0.15/0.95 = 0.158 <= 0.4 goes, 0.474 stays
    got = sampling_logprobs(logits, targets, 1.0, 3, 0.6)
    assert (
        got[:2].tolist() == pytest.approx([math.log(0.5 / 0.8), math.log(0.3 / 0.8)]) and got[2] == -math.inf
    )
    # temperature 2: p^(1/2) renormalised; a greedy row (T = 0) is reported at T = 1, untruncated
    root = probs.sqrt() / probs.sqrt().sum()
    assert sampling_logprobs(logits, targets, 2.0).tolist() == pytest.approx(root.log().tolist(), rel=1e-5)
    got = sampling_logprobs(logits, targets, torch.tensor([0.0, 0.0, 0.0, 1.0]), 0, 0.7)
    assert got[:3].tolist() == pytest.approx(probs[:3].log().tolist()) and got[3] == -math.inf
    # the bias the correction removes: untruncated over truncated is the kept mass (0.8), not 1
    ratio = torch.exp(
        sampling_logprobs(logits, targets, 1.0) - sampling_logprobs(logits, targets, 1.0, 0, 0.7)
    )[:2]
    assert ratio.tolist() == pytest.approx([0.8, 0.8])


def test_sampling_logprobs_match_the_transformers_warpers():
    """The distribution our transformers engine samples from (TemperatureLogitsWarper, TopK, TopP), on
    random logits."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    targets = torch.randint(0, 50, (64,), generator=g)
    for t, k, p in [(0.7, 0, 0.9), (1.3, 10, 1.0), (1.0, 20, 0.8), (0.5, 5, 0.5)]:
        scores = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        want = scores.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        got = sampling_logprobs(logits, targets, t, k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (t, k, p)
        torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- dynamic sampling (pure)


def test_informative_groups_and_replacement_draws():
    assert informative_groups(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5]])).tolist() == [
        False,
        True,
        False,
    ]
    a = replacement_prompts(0, 3, 1, list(range(8)), 20)
    assert (
        a == replacement_prompts(0, 3, 1, list(range(8)), 20) and len(set(a)) == 8
    )  # one permutation: no repeats within a round
    assert replacement_prompts(0, 3, 1, [5, 2], 20) == [a[5], a[2]]  # by place, whoever else is missing
    assert (
        replacement_prompts(0, 3, 2, list(range(8)), 20) != a
        and replacement_prompts(0, 4, 1, list(range(8)), 20) != a
    )


def test_new_options_are_checked_and_documented():
    from alignkit.config import leaf_fields, validate

    for bad, match in [
        (dict(algo="rloo", loss="cispo"), "GRPO options"),
        (dict(algo="rloo", advantage="reinforce_pp"), "GRPO options"),
        (dict(dynamic_sampling_rounds=-1), "dynamic_sampling_rounds"),
    ]:
        with pytest.raises(ConfigError, match=match):
            rl.check_rl_config(RLConfig(rl=RLParams(k=2, **bad)))
    with pytest.raises(ConfigError, match=r"rl.dynamic_sampling_rounds: -1 is not allowed"):
        validate(RLConfig(rl=RLParams(dynamic_sampling_rounds=-1)))
    fields = leaf_fields(RLConfig)  # what `alignkit rl --help` lists
    assert "MiniMax-M1" in fields["rl.loss"][2] and "REINFORCE++" in fields["rl.advantage"][2]
    assert "DAPO" in fields["rl.dynamic_sampling"][2] and fields["rl.dynamic_sampling_rounds"][1] == 3
    assert (
        not RLParams(algo="grpo", beta=0.1, advantage="reinforce_pp").kl_in_loss()
        and RLParams(algo="grpo", beta=0.1).kl_in_loss()
    )


def test_the_countdown_recipe_uses_dynamic_sampling():
    from pathlib import Path

    from alignkit import config as C

    cfg = C.load(
        RLConfig, Path(__file__).resolve().parents[1] / "recipes" / "grpo-qwen2.5-0.5b-countdown.yaml"
    )
    rl.check_rl_config(cfg)
    assert cfg.rl.dynamic_sampling and cfg.rl.dynamic_sampling_rounds >= 1


# --------------------------------------------------------------------------- dynamic sampling in a rollout


class AddsTie:
    """'What is a plus b?' prompts score 0 whatever the reply (no signal); others score the reply's length."""

    identity = "adds-tie"

    def score(self, prompts, responses, columns=None):
        return [
            0.0 if m[-1]["content"].startswith("What is") else float(len(r))
            for m, r in zip(prompts, responses)
        ]


def test_dynamic_sampling_replaces_groups_without_signal_whatever_the_split(
    toy_chat, trained_toy_model, toy_data_dir
):
    """Each place of the step whose group ties gets a fresh prompt; the kept prompts, their samples
    and the counts are the same with 1 process x 4 prompts as with 2 processes x 2."""
    from alignkit.generation import load_prompts
    from alignkit.models import load_causal_lm

    def rollout(world, rank, bs, rounds=3):
        cfg = rl_cfg(
            "/unused",
            trained_toy_model,
            toy_data_dir,
            rl=dict(algo="grpo", k=3, temperature=1.5, dynamic_sampling=True, dynamic_sampling_rounds=rounds),
            train=dict(batch_size=bs),
        )
        prompts = load_prompts(cfg.prompts)
        model = load_causal_lm(cfg.model, toy_chat)
        src = rl.RolloutSource(cfg, toy_chat, prompts, AddsTie(), None, world, rank, None, False)
        out = src.rollout(0, model)
        return src, out, prompts

    src, one, prompts = rollout(1, 0, 4)
    samples = [s for mb in one["micro"] for s in mb]
    m = {k: v[0] / v[1] for k, v in one["metrics"].items()}
    original = src.plan.micro_batches(0)[0]
    ties = sum(prompts[i]["messages"][-1]["content"].startswith("What is") for i in original)
    assert m["dynamic_groups_drawn"] == 4 + m["dynamic_extra_draws"] and m["dynamic_groups_dropped"] >= ties
    kept = [s["prompt"] for s in samples[::3]]
    for i, w in zip(kept, [s["weight"] for s in samples[::3]]):
        assert (w == 1.0) == (not prompts[i]["messages"][-1]["content"].startswith("What is"))
    assert m["dynamic_short"] == float(m["dynamic_unfilled"] > 0)
    assert ties > 0 or m["dynamic_extra_draws"] == 0, "the toy prompts of step 1 should include an addition"
    halves = [rollout(2, r, 2) for r in (0, 1)]
    two = [s for _, out, _ in halves for mb in out["micro"] for s in mb]
    assert [(s["prompt"], s["completion_ids"], s["weight"]) for s in two] == [
        (s["prompt"], s["completion_ids"], s["weight"]) for s in samples
    ]
    for key in ("dynamic_groups_drawn", "dynamic_groups_dropped", "dynamic_extra_draws", "dynamic_unfilled"):
        assert sum(out["metrics"][key][0] for _, out, _ in halves) == one["metrics"][key][0], key
    _, none, _ = rollout(1, 0, 4, rounds=0)  # no extra draws: ties stay, out of the loss
    assert none["metrics"]["dynamic_extra_draws"][0] == 0 and none["metrics"]["dynamic_unfilled"][0] == ties


# --------------------------------------------------------------------------- in the stage


NEW = dict(
    algo="grpo",
    beta=0.1,
    loss="cispo",
    epsilon_high=0.5,
    advantage="reinforce_pp_baseline",
    dynamic_sampling=True,
    temperature=1.2,
)


def test_new_losses_ignore_how_a_step_is_split(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    """CISPO with REINFORCE++-baseline advantages and dynamic sampling, 4 prompts x 4 samples as 1x4 and
    4x1 micro-batches."""
    monkeypatch.setattr(rl, "build_backend", lambda cfg, cache: AddsTie())
    runs = {}
    for bs, accum in [(4, 1), (1, 4)]:
        out = tmp_path / f"b{bs}"
        rl.run_rl(
            rl_cfg(
                out,
                trained_toy_model,
                toy_data_dir,
                rl=dict(NEW),
                train=dict(max_steps=2, batch_size=bs, grad_accum=accum),
            )
        )
        runs[bs] = read_metrics(out)
    for a, b in zip(runs[4], runs[1]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6) and a["loss"] != 0
        for key in (
            "reward",
            "advantage_abs",
            "dynamic_groups_drawn",
            "dynamic_extra_draws",
            "clip_fraction",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert "kl_k3" not in runs[4][0]  # REINFORCE++: the KL is in the reward, not the loss
    assert sum(r["dynamic_extra_draws"] for r in runs[4]) > 0


def test_dynamic_sampling_resumes_exactly(tmp_path, trained_toy_model, toy_data_dir, monkeypatch):
    monkeypatch.setattr(rl, "build_backend", lambda cfg, cache: AddsTie())
    kw = dict(rl=dict(NEW, loss="clip", advantage="reinforce_pp"), train=dict(max_steps=4, save_steps=2))
    rl.run_rl(rl_cfg(tmp_path / "straight", trained_toy_model, toy_data_dir, **kw))
    cfg = rl_cfg(tmp_path / "broken", trained_toy_model, toy_data_dir, **kw)
    with pytest.raises(KeyboardInterrupt):
        rl.run_rl(cfg, callbacks=[Interrupt(at=3)])
    cfg.resume = True
    rl.run_rl(cfg)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "reward", "dynamic_groups_drawn", "dynamic_groups_dropped", "kl"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_sampler_correction_under_top_p_compares_like_with_like(
    tmp_path, trained_toy_model, toy_data_dir, monkeypatch
):
    """A sampler that reports exactly the policy's truncated distribution (top_p 0.6, T 1.3; computed here
    with transformers' warpers on full logits): importance weights 1 and no mismatch. Compared with the
    untruncated log-probs (TRL's ratio), the weights would fall below 1 by the truncated mass."""
    from contextlib import contextmanager

    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from alignkit.data.chat import tokenize_prompt
    from alignkit.generation import ColocatedVLLM, generate

    class TruncatedSampler(ColocatedVLLM):
        def sync(self, model, version):
            self.model = model
            return False

        def rest(self):
            pass

        @torch.no_grad()
        def generate(self, chat, prompts, params, salts=None, temperatures=None):
            assert temperatures is None  # one temperature here: params.temperature
            outs = generate(self.model, chat, prompts, params, salts=salts)
            for msgs, cs in zip(prompts, outs):
                pid = tokenize_prompt(chat.tokenizer, msgs)
                for c in cs:
                    ids = list(c.token_ids) + ([c.stop_id] if c.stop_id is not None else [])
                    logits = self.model(input_ids=torch.tensor([pid + ids])).logits[0, len(pid) - 1 : -1]
                    scores = TopPLogitsWarper(params.top_p)(
                        None, TemperatureLogitsWarper(params.temperature)(None, logits)
                    )
                    c.logprobs = (
                        scores.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()
                    )
                    hot = TemperatureLogitsWarper(params.temperature)(None, logits.clone()).log_softmax(-1)
                    self.raw.append(hot.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1))
                    self.truncated.append(torch.tensor(c.logprobs))
            return outs

    engine = TruncatedSampler(None)
    engine.raw, engine.truncated = [], []
    monkeypatch.setattr(rl, "colocated_engine", contextmanager(lambda cfg, chat, state: (yield engine)))
    cfg = rl_cfg(
        tmp_path / "run",
        trained_toy_model,
        toy_data_dir,
        train=dict(max_steps=1),
        rl=dict(algo="grpo", engine="vllm", vllm_is_threshold=2.0, top_p=0.6, temperature=1.3,
                dynamic_sampling=True),
    )
    rl.run_rl(cfg)
    row = read_metrics(tmp_path / "run")[0]
    assert row["vllm_is_weight"] == pytest.approx(1.0, abs=1e-4) and row["vllm_mismatch_kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert row["vllm_is_clipped"] == 0 and row["dynamic_extra_draws"] > 0  # replacements sampled there too
    # the biased alternative: untruncated trainer log-probs (at T) against the truncated sampler
    biased = torch.exp(torch.cat(engine.raw) - torch.cat(engine.truncated))
    assert float(biased.mean()) < 0.98


def test_reinforce_pp_normalises_over_all_processes(
    toy_chat, trained_toy_model, tiny_model_dir, toy_data_dir, monkeypatch
):
    """REINFORCE++'s per-token advantages of 2 processes x 2 prompts (their totals all-reduced; the
    reduction stood in for here) equal those of 1 process x 4 prompts; the KL reward against a
    reference that differs makes them differ within a sequence."""
    from alignkit.config import ModelConfig
    from alignkit.generation import load_prompts
    from alignkit.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(trained_toy_model)), toy_chat)
    ref = load_causal_lm(ModelConfig(name_or_path=str(tiny_model_dir)), toy_chat).eval()

    def token_advantages(world, rank, bs):
        cfg = rl_cfg(
            "/unused",
            trained_toy_model,
            toy_data_dir,
            rl=dict(algo="grpo", k=3, beta=0.5, advantage="reinforce_pp"),
            train=dict(batch_size=bs),
        )
        src = rl.RolloutSource(
            cfg, toy_chat, load_prompts(cfg.prompts), AddsTie(), ref, world, rank, None, False
        )
        return [s["token_advantages"] for mb in src.rollout(0, model)["micro"] for s in mb]

    whole = token_advantages(1, 0, 4)
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: seen.append(t.clone()))
    token_advantages(2, 0, 2), token_advantages(2, 1, 2)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, other=seen[1 - rank]: t.add_(other))
        parts += token_advantages(2, rank, 2)
    assert len(parts) == len(whole) == 12
    for a, b in zip(parts, whole):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    flat = [v for a in whole for v in a]
    assert sum(flat) == pytest.approx(0.0, abs=1e-9) and any(len(set(a)) > 1 for a in whole)


@pytest.mark.slow
def test_new_options_two_processes_match_one(tmp_path, trained_toy_model, toy_data_dir):
    """CISPO, REINFORCE++ (normalised over both processes) and dynamic sampling: 1 process x 4 prompts
    and 2 processes x 2 give the same rewards, draws and losses (torchrun, gloo on CPU)."""
    import subprocess
    import sys

    from .test_distributed import free_port

    common = [
        "--model.name-or-path", str(trained_toy_model), "--prompts.dataset", str(toy_data_dir),
        "--prompts.split", "train", "--reward.kind", "rule", "--reward.rule", "toy", "--rl.k", "4",
        "--rl.max-new-tokens", "8", "--rl.beta", "0.1", "--rl.algo", "grpo", "--rl.loss", "cispo",
        "--rl.epsilon-high", "0.5", "--rl.advantage", "reinforce_pp", "--rl.dynamic-sampling", "true",
        "--rl.temperature", "1.3", "--train.max-steps", "2", "--train.logging-steps", "1",
        "--train.precision", "fp32", "--train.learning-rate", "1e-3", "--train.save-steps", "0", "--quiet",
    ]
    cli = [sys.executable, "-m", "alignkit.cli", "rl"]
    one = cli + common + ["--output-dir", str(tmp_path / "one"), "--train.batch-size", "4"]
    res = subprocess.run(one, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "alignkit.cli", "rl"]
    two = launch + common + ["--output-dir", str(tmp_path / "two"), "--train.batch-size", "2"]
    res = subprocess.run(two, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for key in ("reward", "kl", "loss", "advantage_abs", "dynamic_groups_drawn", "dynamic_extra_draws",
                    "dynamic_unfilled"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    assert sum(x["dynamic_extra_draws"] for x in a) > 0


def test_a_token_outside_the_trainers_nucleus_weighs_zero_and_is_counted(monkeypatch):
    """Where the engines' floats put a token on different sides of the nucleus's edge, the trainer's
    probability is 0: weight 0, a finite mismatch, and the share logged."""
    src = rl.RolloutSource.__new__(rl.RolloutSource)
    src.p = RLParams(algo="grpo", k=2, top_p=0.5)
    src.cfg, src.chat = RLConfig(), type("Chat", (), {"pad_id": 0})()
    monkeypatch.setattr(rl, "sampling_sample_logps", lambda *a: [[math.log(0.5), -math.inf], [0.0]])
    samples = [{"index": 0}, {"index": 1}]
    got, outside = src.sampler_view_logps(None, samples, old=None)
    assert got == [[math.log(0.5), rl.TRUNCATED_LOGP], [0.0]]
    assert outside == {"vllm_outside_truncation": (1.0, 3.0)}
    samples = [{"sampler_logps": [math.log(0.5), math.log(0.1)]}, {"sampler_logps": [0.0]}]
    metrics = rl.sampler_correction(samples, got, threshold=2.0)
    assert samples[0]["is_weights"][1] == pytest.approx(0.0, abs=1e-20)
    assert math.isfinite(metrics["vllm_mismatch_kl"][0])
