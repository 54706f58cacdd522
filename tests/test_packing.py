"""Padding-free packing and token-budget / length-grouped batching.

Packed and padded batches of the same sequences give the same per-sequence log-probabilities,
losses and gradients (fp32; tolerance 1e-5 relative on values, 1e-4 relative / 1e-6 absolute on
gradients, float summation order being the only difference), for SFT, DPO, the reward model and
RL's passes, on the demo tokenizer (runs without ../shared) and on the real Qwen tokenizer with a
tiny Qwen2 (hidden 64, 2 layers); and the packed isolation is real: without the block-diagonal
mask the same packed row gives other numbers.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, validate
from alignkit.data.collate import collate_lm, collate_pairs
from alignkit.data.packing import (
    budget_cost, example_sizes, length_grouped, pack_rows, token_budget_bins,
)
from alignkit.data.prepare import load_examples, tokenize_conversations, tokenize_pairs
from alignkit.train import checkpoint as ckpt
from alignkit.train.dpo import DPOParams, batch_sequence_logps, dpo_loss_fn
from alignkit.train.logprobs import label_logps, packed_attention, per_sequence
from alignkit.train.loop import LengthGroupedPlan, TokenBudgetPlan, make_plan, read_metrics
from alignkit.train.sft import SFTConfig, run_sft, sft_loss

from .conftest import need_shared
from .test_train import Interrupt, sft_cfg, weights

VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- pack_rows (pure)


def test_pack_rows_hand_computed():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[5, -100, 7], [8, 9, -100]]),
        "advantages": torch.tensor([0.5, -1.0]),
    }
    p = pack_rows(batch, row_tokens=8)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # Each sequence's first token is unlabelled (it would be predicted from the previous sequence).
    assert p["labels"].tolist() == [[-100, -100, 7, -100, 9]]
    assert p["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    assert p["advantages"] is batch["advantages"]
    # Rows as long as the longest sequence (3): one sequence each here, no padding left but the row ends,
    # whose position ids continue the last sequence's.
    three = {k: torch.cat([v, v[:1]]) if k != "advantages" else v for k, v in batch.items()}
    q = pack_rows(three)
    assert q["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [5, 6, 7]]
    assert q["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    assert q["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    r = pack_rows({"input_ids": torch.tensor([[5, 0], [8, 9], [4, 3]]), "attention_mask": torch.tensor([[1, 0], [1, 1], [1, 1]]),
                   "labels": torch.tensor([[5, -100], [8, 9], [4, 3]])})  # lengths 1, 2, 2: 1 + 2 > 2, no sharing
    assert r["input_ids"].tolist() == [[5, 0], [8, 9], [4, 3]] and r["position_ids"].tolist() == [[0, 1], [0, 1], [0, 1]]
    assert r["attention_mask"].tolist() == [[1, 0], [1, 1], [1, 1]] and r["labels"].tolist() == [[-100, -100], [-100, 9], [-100, 3]]
    r = pack_rows({"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0], [4, 3, 0]]),
                   "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]), "labels": torch.full((3, 3), 1)})
    assert r["input_ids"].tolist() == [[5, 6, 7], [8, 4, 3]] and r["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_pack_rows_agrees_with_transformers_flattening_collator():
    """transformers' DataCollatorWithFlattening (what TRL's padding_free uses) packs the same way."""
    from transformers import DataCollatorWithFlattening

    examples = [{"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]}, {"input_ids": [7, 8], "labels": [7, 8]}]
    theirs = DataCollatorWithFlattening(return_position_ids=True)(examples)
    ours = pack_rows(collate_lm(examples, pad_token_id=0), row_tokens=6)
    for key in ("input_ids", "labels", "position_ids"):
        assert ours[key].tolist() == theirs[key].tolist(), key


def test_best_fit_bins_hold_every_example_once_within_the_budget():
    g = torch.Generator().manual_seed(0)
    sizes = [(n, 1, n) for n in torch.randint(1, 60, (200,), generator=g).tolist()]
    for packed in (True, False):
        bins = token_budget_bins(sizes, 100, packed)
        assert sorted(i for b in bins for i in b) == list(range(200))
        assert all(budget_cost([sizes[i] for i in b], packed) <= 100 for b in bins)
        assert bins == token_budget_bins(sizes, 100, packed)  # deterministic
    # Best-fit decreasing: near the lower bound sum/budget.
    assert len(token_budget_bins(sizes, 100, True)) <= sum(s[0] for s in sizes) / 100 * 1.05 + 1


def test_length_grouped_hand_computed():
    lengths = [1, 9, 5, 7, 3, 8]
    assert length_grouped([0, 1, 2, 3, 4, 5], lengths, 3) == [1, 2, 0, 5, 3, 4]


# --------------------------------------------------------------------------- models and data


def causal_lm(model_dir, impl: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=impl, dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen64_dir(tmp_path_factory):
    """Qwen2.5-0.5B's config cut to hidden 64 and 2 layers, random weights, the real 151,936-token vocabulary."""
    from alignkit.models import init_model

    src = need_shared("models", "qwen2.5-0.5b")
    overrides = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2}
    return init_model(str(src), tmp_path_factory.mktemp("qwen64") / "model", overrides=overrides, seed=0)


