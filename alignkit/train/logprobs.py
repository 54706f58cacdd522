"""Log-probabilities of the labelled tokens of a batch, without the batch's full logits.

SFT, DPO and perplexity only need log p(label) where a label exists (the replies). With a 152k
vocabulary the full logits of a batch are the largest tensor in training (8 x 2048 tokens: 10 GB
in fp32, twice that with log_softmax). Here the model returns its last hidden states; the output
layer is applied only at labelled positions, in chunks, and under autograd each chunk's logits
are recomputed in the backward pass instead of being kept. Same numbers as the plain way
(`token_nll`, `sequence_logps` on full logits; tests check values and gradients). Models whose
logits are more than the output layer (soft-capping, scaling) are detected at the first batch,
by comparing the one logit the forward still computes, and get full logits. Once a model passed
that check, no-grad passes (RL's old and reference log-probs) run its base model alone, which
returns the last hidden state only (not every layer's). `temperature` (RL) divides each row's logits
by the temperature its completion was sampled at, as TRL does, before the log-softmax.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch.utils.checkpoint import checkpoint

from ..data.chat import IGNORE_INDEX

log = logging.getLogger(__name__)

CHUNK_TOKENS = 1024
"""Labelled positions per output-layer chunk: 1024 x 152k vocabulary is 0.6 GB of fp32 logits."""
FULL_LOGITS = "_alignkit_full_logits"
"""Set on a model whose logits are more than head(hidden) (found at its first batch)."""
PLAIN_HEAD = "_alignkit_plain_head"
"""Set on a model whose logits were found to be head(last hidden state)."""
BASE_MODEL_NO_GRAD = True
"""No-grad passes of a checked model run its base model (False: the full forward with every layer's
hidden states, as before; kept for bench/rl_step.py's before/after)."""


def label_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each labelled token, flat in row-major order; the (B, T-1) mask of where they are).

    Position t of the model predicts labels[:, t + 1]. temperature: None, or one per row (B,): the
    row's logits are divided by it (log-probs of the distribution its tokens were sampled from).
    """
    logps, _, mask = label_stats(model, input_ids, attention_mask, labels, entropy=False,
                                 temperature=temperature)
    return logps, mask


def label_logps_entropy(model, input_ids, attention_mask, labels,
                        temperature: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each labelled token, the entropy of the model's distribution there (no gradient), mask).

    RL's passes: the log-probs and the policy's entropy from one forward (no gradient flows through
    the entropy; the log-probs have one under autograd).
    """
    return label_stats(model, input_ids, attention_mask, labels, entropy=True, temperature=temperature)


def label_stats(model, input_ids, attention_mask, labels, entropy: bool,
                temperature: torch.Tensor | None = None):
    from ..models import AdaptersOff, is_peft_model

    if isinstance(model, AdaptersOff):  # LoRA's reference: the policy's base, adapters disabled for this pass
        with model.peft_model.disable_adapter():
            return label_stats(model.peft_model, input_ids, attention_mask, labels, entropy, temperature)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    temps = None
    if temperature is not None:  # one per labelled token, in the flat order of the labelled positions
        temps = temperature.to(device=input_ids.device, dtype=torch.float32)[mask.nonzero()[:, 0]]
    inner = extract_model_from_parallel(model)
    if is_peft_model(inner):  # the transformers model, its adapters injected in place
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    stats = head_stats if entropy else head_logps
    if head is not None and not getattr(inner, FULL_LOGITS, False):
        base = getattr(inner, "base_model", inner)
        out = None
        checked = getattr(inner, PLAIN_HEAD, False) and base is not inner
        if BASE_MODEL_NO_GRAD and checked and not torch.is_grad_enabled():
            # No gradient, head already checked: the base model's last hidden state alone.
            hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            plain_head = True
        else:
            # logits_to_keep=1: the model's own forward (so DDP and hooks see it) projects one position only.
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
            hidden = out.hidden_states[-1]
            with torch.no_grad():  # are logits exactly head(last hidden state)? Not with soft-capping or logit scaling.
                ulp = torch.finfo(out.logits.dtype).eps
                plain_head = torch.allclose(head(hidden[:, -1:]).float(), out.logits.float(), rtol=4 * ulp, atol=4 * ulp)
            if plain_head:
                setattr(inner, PLAIN_HEAD, True)
        if plain_head:
            hidden, wanted = hidden[:, :-1][mask], targets[mask]
            pieces = []
            for start in range(0, hidden.shape[0], CHUNK_TOKENS):
                h, y = hidden[start : start + CHUNK_TOKENS], wanted[start : start + CHUNK_TOKENS]
                t = None if temps is None else temps[start : start + CHUNK_TOKENS]
                if torch.is_grad_enabled():
                    pieces.append(checkpoint(stats, head, h, y, t, use_reentrant=False))
                else:
                    pieces.append(stats(head, h, y, t))
            if entropy:
                empty = hidden.new_zeros(0, dtype=torch.float32)
                logps = torch.cat([p[0] for p in pieces]) if pieces else empty
                ent = torch.cat([p[1] for p in pieces]) if pieces else empty
                return logps, ent, mask
            logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
            # The kept logit joins the graph at zero weight: the output layer gets a gradient even in a
            # batch without labels, which DDP needs on every process.
            return (logps if out is None else logps + out.logits.sum() * 0.0), None, mask
        log.warning("%s: logits are not the output layer applied to the last hidden state; computing full logits", type(inner).__name__)
        setattr(inner, FULL_LOGITS, True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    picked = scaled(logits[mask], temps)
    if entropy:
        logps, ent = logits_stats(picked, targets[mask])
        return logps, ent, mask
    return chunk_logps(picked, targets[mask]), None, mask


def scaled(logits: torch.Tensor, temps: torch.Tensor | None) -> torch.Tensor:
    """Logits (N, vocab) divided row by row by temps (N,), in fp32; unchanged when temps is None."""
    return logits if temps is None else logits.float() / temps.unsqueeze(-1)


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               temps: torch.Tensor | None = None) -> torch.Tensor:
    return chunk_logps(scaled(head(hidden), temps), targets)


def head_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               temps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return logits_stats(scaled(head(hidden), temps), targets)


def logits_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy -sum p log p of each row's distribution (entropy without gradient)."""
    logp = logits.float().log_softmax(-1)
    with torch.no_grad():
        ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), ent


def chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # -cross_entropy is log_softmax + gather without keeping the (N, vocab) log-softmax around.
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def per_sequence(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of flat per-token values back to their rows, and each row's token count."""
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)
    return sums, mask.sum(-1)
