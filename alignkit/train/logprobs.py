"""Log-probabilities of the labelled tokens of a batch, without the batch's full logits.

SFT, DPO and perplexity only need log p(label) where a label exists (the replies). With a 152k
vocabulary the full logits of a batch are the largest tensor in training (8 x 2048 tokens: 10 GB
in fp32, twice that with log_softmax). Here the model returns its last hidden states; the output
layer is applied only at labelled positions, in chunks, and under autograd each chunk's logits
are recomputed in the backward pass instead of being kept. Same numbers as the plain way
(`token_nll`, `sequence_logps` on full logits; tests check values and gradients). Models whose
logits are more than the output layer (soft-capping, scaling) are detected at the first batch,
by comparing the one logit the forward still computes, and get full logits.
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


def label_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each labelled token, flat in row-major order; the (B, T-1) mask of where they are).

    Position t of the model predicts labels[:, t + 1].
    """
    logps, _, mask = label_stats(model, input_ids, attention_mask, labels, entropy=False)
    return logps, mask


@torch.no_grad()
def label_logps_entropy(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """No gradient: (log p of each labelled token, the entropy of the model's distribution there, mask).

    For RL's sampling-time pass: the old log-probs and the policy's entropy from one forward.
    """
    return label_stats(model, input_ids, attention_mask, labels, entropy=True)


def label_stats(model, input_ids, attention_mask, labels, entropy: bool):
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    inner = extract_model_from_parallel(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    stats = head_stats if entropy else head_logps
    if head is not None and not getattr(inner, FULL_LOGITS, False):
        # logits_to_keep=1: the model's own forward (so DDP and hooks see it) projects one position only.
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        with torch.no_grad():  # are logits exactly head(last hidden state)? Not with soft-capping or logit scaling.
            ulp = torch.finfo(out.logits.dtype).eps
            plain_head = torch.allclose(head(hidden[:, -1:]).float(), out.logits.float(), rtol=4 * ulp, atol=4 * ulp)
        if plain_head:
            hidden, wanted = hidden[:, :-1][mask], targets[mask]
            pieces = []
            for start in range(0, hidden.shape[0], CHUNK_TOKENS):
                h, y = hidden[start : start + CHUNK_TOKENS], wanted[start : start + CHUNK_TOKENS]
                pieces.append(checkpoint(stats, head, h, y, use_reentrant=False) if torch.is_grad_enabled() else stats(head, h, y))
            if entropy:
                empty = hidden.new_zeros(0, dtype=torch.float32)
                logps = torch.cat([p[0] for p in pieces]) if pieces else empty
                ent = torch.cat([p[1] for p in pieces]) if pieces else empty
                return logps, ent, mask
            logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
            # The kept logit joins the graph at zero weight: the output layer gets a gradient even in a
            # batch without labels, which DDP needs on every process.
            return logps + out.logits.sum() * 0.0, None, mask
        log.warning("%s: logits are not the output layer applied to the last hidden state; computing full logits", type(inner).__name__)
        setattr(inner, FULL_LOGITS, True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    if entropy:
        logps, ent = logits_stats(logits[mask], targets[mask])
        return logps, ent, mask
    return chunk_logps(logits[mask], targets[mask]), None, mask


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return chunk_logps(head(hidden), targets)


def head_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits_stats(head(hidden), targets)


def logits_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy -sum p log p of each row's distribution."""
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # -cross_entropy is log_softmax + gather without keeping the (N, vocab) log-softmax around.
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def per_sequence(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of flat per-token values back to their rows, and each row's token count."""
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)
    return sums, mask.sum(-1)
