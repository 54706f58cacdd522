"""Where an RL step's sampling time goes: alignkit's seeded sampler against transformers' own sampling, in one run.

Same tiny Qwen2 with the real 151,936-token vocabulary (bench/stages.py's model), same 4 prompts x 4 samples in
one call of 16 rows, 32 new tokens, temperature 1, no stop before the end; variants alternated --rounds times:
  transformers   model.generate(do_sample=True, num_return_sequences=4): softmax + multinomial (what TRL uses)
  seeded-before  alignkit.generation.generate with the SeededSampler as it was before issue 23 (a fresh
                 vocabulary-sized tensor per row and per operation at every step, then torch.stack)
  seeded         alignkit.generation.generate as it is (per-row uniforms drawn into one reused buffer,
                 Gumbel noise computed in place: the same samples bit for bit)
With --profile, cProfile of one `seeded` call: the share of the time in the sampler and in the model.

    python bench/stages.py --stages generate --reps 1 --steps 2 --out /tmp/s   # builds the model once
    python bench/rl_sampling.py --model /tmp/s/work/model --prompts /tmp/s/work/data/prompts.jsonl --profile
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from alignkit import generation
from alignkit.config import ModelConfig
from alignkit.data.chat import tokenize_prompt
from alignkit.data.collate import pad
from alignkit.generation import SamplingParams, SeededSampler, generate
from alignkit.models import load_tokenizer


def old_call(self, input_ids, scores):
    u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
    gumbel = -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))
    if self.noisy is not None:
        gumbel = gumbel * self.noisy.unsqueeze(-1)
    return scores.float() + gumbel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    chat = load_tokenizer(ModelConfig(name_or_path=args.model))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = [[{"role": "user", "content": json.loads(x)["prompt"]}] for x in open(args.prompts)][:4]
    stop = chat.stop_ids()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, n=4, seed=0)
    new = SeededSampler.__call__

    def transformers():
        enc = [tokenize_prompt(chat.tokenizer, p) for p in prompts]
        ids, mask = pad(enc, chat.pad_id, side="left"), pad([[1] * len(e) for e in enc], 0, side="left")
        cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                               num_return_sequences=4, eos_token_id=stop, pad_token_id=chat.pad_id)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)

    def seeded_before():
        SeededSampler.__call__ = old_call
        try:
            generate(model, chat, prompts, params, batch_size=64)
        finally:
            SeededSampler.__call__ = new

    def seeded():
        generate(model, chat, prompts, params, batch_size=64)

    times = {f.__name__: [] for f in (transformers, seeded_before, seeded)}
    seeded()  # warm-up
    for _ in range(args.rounds):
        for f in (transformers, seeded_before, seeded):
            t = time.perf_counter()
            f()
            times[f.__name__].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"seconds": med, "seeded_before_over_seeded": med["seeded_before"] / med["seeded"],
           "seeded_over_transformers": med["seeded"] / med["transformers"], "rounds": args.rounds}
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(seeded)
        stats = pstats.Stats(prof)
        total = stats.total_tt
        by = {f"{k[0].rsplit('/', 1)[-1]}:{k[2]}": v[3] for k, v in stats.stats.items()}
        sampler = sum(v for k, v in by.items() if k.endswith("generation.py:__call__"))
        forward = max((v for k, v in by.items() if k.endswith("modeling_qwen2.py:forward")), default=0.0)
        out["profile_seeded"] = {"total_s": total, "sampler_s": sampler, "model_forward_s": forward,
                                 "sampler_share": sampler / total, "forward_share": forward / total}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
