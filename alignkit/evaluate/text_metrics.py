"""Perplexity on held-out chats, and BLEU of generated replies against reference replies.

`alignkit text-metrics` computes both for one model on one chat set: perplexity of the
reference replies (assistant tokens only, as SFT trains them) and corpus BLEU-4 of greedy
replies to the same prompts. Its data section has only the options it honours (no token
limits, filters or eval split: every row read is measured).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig
from ..data.chat import tokenize_chat
from ..data.collate import collate_lm
from ..generation import SamplingParams, generate


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al., 2002) on whitespace tokens, one reference each, in [0, 100]."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hn, rn = ngrams(h, n), ngrams(r, n)
            matches[n - 1] += sum(min(c, rn[g]) for g, c in hn.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity * math.exp(log_precision)


@torch.no_grad()
def perplexity(model, chat, conversations: list[list[dict]], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood per assistant token) over all conversations."""
    from ..train.logprobs import label_logps

    model.eval()
    device = next(model.parameters()).device
    examples = [vars(tokenize_chat(chat.tokenizer, m, chat.end_of_turn)) for m in conversations]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_lm(examples[start : start + batch_size], chat.pad_id)
        logps, mask = label_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device))
        total, count = total - logps.sum().item(), count + int(mask.sum())
    return math.exp(total / max(count, 1))


@dataclass
class TextMetricsData:
    dataset: str = "HuggingFaceTB/smol-smoltalk"
    """Hub dataset id, a local JSONL/JSON/Parquet file, a folder of such files named by split, or a saved dataset."""
    subset: str | None = None
    """Dataset config name on the Hub (the `name` argument of load_dataset)."""
    split: str = "test"
    max_examples: int | None = 500
    """Measure this many rows (after a seeded shuffle); unset measures all."""
    first_turn_only: bool = True
    """Keep only the first user/assistant exchange (and a leading system message)."""
    skip_invalid: bool = False
    """Skip (and count) invalid rows instead of stopping with an error."""


def as_data_config(data) -> DataConfig:
    """The loader's DataConfig with only the fields text-metrics honours (from either section type)."""
    return DataConfig(**{f.name: getattr(data, f.name) for f in dataclasses.fields(TextMetricsData)})


@dataclass
class TextMetricsConfig:
    output_dir: str = "runs/text-metrics"
    seed: int = 42
    batch_size: int = 8
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TextMetricsData = field(default_factory=TextMetricsData)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=256))


def run_text_metrics(cfg: TextMetricsConfig) -> Path:
    from ..data.prepare import load_examples
    from ..data.schema import first_turn
    from ..models import load_causal_lm, load_tokenizer

    chat = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, chat).to("cuda" if torch.cuda.is_available() else "cpu")
    rows, _ = load_examples(as_data_config(cfg.data), "conversation", cfg.seed)
    chats = [first_turn(r["messages"]) if cfg.data.first_turn_only else r["messages"] for r in rows]
    ppl = perplexity(model, chat, chats, cfg.batch_size)
    last_reply = [max(k for k, m in enumerate(c) if m["role"] == "assistant") for c in chats]
    prompts = [c[:k] for c, k in zip(chats, last_reply)]
    references = [c[k]["content"] for c, k in zip(chats, last_reply)]
    replies = [c[0].text for c in generate(model, chat, prompts, cfg.sampling, cfg.batch_size)]
    result = {"model": cfg.model.name_or_path, "dataset": cfg.data.dataset, "n": len(chats), "perplexity": ppl, "bleu": corpus_bleu(replies, references)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_metrics.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return out
