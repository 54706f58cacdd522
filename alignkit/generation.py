"""Generate replies to chat prompts with a Hugging Face model (batched, KV cache, left padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data.chat import tokenize_prompt
from .data.collate import pad


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn) or "length"


@torch.no_grad()
def generate(model, chat, prompts: list[list[dict]], params: SamplingParams, batch_size: int = 16, progress: bool = False) -> list[Completion]:
    """One completion per prompt, in prompt order. Prompts are batched longest first to limit padding."""
    tok = chat.tokenizer
    encoded = [tokenize_prompt(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    stop = chat.stop_ids()
    results: list[Completion | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="generate"):
        idx = order[start : start + batch_size]
        ids = pad([encoded[i] for i in idx], chat.pad_id, side="left").to(device)
        mask = pad([[1] * len(encoded[i]) for i in idx], 0, side="left").to(device)
        sampling = params.temperature > 0
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=params.top_k if sampling else None,
            eos_token_id=stop,
            pad_token_id=chat.pad_id,
        )
        for row, i in enumerate(idx):
            new = out[row, ids.shape[1] :].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop), None)
            finish = "stop" if cut is not None else "length"
            new = new[:cut] if cut is not None else new
            results[i] = Completion(tok.decode(new, skip_special_tokens=True), new, finish)
    model.train(was_training)
    return results  # type: ignore[return-value]
