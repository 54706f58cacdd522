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
Packed rows (`data.packing.pack_rows`, with position_ids) run with each sequence attending only to
itself (`packed_attention`), and their label mask comes back with one row per sequence.
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
                temperature: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each labelled token, flat in row-major order; the (B, T-1) mask of where they are).

    Position t of the model predicts labels[:, t + 1]. temperature: None, or one per row (B,): the
    row's logits are divided by it (log-probs of the distribution its tokens were sampled from).
    position_ids: a packed row's (`data.packing.pack_rows`): the mask returned then has one row per
    packed sequence (so per-row code reads it as the padded batch's), and sequences do not attend
    to each other (`packed_attention`).
    """
    logps, _, mask = label_stats(model, input_ids, attention_mask, labels, entropy=False,
                                 temperature=temperature, position_ids=position_ids)
    return logps, mask


def label_logps_entropy(model, input_ids, attention_mask, labels,
                        temperature: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each labelled token, the entropy of the model's distribution there (no gradient), mask).

    RL's passes: the log-probs and the policy's entropy from one forward (no gradient flows through
    the entropy; the log-probs have one under autograd).
    """
    return label_stats(model, input_ids, attention_mask, labels, entropy=True, temperature=temperature,
                       position_ids=position_ids)


def label_stats(model, input_ids, attention_mask, labels, entropy: bool,
                temperature: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
    from ..models import AdaptersOff, is_peft_model

    if isinstance(model, AdaptersOff):  # LoRA's reference: the policy's base, adapters disabled for this pass
        with model.peft_model.disable_adapter():
            return label_stats(model.peft_model, input_ids, attention_mask, labels, entropy, temperature, position_ids)
    inner = extract_model_from_parallel(model)
    if is_peft_model(inner):  # the transformers model, its adapters injected in place
        inner = inner.get_base_model()
    attend = {"attention_mask": attention_mask}
    if position_ids is not None:
        input_ids, labels, position_ids, attend = packed_inputs(inner, input_ids, attention_mask, position_ids, labels)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask if position_ids is None else sequence_rows(mask, position_ids)  # one row per sequence
    temps = None
    if temperature is not None:  # one per labelled token, in the flat order of the labelled positions
        temps = temperature.to(device=input_ids.device, dtype=torch.float32)[rows.nonzero()[:, 0]]
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    stats = head_stats if entropy else head_logps
    if head is not None and not getattr(inner, FULL_LOGITS, False):
        base = getattr(inner, "base_model", inner)
        out = None
        checked = getattr(inner, PLAIN_HEAD, False) and base is not inner
        if BASE_MODEL_NO_GRAD and checked and not torch.is_grad_enabled():
            # No gradient, head already checked: the base model's last hidden state alone.
            hidden = base(input_ids=input_ids, **attend).last_hidden_state
            plain_head = True
        else:
            # logits_to_keep=1: the model's own forward (so DDP and hooks see it) projects one position only.
            out = model(input_ids=input_ids, **attend, output_hidden_states=True, logits_to_keep=1)
            hidden = out.hidden_states[-1]
            with torch.no_grad():  # are logits exactly head(last hidden state)? Not with soft-capping or logit scaling.
                ulp = torch.finfo(out.logits.dtype).eps
                plain_head = torch.allclose(head(hidden[:, -1:]).float(), out.logits.float(), rtol=4 * ulp, atol=4 * ulp)
            if plain_head:
                setattr(inner, PLAIN_HEAD, True)
        if plain_head:
            hidden, wanted = hidden[:, :-1][mask], targets[mask]
            pieces = []
            fused = torch.is_grad_enabled() and not entropy and FUSED_HEAD and fusable(head)
            for start in range(0, hidden.shape[0], CHUNK_TOKENS):
                h, y = hidden[start : start + CHUNK_TOKENS], wanted[start : start + CHUNK_TOKENS]
                t = None if temps is None else temps[start : start + CHUNK_TOKENS]
                if fused:
                    pieces.append(fused_head_logps(head.weight, h, y, t))
                elif torch.is_grad_enabled():
                    pieces.append(checkpoint(stats, head, h, y, t, use_reentrant=False))
                else:
                    pieces.append(stats(head, h, y, t))
            if entropy:
                empty = hidden.new_zeros(0, dtype=torch.float32)
                logps = torch.cat([p[0] for p in pieces]) if pieces else empty
                ent = torch.cat([p[1] for p in pieces]) if pieces else empty
                return logps, ent, rows
            logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
            # The kept logit joins the graph at zero weight: the output layer gets a gradient even in a
            # batch without labels, which DDP needs on every process.
            return (logps if out is None else logps + out.logits.sum() * 0.0), None, rows
        log.warning("%s: logits are not the output layer applied to the last hidden state; computing full logits", type(inner).__name__)
        setattr(inner, FULL_LOGITS, True)
    logits = model(input_ids=input_ids, **attend).logits[:, :-1]
    picked = scaled(logits[mask], temps)
    if entropy:
        logps, ent = logits_stats(picked, targets[mask])
        return logps, ent, rows
    return chunk_logps(picked, targets[mask]), None, rows


def scaled(logits: torch.Tensor, temps: torch.Tensor | None) -> torch.Tensor:
    """Logits (N, vocab) divided row by row by temps (N,), in fp32; unchanged when temps is None."""
    return logits if temps is None else logits.float() / temps.unsqueeze(-1)


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               temps: torch.Tensor | None = None) -> torch.Tensor:
    return chunk_logps(scaled(head(hidden), temps), targets)


def head_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               temps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return logits_stats(scaled(head(hidden), temps), targets)


FUSED_HEAD = True
"""Labelled log-probs under autograd through `HeadLogps` (False: the checkpointed head and
cross-entropy, as before)."""


def fusable(head: torch.nn.Module) -> bool:
    """A plain, bias-free, unsharded nn.Linear with no hooks: its weight alone is the output layer.

    Anything else (a LoRA-wrapped head, FSDP2's DTensor or ZeRO-3's partitioned weight, hooks that
    gather or change it) goes through the module's own forward."""
    w = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and head.bias is None and type(w) is torch.nn.Parameter
            and w.dim() == 2 and w.numel() == head.in_features * head.out_features
            and not head._forward_hooks and not head._forward_pre_hooks)


