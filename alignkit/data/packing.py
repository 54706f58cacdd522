"""Padding-free batches: several tokenised sequences in one row, and how rows are filled to a budget.

`pack_rows` turns a padded batch of this package's collates (attention_mask 1 on real tokens) into
packed rows: the rows' real tokens one after another, several sequences to a row, `position_ids`
restarting at 0 for each sequence, the first token of each sequence unlabelled (nothing of its own
sequence precedes it). Rows are as long as the batch's longest sequence, so attention under a mask
never costs more than the padded batch's (one row of all sequences would cost (sum of lengths)^2);
FlashAttention's variable-length path runs the real tokens as one row instead. Per-row tensors (DPO's reference log-probs, RL's advantages, ...) stay as they are: the
sequences keep their rows' order, and `train.logprobs.label_logps` gives back one row per sequence.
Which token may attend to which is the forward pass's business (`train.logprobs.packed_attention`).

`token_budget_bins` fills micro-batches up to `train.max_tokens_per_batch`: packed (the sum of the
sequences' tokens), or padded (rows x the longest row). `length_grouped` reorders a permutation so
that a padded micro-batch holds sequences of similar length (the cheaper alternative to packing).

Simplifications: rows are filled in order (next fit), not optimally; a sequence is never split (one longer than the
budget is an error up front, never cut); an example's rows (a DPO pair's chosen and rejected) stay
in one micro-batch. The budget's bins are made once per run (best-fit decreasing on lengths, as
TRL's packing) and only their order is shuffled each epoch, so which sequences share a micro-batch
does not change between epochs. KTO's mismatched rows (kl_*) stay padded: only its loss pass packs.
"""

from __future__ import annotations

import bisect

import torch

from .chat import IGNORE_INDEX

ROW_KEYS = ("input_ids", "attention_mask", "labels")
"""The per-token tensors `pack_rows` packs; every other tensor of a batch is per row (or flat per token)."""