def sft_examples(chat, dataset, n=6):
    data = DataConfig(dataset=str(dataset), split="train", max_examples=n, max_prompt_tokens=96,
                      max_response_tokens=64)
    rows, _ = load_examples(data, "text", 0)
    return [dict(e) for e in tokenize_conversations(rows, chat, data, "tokenise")][:n]


def pair_examples(chat, dataset, split, n=4):
    data = DataConfig(dataset=str(dataset), split=split, max_examples=n, max_prompt_tokens=64, max_response_tokens=48)
    rows, _ = load_examples(data, "preference", 0)
    return [dict(e) for e in tokenize_pairs(rows, chat, data, "tokenise pairs")][:n]


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    out = loss_fn(model, batch)
    (out.loss_sum / out.count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads


def assert_same(padded, packed, model, loss_fn):
    a, ga = loss_and_grads(model, loss_fn, padded)
    b, gb = loss_and_grads(model, loss_fn, packed)
    assert float(a.count) == float(b.count)
    torch.testing.assert_close(b.loss_sum.detach(), a.loss_sum.detach(), **VALUE_TOL)
    for k in a.metrics:
        torch.testing.assert_close(b.metrics[k].double(), a.metrics[k].double(), **VALUE_TOL)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], **GRAD_TOL)
    # The packed row has no padding: fewer or as many tokens through the model.
    assert packed["input_ids"].numel() <= padded["input_ids"].numel()


