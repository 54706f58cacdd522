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
