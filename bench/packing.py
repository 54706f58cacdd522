"""SFT training-step throughput, padded against packed (and length-grouped), in the same run.

    nice -n 10 python bench/packing.py                  # CPU: tiny Qwen2, real 151,936-token vocabulary
    python bench/packing.py --layers 24 --hidden 896 --batch 8 --bf16   # GPU: Qwen2.5-0.5B's shape

Each mode trains the same model on micro-batches of --batch chats from smol-smoltalk-like data
(../shared/data/smoltalk_like, through the real Qwen2.5 chat template and alignkit's tokenisation):

  padded   the examples in a seeded random order, right-padded to the longest of each micro-batch
  grouped  the same examples length-grouped (train.group_by_length's order), padded
  packed   the same micro-batches as `padded`, each packed into one row (train.packing: a 4D
           block-diagonal mask under sdpa/eager)

One step is alignkit's SFT loss (label_logps), backward and an AdamW step. The modes alternate,
--reps times, each timing --steps steps (after one untimed warm-up step in the first rep); tokens/s counts real (unpadded)
tokens. Printed: one JSON line per timing, then the median tokens/s of each mode and the ratios
packed/padded and grouped/padded (the medians over the reps of the per-rep ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

SHARED = Path(os.environ.get("ALIGNKIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(SHARED / "models" / "qwen2.5-0.5b"), help="model config and tokenizer")
    ap.add_argument("--data", default=str(SHARED / "data" / "smoltalk_like"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="chats per micro-batch")
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--max-response-tokens", type=int, default=512)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode and rep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup-every-rep", action="store_true", help="an untimed step before every timing, not only the first")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.config import DataConfig, ModelConfig
    from alignkit.data.collate import collate_lm
    from alignkit.data.packing import length_grouped, pack_rows
    from alignkit.data.prepare import load_examples, tokenize_conversations
    from alignkit.models import load_tokenizer
    from alignkit.train.sft import sft_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chat = load_tokenizer(ModelConfig(name_or_path=args.config))
    data_cfg = DataConfig(dataset=args.data, split="train", max_examples=args.examples,
                          max_prompt_tokens=args.max_prompt_tokens, max_response_tokens=args.max_response_tokens)
    rows, _ = load_examples(data_cfg, "text", 0)
    examples = [dict(e) for e in tokenize_conversations(rows, chat, data_cfg, "tokenise")]
    config = AutoConfig.from_pretrained(args.config)
    heads = max(1, args.hidden // 64)
    values = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
    values |= {"num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
               "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2)}
    if args.layers == config.num_hidden_layers and args.hidden == config.hidden_size:
        values = config.to_dict()
    config = type(config).from_dict(values)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=args.attn).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(examples), generator=g).tolist()
    lengths = [len(e["input_ids"]) for e in examples]
    grouped = length_grouped(order, lengths, 50 * args.batch)
    batches = {
        "padded": [collate_lm([examples[i] for i in order[s : s + args.batch]], chat.pad_id)
                   for s in range(0, len(order) - args.batch + 1, args.batch)],
        "grouped": [collate_lm([examples[i] for i in grouped[s : s + args.batch]], chat.pad_id)
                    for s in range(0, len(grouped) - args.batch + 1, args.batch)],
    }
    batches["packed"] = [pack_rows(b) for b in batches["padded"]]
    real = sum(lengths[i] for i in order[: len(batches["padded"]) * args.batch])
    padded_tokens = sum(b["input_ids"].numel() for b in batches["padded"])
    grouped_tokens = sum(b["input_ids"].numel() for b in batches["grouped"])
    print(json.dumps({"examples": len(examples), "mean_tokens": round(statistics.mean(lengths), 1),
                      "max_tokens": max(lengths), "padding_share_padded": round(1 - real / padded_tokens, 3),
                      "padding_share_grouped": round(1 - real / grouped_tokens, 3),
                      "threads": torch.get_num_threads(), "device": str(device), "layers": args.layers,
                      "hidden": args.hidden, "attn": args.attn}), flush=True)

    def step(batch) -> int:
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp:
            out = sft_loss(model, batch)
        (out.loss_sum / max(out.count, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.tokens

    cursor = {mode: 0 for mode in batches}

    def next_batch(mode):
        b = batches[mode][cursor[mode] % len(batches[mode])]
        cursor[mode] += 1
        return b

    rates: dict[str, list[float]] = {mode: [] for mode in batches}
    for rep in range(args.reps):
        for mode in batches:
            if rep == 0 or args.warmup_every_rep:
                step(next_batch(mode))  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
            for _ in range(args.steps):
                tokens += step(next_batch(mode))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            rates[mode].append(tokens / seconds)
            print(json.dumps({"rep": rep, "mode": mode, "tokens": tokens, "seconds": round(seconds, 3),
                              "tokens_per_s": round(tokens / seconds, 1)}), flush=True)
    ratio = lambda mode: statistics.median(a / b for a, b in zip(rates[mode], rates["padded"]))
    print(json.dumps({"median_tokens_per_s": {m: round(statistics.median(v), 1) for m, v in rates.items()},
                      "packed_over_padded": round(ratio("packed"), 3), "grouped_over_padded": round(ratio("grouped"), 3)}))


if __name__ == "__main__":
    main()