def check_sft_and_logps(model, examples, pad_id):
    padded = collate_lm(examples, pad_id)
    for row_tokens in (None, 10**6):  # rows as long as the longest sequence; one row of all
        packed = pack_rows(padded, row_tokens)
        assert row_tokens is None or packed["input_ids"].shape[0] == 1
        with torch.no_grad():
            lp, mp = label_logps(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
            lq, mq = label_logps(model, packed["input_ids"], packed["attention_mask"], packed["labels"],
                                 position_ids=packed["position_ids"])
            # Without isolation (position ids and a 2D mask) the sequences see each other: other numbers.
            lr, _ = label_logps(model, packed["input_ids"], packed["attention_mask"], packed["labels"])
        assert mq.shape[0] == len(examples) and mq.sum(-1).tolist() == mp.sum(-1).tolist()
        torch.testing.assert_close(per_sequence(lq, mq)[0], per_sequence(lp, mp)[0], **VALUE_TOL)
        torch.testing.assert_close(lq, lp, rtol=1e-4, atol=1e-4)
        if packed["input_ids"].shape[0] < len(examples):
            assert (lr - lp).abs().max() > 1e-3
        assert_same(padded, packed, model, sft_loss)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_sft_equals_padded_on_the_demo_tokenizer(toy_chat, tiny_model_dir, toy_data_dir, impl):
    model = causal_lm(tiny_model_dir, impl)
    check_sft_and_logps(model, sft_examples(toy_chat, toy_data_dir), toy_chat.pad_id)


def test_packed_sft_equals_padded_on_the_real_qwen_tokenizer(qwen_chat, qwen64_dir):
    model = causal_lm(qwen64_dir, "sdpa")
    check_sft_and_logps(model, sft_examples(qwen_chat, need_shared("data", "smoltalk_like")), qwen_chat.pad_id)


def test_packed_dpo_equals_padded_and_keeps_pairs_in_order(qwen_chat, qwen64_dir):
    model = causal_lm(qwen64_dir, "sdpa")
    pairs = pair_examples(qwen_chat, need_shared("data", "ultrafeedback_binarized"), "train_prefs")
    padded = collate_pairs(pairs, qwen_chat.pad_id)
    with torch.no_grad():
        ref_c, ref_r = batch_sequence_logps(model, padded)[0].chunk(2)
    padded["ref_chosen_logps"], padded["ref_rejected_logps"] = ref_c - 0.3, ref_r + 0.2
    for packed in (pack_rows(padded), pack_rows(padded, 10**6)):
        assert_same(padded, packed, model, dpo_loss_fn(DPOParams(beta=0.1)))
        assert_same(padded, packed, model, dpo_loss_fn(DPOParams(beta=2.0, loss_type="simpo")))


def test_packed_dpo_equals_padded_on_the_demo_tokenizer(toy_chat, tiny_model_dir, tmp_path):
    from alignkit.demo.world import write_preference_data

    model = causal_lm(tiny_model_dir)
    pairs = pair_examples(toy_chat, write_preference_data(tmp_path / "prefs", n_train=16, n_test=4), "train_prefs")
    padded = collate_pairs(pairs, toy_chat.pad_id)
    for packed in (pack_rows(padded), pack_rows(padded, 10**6)):
        assert_same(padded, packed, model, dpo_loss_fn(DPOParams(beta=1.0, loss_type="simpo")))


def test_packed_reward_model_equals_padded(toy_chat, tiny_model_dir, tmp_path):
    from alignkit.train.rm import rm_loss

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = toy_chat.pad_id
    g = torch.Generator().manual_seed(1)
    pairs = [{"prompt_ids": [], "chosen_ids": torch.randint(3, 60, (n,), generator=g).tolist(),
              "rejected_ids": torch.randint(3, 60, (m,), generator=g).tolist()} for n, m in [(5, 9), (12, 4), (7, 7)]]
    padded = collate_pairs(pairs, toy_chat.pad_id)
    for packed in (pack_rows(padded), pack_rows(padded, 10**6)):
        assert_same(padded, packed, model, rm_loss)


def test_packed_rl_passes_equal_padded(toy_chat, tiny_model_dir):
    from alignkit.train import rl
    from alignkit.train.rl import RLParams, collate_rollout, sample_logps

    from .test_rl import rollout_batch

    model = causal_lm(tiny_model_dir)
    samples, _ = rollout_batch(toy_chat, [[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]], seed=3)
    temps = [1.0, 0.7, 1.3] * 2
    for s, t in zip(samples, temps):
        s["temperature"] = t
    old, ent = sample_logps(model, samples, toy_chat.pad_id, 4, entropy=True)
    old_p, ent_p = sample_logps(model, samples, toy_chat.pad_id, 4, entropy=True, packing=True)
    for a, b in zip(old, old_p):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), **VALUE_TOL)
    torch.testing.assert_close(torch.tensor(ent_p), torch.tensor(ent), **VALUE_TOL)
    adv = rl.grpo_advantages(torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 2.0]])).flatten()
    for s, a, o in zip(samples, adv.tolist(), old):
        s.update(advantage=a, old_logps=[x - 0.05 for x in o], ref_logps=[x - 0.1 for x in o])
    padded = collate_rollout(samples, toy_chat.pad_id)
    for p in (RLParams(algo="grpo", beta=0.3, loss_agg="token_mean", num_iterations=2),
              RLParams(algo="rloo", beta=0.0)):
        for packed in (pack_rows(padded), pack_rows(padded, 10**6)):
            assert_same(padded, packed, model, rl.rl_loss_fn(p))