def fused_head_logps(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                     temps: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) of each row of hidden under the output layer `weight` (vocab, hidden), as
    `head_logps`, but the backward pass recomputes the (N, vocab) logits once and turns that one
    buffer into the gradient in place (no log-softmax or cross-entropy buffers kept or rebuilt)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    inv = None if temps is None else temps.float().reciprocal()
    return HeadLogps.apply(hidden, weight, targets, inv, dtype)


class HeadLogps(torch.autograd.Function):
    """Forward: logits = hidden @ weight.T in `dtype` (autocast's, as the module would run), scaled
    row-wise by 1/temperature, in fp32; keeps only the log-sum-exp. Backward: d log p(y) / d logits =
    onehot(y) - softmax, times the incoming gradient (and 1/temperature), then the two matmuls."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            logits = (hidden.to(dtype) @ weight.to(dtype).T).float()
            if inv is not None:
                logits.mul_(inv.unsqueeze(-1))
            picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            top = logits.amax(-1)
            lse = logits.sub_(top.unsqueeze(-1)).exp_().sum(-1).log_().add_(top)  # in place: one buffer
            picked = picked - lse
        ctx.save_for_backward(hidden, weight, targets, inv, lse)
        ctx.dtype = dtype
        return picked

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, inv, lse = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            g = (h @ w.T).float()
            scale = grad.float()
            if inv is not None:  # the logits were scaled by 1/temperature: so is their gradient
                g.mul_(inv.unsqueeze(-1))
                scale = scale * inv
            g.sub_(lse.unsqueeze(-1)).exp_().neg_()  # -softmax
            g.scatter_add_(-1, targets.unsqueeze(-1), torch.ones_like(lse).unsqueeze(-1))  # + onehot(y)
            g.mul_(scale.unsqueeze(-1))
            g = g.to(dtype)
            grad_hidden = (g @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (g.T @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


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


# --------------------------------------------------------------------------- packed rows (data.packing.pack_rows)


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) number of the packed sequence each position belongs to, counted over the whole batch."""
    return (position_ids.reshape(-1) == 0).cumsum(0).sub(1).view(position_ids.shape)


def sequence_rows(mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Packed rows' (B, T-1) label mask as (sequences, B*(T-1)): row j marks sequence j's labelled positions.

    Sequences lie one after another in row-major order, so this mask's order of labelled positions is the
    packed rows', and a sequence without labels still has its (empty) row, as in the padded batch.
    """
    seq = sequence_starts(position_ids)[:, 1:].reshape(-1)  # the sequence of each target position (t + 1)
    where = mask.reshape(-1).nonzero()[:, 0]
    n = int((position_ids == 0).sum())
    rows = torch.zeros(n, seq.numel(), dtype=torch.bool, device=mask.device)
    rows[seq[where], where] = True
    return rows


def uses_varlen(model) -> bool:
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager")
    return any(k in impl for k in FLASH_VARLEN)


def packed_inputs(model, input_ids, attention_mask, position_ids, labels=None):
    """(input_ids, labels, position_ids, forward's attention arguments) of packed rows for this model.

    Under FlashAttention the rows' real tokens become one row (transformers' varlen path takes one row);
    else the rows stay and get a block-diagonal mask (`packed_attention`).
    """
    if uses_varlen(model) and input_ids.shape[0] > 1:
        keep = attention_mask.bool()
        input_ids, position_ids = input_ids[keep].unsqueeze(0), position_ids[keep].unsqueeze(0)
        labels = None if labels is None else labels[keep].unsqueeze(0)
    return input_ids, labels, position_ids, packed_attention(model, position_ids)


FLASH_VARLEN = ("flash", "kernels")
"""attn_implementation names (substrings) whose transformers path turns packed position_ids into
cu_seqlens for FlashAttention's variable-length kernel."""


def packed_attention(model, position_ids: torch.Tensor) -> dict:
    """Forward arguments under which a packed row's sequences do not attend to each other.

    FlashAttention (flash_attention_2/3, kernels): no attention mask, position_ids (transformers derives
    cu_seqlens from where they restart). Else (sdpa, eager, ...): a 4D block-diagonal causal mask
    (bool; additive floats for eager), which transformers takes as given: with sdpa or eager, position_ids
    with a 2D mask would let every token see the earlier sequences of its row.
    """
    if uses_varlen(model):
        return {"attention_mask": None, "position_ids": position_ids}
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager")
    seq = sequence_starts(position_ids)
    n = seq.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
    allowed = ((seq.unsqueeze(-1) == seq.unsqueeze(-2)) & causal).unsqueeze(1)  # (B, 1, T, T)
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=seq.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"attention_mask": allowed, "position_ids": position_ids}