def pack_rows(batch: dict, row_tokens: int | None = None) -> dict:
    """The batch's sequences without padding, several to a row, with position_ids restarting per sequence.

    Sequences keep their order and fill rows one after another (a row is closed when the next sequence
    does not fit in max(row_tokens, the longest sequence) tokens); unset row_tokens: rows as long as the
    batch's longest sequence, so the batch never has more rows, nor longer ones, than the padded one.
    The end of a short row is padding (attention_mask 0, unlabelled) whose position ids continue its last
    sequence's, so it belongs to that sequence and nothing attends to it.
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(-1).tolist()
    if min(lengths) == 0:
        raise ValueError("pack_rows: a row of the batch has no tokens")
    width = max(row_tokens or 0, max(lengths))
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    width = max(sum(lengths[i] for i in r) for r in rows)
    shape = (len(rows), width)
    ids = torch.zeros(shape, dtype=batch["input_ids"].dtype)
    labels = torch.full(shape, IGNORE_INDEX, dtype=batch["labels"].dtype)
    positions = torch.zeros(shape, dtype=torch.long)
    attention = torch.zeros(shape, dtype=batch["attention_mask"].dtype)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at : at + n] = batch["input_ids"][i][mask[i]]
            labels[r, at + 1 : at + n] = batch["labels"][i][mask[i]][1:]  # the first token: nothing of its own before it
            positions[r, at : at + n] = torch.arange(n)
            attention[r, at : at + n] = 1
            at += n
        positions[r, at:] = torch.arange(lengths[members[-1]], lengths[members[-1]] + width - at)
    out = dict(batch)
    out.update(input_ids=ids, labels=labels, position_ids=positions, attention_mask=attention)
    return out


def packed_collate(collate):
    """`collate` followed by `pack_rows`."""

    def packed(examples):
        return pack_rows(collate(examples))

    return packed


def _column(data, name: str) -> list:
    if hasattr(data, "column_names"):  # a datasets.Dataset: one column read, not one row at a time
        return data[name]
    return [e[name] for e in data]


def example_sizes(data) -> list[tuple[int, int, int]]:
    """(tokens, rows, longest row) of each example as the trainers collate it.

    SFT rows: one sequence; preference pairs: prompt + chosen and prompt + rejected (two rows, one
    example: they stay together); KTO rows: prompt + completion (the packed loss pass).
    """
    names = data.column_names if hasattr(data, "column_names") else list(data[0].keys()) if len(data) else []
    if "input_ids" in names:
        return [(len(x), 1, len(x)) for x in _column(data, "input_ids")]
    if "chosen_ids" in names:
        prompts, chosen, rejected = (_column(data, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        return [(2 * len(p) + len(c) + len(r), 2, len(p) + max(len(c), len(r)))
                for p, c, r in zip(prompts, chosen, rejected)]
    if "completion_ids" in names:
        return [(len(p) + len(c), 1, len(p) + len(c))
                for p, c in zip(_column(data, "prompt_ids"), _column(data, "completion_ids"))]
    raise ValueError(f"cannot size examples with columns {names}")


def budget_cost(sizes: list[tuple[int, int, int]], packed: bool) -> int:
    """Tokens a micro-batch of these examples occupies: packed, their sum; padded, rows x longest row."""
    if packed:
        return sum(s[0] for s in sizes)
    return sum(s[1] for s in sizes) * max(s[2] for s in sizes)


def token_budget_bins(sizes: list[tuple[int, int, int]], budget: int, packed: bool) -> list[list[int]]:
    """Example indices per micro-batch, each within `budget` tokens (see `budget_cost`); deterministic.

    Packed: best-fit decreasing on the examples' tokens (each goes into the fullest bin it fits).
    Padded: examples sorted by longest row, longest first, cut into consecutive runs that fit (each
    micro-batch then holds sequences of similar length). Indices within a bin ascend.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][0 if packed else 2], i))
    bins: list[list[int]] = []
    if packed:
        free: list[tuple[int, int]] = []  # (room left, bin number), sorted
        for i in order:
            need = sizes[i][0]
            at = bisect.bisect_left(free, (need, -1))
            if at == len(free):
                bins.append([i])
                bisect.insort(free, (budget - need, len(bins) - 1))
            else:
                room, b = free.pop(at)
                bins[b].append(i)
                bisect.insort(free, (room - need, b))
    else:
        rows = width = 0
        for i in order:
            r, w = sizes[i][1], sizes[i][2]
            if bins and (rows + r) * max(width, w) <= budget:
                bins[-1].append(i)
                rows, width = rows + r, max(width, w)
            else:
                bins.append([i])
                rows, width = r, w
    return [sorted(b) for b in bins]


def check_budget(sizes: list[tuple[int, int, int]], budget: int, packed: bool, what: str = "example") -> None:
    """Every example must fit one micro-batch on its own; else a ValueError naming the longest."""
    costs = [budget_cost([s], packed) for s in sizes]
    if not costs:
        return
    worst = max(range(len(costs)), key=costs.__getitem__)
    if costs[worst] > budget:
        how = "tokens" if packed else f"tokens padded ({sizes[worst][1]} rows x {sizes[worst][2]})"
        raise ValueError(
            f"train.max_tokens_per_batch: {budget} is less than {what} {worst}'s {costs[worst]} {how}, the longest "
            "(sequences are never split, and a preference pair's chosen and rejected stay in one micro-batch); "
            f"raise it to at least {costs[worst]} or shorten the data (data.max_prompt_tokens, "
            "data.max_response_tokens)"
        )


def length_grouped(perm: list[int], lengths: list[int], megabatch: int) -> list[int]:
    """`perm` cut into runs of `megabatch`, each run sorted by length, longest first (stable).

    Consecutive micro-batches then hold sequences of similar length, while the run order stays
    random (HF's LengthGroupedSampler, without its moving the longest batch first).
    """
    out: list[int] = []
    for start in range(0, len(perm), megabatch):
        run = perm[start : start + megabatch]
        out += sorted(run, key=lambda i: -lengths[i])
    return out