def test_flash_attention_gets_position_ids_and_no_mask():
    """Under FlashAttention transformers turns restarting position_ids into cu_seqlens (varlen kernel)."""
    class Config:
        _attn_implementation = "flash_attention_2"

    class Model(torch.nn.Linear):
        config = Config()

    pos = torch.tensor([[0, 1, 2, 0, 1]])
    got = packed_attention(Model(2, 2), pos)
    assert got["attention_mask"] is None and got["position_ids"] is pos
    Model.config._attn_implementation = "sdpa"
    mask = packed_attention(Model(2, 2), pos)["attention_mask"]
    assert mask.shape == (1, 1, 5, 5) and mask[0, 0, 4].tolist() == [False, False, False, True, True]


# --------------------------------------------------------------------------- plans: steps, order, resume


def sized(lengths):
    return [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]


def test_token_budget_plan_is_deterministic_and_covers_each_epoch_once():
    g = torch.Generator().manual_seed(0)
    data = sized(torch.randint(4, 40, (120,), generator=g).tolist())
    cfg = TrainConfig(max_tokens_per_batch=64, packing=True, grad_accum=2, epochs=2)
    plans = [TokenBudgetPlan(example_sizes(data), cfg, 2, r, seed=5) for r in (0, 1)]
    again = TokenBudgetPlan(example_sizes(data), cfg, 2, 0, seed=5)
    assert plans[0].total_steps == 2 * plans[0].steps_per_epoch == again.total_steps
    seen = []
    for step in range(plans[0].steps_per_epoch):
        micro = [mb for p in plans for mb in p.micro_batches(step)]
        assert len(micro) == 4 and all(sum(len(data[i]["input_ids"]) for i in mb) <= 64 for mb in micro)
        assert plans[0].micro_batches(step) == again.micro_batches(step)
        seen += [i for mb in micro for i in mb]
    assert len(seen) == len(set(seen))  # no example twice in an epoch
    assert plans[0].micro_batches(0) != plans[0].micro_batches(plans[0].steps_per_epoch)  # reshuffled next epoch
    assert TokenBudgetPlan(example_sizes(data), cfg, 2, 0, seed=6).micro_batches(0) != plans[0].micro_batches(0)


def test_dpo_pairs_never_split():
    g = torch.Generator().manual_seed(2)
    pairs = [{"prompt_ids": [1] * int(p), "chosen_ids": [2] * int(c), "rejected_ids": [3] * int(r)}
             for p, c, r in torch.randint(1, 30, (50, 3), generator=g).tolist()]
    cfg = TrainConfig(max_tokens_per_batch=150, packing=True, grad_accum=1)
    plan = TokenBudgetPlan(example_sizes(pairs), cfg, 1, 0, seed=0)
    for step in range(plan.steps_per_epoch):
        for mb in plan.micro_batches(step):
            batch = pack_rows(collate_pairs([pairs[i] for i in mb], pad_token_id=0), row_tokens=150)
            assert batch["input_ids"].shape == (1, sum(example_sizes([pairs[i] for i in mb])[k][0] for k in range(len(mb))))
            assert batch["input_ids"].shape[1] <= 150
            # rows: chosen of each pair, then rejected of each pair, each whole
            starts = (batch["position_ids"][0] == 0).nonzero()[:, 0].tolist() + [batch["input_ids"].shape[1]]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
            want = [len(pairs[i]["prompt_ids"]) + len(pairs[i][side]) for side in ("chosen_ids", "rejected_ids") for i in mb]
            assert lengths == want


