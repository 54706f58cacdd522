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
