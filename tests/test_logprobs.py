"""Label log-probs at labelled positions only, in chunks: same values and gradients as full logits."""

import pytest
import torch

from alignkit.data.chat import IGNORE_INDEX
from alignkit.train import logprobs
from alignkit.train.dpo import sequence_logps
from alignkit.train.logprobs import label_logps, per_sequence
from alignkit.train.sft import token_nll


def tiny(kind: str = "qwen2", vocab: int = 300):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    if kind == "gemma2":  # its logits are soft-capped: not just head(hidden)
        return Gemma2ForCausalLM(Gemma2Config(head_dim=16, final_logit_softcapping=5.0, **shape))
    return Qwen2ForCausalLM(Qwen2Config(**shape))


def batch(vocab: int = 300):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 9:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with nothing to learn
    return ids, attention, labels


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_equals_full_logits_in_values_and_gradients(kind, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_TOKENS", 4)  # several chunks, the last one short
    ids, attention, labels = batch()
    model = tiny(kind)

    nll_full, count_full = token_nll(model(input_ids=ids, attention_mask=attention).logits, labels)
    nll_full.backward()
    expected = grads(model)
    model.zero_grad()
    logps, mask = label_logps(model, ids, attention, labels)
    (-logps.sum()).backward()
    assert int(mask.sum()) == int(count_full) == 8 + 8
    torch.testing.assert_close(-logps.sum(), nll_full, rtol=1e-5, atol=1e-5)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)

    with torch.no_grad():
        sums, counts = per_sequence(*label_logps(model, ids, attention, labels))
        ref_sums, ref_counts = sequence_logps(model(input_ids=ids, attention_mask=attention).logits, labels)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == ref_counts.tolist() == [8, 8, 0] and sums[2] == 0
    # Gemma-2 soft-caps its logits: found at the first batch, and full logits are used from then on.
    assert getattr(model, logprobs.FULL_LOGITS, False) == (kind == "gemma2")


def test_full_logits_are_never_kept_for_backward(monkeypatch):
    """The point of it: no tensor of (positions x vocabulary) is saved for the backward pass."""
    monkeypatch.setattr(logprobs, "CHUNK_TOKENS", 4)
    vocab = 5000  # larger than every activation, so a logits-sized tensor stands out
    ids, attention, labels = batch(vocab)
    model = tiny(vocab=vocab)
    largest = []
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:  # activations only (a linear layer saves its weight)
            largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = label_logps(model, ids, attention, labels)
    chunked = max(largest, default=0)
    largest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_nll(model(input_ids=ids, attention_mask=attention).logits, labels)
    full = max(largest)
    assert full >= 3 * 11 * vocab  # the plain way keeps every position's logits
    assert chunked <= 3 * vocab  # here: only the one logit the model's forward still computes per row


def test_mixed_precision_takes_the_chunked_path():
    """Under bf16 autocast (training on a GPU) the one-logit check still recognises a plain output layer."""
    vocab = 5000
    ids, attention, labels = batch(vocab)
    model = tiny(vocab=vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = token_nll(model(input_ids=ids, attention_mask=attention).logits, labels)
        logps, _ = label_logps(model, ids, attention, labels)
    assert not getattr(model, logprobs.FULL_LOGITS, False)
    torch.testing.assert_close(-logps.sum(), full, rtol=1e-4, atol=1e-4)


def test_mixed_precision_gradients_equal_full_logits():
    """#12.25: under bf16 autocast the chunked path gives the gradients of full logits too, not only the values."""
    ids, attention, labels = batch()
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = token_nll(model(input_ids=ids, attention_mask=attention).logits, labels)
    full.backward()
    expected = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = label_logps(model, ids, attention, labels)
    (-logps.sum()).backward()
    assert not getattr(model, logprobs.FULL_LOGITS, False)  # the chunked path ran
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-2, atol=1e-5, msg=name)


def test_fused_head_equals_checkpointed_head_with_temperatures(monkeypatch):
    """The fused output layer (`HeadLogps`, the default) against the checkpointed module path it replaced:
    same log-probs and gradients, with one sampling temperature per row (RL's log-prob pass)."""
    monkeypatch.setattr(logprobs, "CHUNK_TOKENS", 5)
    ids, attention, labels = batch()
    temperature = torch.tensor([0.7, 1.3, 1.0])
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(logprobs, "FUSED_HEAD", fused)
        model = tiny()
        logps, _ = label_logps(model, ids, attention, labels, temperature=temperature)
        (logps * torch.linspace(-1, 2, logps.numel())).sum().backward()  # an uneven upstream gradient
        results[fused] = (logps.detach(), grads(model))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert results[True][1].keys() == results[False][1].keys()
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_only_for_a_plain_linear_layer():
    """A head that is more than its weight (a bias, hooks that gather or change it, a LoRA wrapper)
    goes through the module's own forward."""
    plain = torch.nn.Linear(8, 20, bias=False)
    assert logprobs.fusable(plain)
    assert not logprobs.fusable(torch.nn.Linear(8, 20, bias=True))
    hooked = torch.nn.Linear(8, 20, bias=False)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert not logprobs.fusable(hooked)

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA layer subclassing Linear
        pass

    assert not logprobs.fusable(Wrapped(8, 20, bias=False))