def test_length_grouped_plan_cuts_padding_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 200, (400,), generator=g).tolist()
    cfg = TrainConfig(batch_size=8, epochs=1)
    grouped, plain = LengthGroupedPlan(lengths, cfg, 1, 0, 3), make_plan(sized(lengths), cfg, 1, 0, 3)

    def padded_tokens(plan):
        return sum(len(mb) * max(lengths[i] for i in mb) for s in range(plan.steps_per_epoch) for mb in plan.micro_batches(s))

    assert sorted(grouped.permutation(0)) == list(range(400))
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    assert LengthGroupedPlan(lengths, cfg, 1, 0, 3).micro_batches(7) == grouped.micro_batches(7)
    assert LengthGroupedPlan(lengths, cfg, 1, 0, 4).micro_batches(7) != grouped.micro_batches(7)


def test_packed_sft_run_matches_the_padded_run(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    """Same plan (batch_size examples per micro-batch), packed or padded: same losses and weights."""
    from alignkit.train import loop

    packed_rows = []
    monkeypatch.setattr(loop, "pack_rows", lambda b: packed_rows.append(b["input_ids"].shape) or pack_rows(b))
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        run_sft(sft_cfg(out, tiny_model_dir, toy_data_dir, max_steps=3, batch_size=4, grad_accum=2, packing=packing))
        runs[packing] = ([m["loss"] for m in read_metrics(out)], weights(out / "final"))
        assert len(packed_rows) == (6 if packing else 0)  # 3 steps x 2 micro-batches, each packed
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("train", [dict(packing=True, max_tokens_per_batch=256), dict(group_by_length=True)])
def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, toy_data_dir, train):
    kw = dict(max_steps=6, save_steps=3, batch_size=4, grad_accum=2, **train)
    run_sft(sft_cfg(tmp_path / "straight", tiny_model_dir, toy_data_dir, **kw))
    cfg = sft_cfg(tmp_path / "broken", tiny_model_dir, toy_data_dir, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, callbacks=[Interrupt(at=4)])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "broken" / "checkpoints")] == [3]
    cfg.resume = True
    run_sft(cfg)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens_seen"] == b["tokens_seen"]
    for k, v in weights(tmp_path / "straight" / "final").items():
        torch.testing.assert_close(weights(tmp_path / "broken" / "final")[k], v, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- validation


def test_validation_errors(tmp_path, tiny_model_dir, toy_data_dir):
    with pytest.raises(ConfigError, match="max_tokens_per_batch: 0"):
        validate(SFTConfig(train=TrainConfig(max_tokens_per_batch=0)))
    with pytest.raises(ConfigError, match="group_by_length"):
        validate(SFTConfig(train=TrainConfig(group_by_length=True, packing=True)))
    with pytest.raises(ConfigError, match=r"max_tokens_per_batch: 16 is less than example \d+'s \d+ tokens"):
        run_sft(sft_cfg(tmp_path / "small", tiny_model_dir, toy_data_dir, packing=True, max_tokens_per_batch=16))
    assert not (tmp_path / "small").exists()  # refused before anything ran
    pairs = [{"prompt_ids": [1] * 10, "chosen_ids": [2] * 30, "rejected_ids": [3] * 5}]
    with pytest.raises(ConfigError, match="chosen and rejected stay in one micro-batch"):
        TokenBudgetPlan(example_sizes(pairs), TrainConfig(max_tokens_per_batch=50, packing=True), 1, 0, 0)
    # padded: rows x the longest row (2 x 40)
    with pytest.raises(ConfigError, match="80 tokens padded"):
        TokenBudgetPlan(example_sizes(pairs), TrainConfig(max_tokens_per_batch=60), 1, 0, 0)
    from alignkit.train.rl import RLConfig, check_rl_config

    with pytest.raises(ConfigError, match="RL's train.batch_size counts prompts"):
        check_rl_config(RLConfig(train=TrainConfig(max_tokens_per_batch=512)))
