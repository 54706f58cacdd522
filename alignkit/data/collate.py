"""Batch tokenised examples into padded tensors."""

from __future__ import annotations

import torch

from .chat import IGNORE_INDEX


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


def collate_lm(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels, right-padded to the longest example of the batch."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
    }


def collate_pairs(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected in one batch: rows [prompt+chosen_1..B, prompt+rejected_1..B].

    Labels are the reply tokens; carried reference log-probabilities become tensors.
    """
    seqs, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            seqs.append(e["prompt_ids"] + e[side])
            labels.append([IGNORE_INDEX] * len(e["prompt_ids"]) + e[side])
    batch = {
        "input_ids": pad(seqs, pad_token_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad(labels, IGNORE_INDEX),
    }
    if "ref_chosen_logps" in examples[0]:
        batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples], dtype=torch.float32)
    return batch


def collate_unpaired(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """KTO rows: prompt+completion (input_ids / attention_mask / labels), the boolean `label`, and the
    mismatched prompt+kl_completion (kl_input_ids / kl_attention_mask / kl_labels) for KTO's KL estimate.

    Carried reference log-probabilities (ref_logps, ref_kl_logps) become tensors.
    """
    batch = {}
    for prefix, side in (("", "completion_ids"), ("kl_", "kl_completion_ids")):
        seqs = [e["prompt_ids"] + e[side] for e in examples]
        batch[f"{prefix}input_ids"] = pad(seqs, pad_token_id)
        batch[f"{prefix}attention_mask"] = pad([[1] * len(s) for s in seqs], 0)
        labels = [[IGNORE_INDEX] * len(e["prompt_ids"]) + e[side] for e in examples]
        batch[f"{prefix}labels"] = pad(labels, IGNORE_INDEX)
    batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    for key in ("ref_logps", "ref_kl_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch
