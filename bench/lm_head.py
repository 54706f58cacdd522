"""Training-step time and peak memory of the SFT loss: alignkit's labelled-positions-only log-probs
against its peers, measured in the same run on the same model, batch and device.

    python bench/lm_head.py                      # CPU: Qwen2.5-0.5B shape cut to 2 layers
    python bench/lm_head.py --layers 24 --batch 8 --seq 2048   # GPU: the whole 0.5B model

Variants (each runs in its own process, so peak memory is its own):
  full-logits  token_nll(model(...).logits, labels): every position's logits, upcast to fp32
  hf-loss      model(..., labels=labels).loss: transformers' built-in loss (the Trainer default)
  trl-fused    TRL's fused LM head (trl.trainer.utils.add_fused_lm_head), if TRL is installed
  alignkit     alignkit.train.logprobs.label_logps (chunked output layer at labelled positions)

The model is the Qwen2.5-0.5B config (from ../shared or --config) with random weights; the first
--prompt-frac of each sequence is a masked prompt. Peak memory: torch.cuda.max_memory_allocated on
a GPU; on a CPU, the peak resident set sampled every 2 ms minus the resident set before the first
step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = ["full-logits", "hf-loss", "trl-fused", "alignkit"]
DEFAULT_CONFIG = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "qwen2.5-0.5b"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.data.chat import IGNORE_INDEX
    from alignkit.train.logprobs import label_logps
    from alignkit.train.sft import token_nll

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(args.config)
    values = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # per-layer; rebuilt for the new depth
    config = type(config).from_dict(values | {"num_hidden_layers": args.layers})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    model.train()
    if args.variant == "trl-fused":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    attention = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : int(args.seq * args.prompt_frac)] = IGNORE_INDEX
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with amp:
            if args.variant == "full-logits":
                loss, _ = token_nll(model(input_ids=ids, attention_mask=attention).logits, labels)
            elif args.variant == "hf-loss":
                loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
            elif args.variant == "trl-fused":
                loss = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).loss
            else:
                loss = -label_logps(model, ids, attention, labels)[0].sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        threading.Thread(target=sample, daemon=True).start()
    times = []
    for k in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
    stop.set()
    used = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak[0]) - base
    return {"variant": args.variant, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "step_s": statistics.median(times), "peak_mem_gb": used / 2**30, "labelled_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="model config (folder or Hub id)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt-frac", type=float, default=0.3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as training on a GPU")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:  # a child: one variant, one JSON line
        print(json.dumps(measure(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{variant}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["variant"] == "full-logits"), rows[0])
    print(f"device {rows[0]['device']}, layers {args.layers}, batch {args.batch} x {args.seq} tokens, "
          f"{rows[0]['labelled_tokens']} labelled, bf16 autocast {args.bf16}, median of {args.steps} steps")
    print(f"{'variant':<12} {'step s':>8} {'x full':>7} {'peak GiB':>9} {'x full':>7}")
    for r in rows:
        print(f"{r['variant']:<12} {r['step_s']:>8.3f} {r['step_s'] / base['step_s']:>7.2f} {r['peak_mem_gb']:>9.2f} {r['peak_mem_gb'] / base['peak_mem_gb']:>7.2f}")


if __name__ == "__main__":
    main()
