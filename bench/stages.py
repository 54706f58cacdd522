"""Whole stages, alignkit against TRL, on identical work in the same run: tokens/s, peak memory, ratio.

    nice -n 10 python bench/stages.py --stages sft,dpo,grpo,rloo,generate --reps 3     # CPU, tiny model
    python bench/stages.py --size 0.5b --device cuda --stages sft,dpo --reps 2        # GPU (bench/gpu.sh)
    python bench/stages.py --stages sft --ak train.packing=true                       # alignkit options

Both sides get the same model (a Qwen2 with the real 151,936-token vocabulary and tokenizer from
../shared/models/qwen2.5-0.5b: `tiny` shrinks the config to 2 layers of width 64 for a CPU, `0.5b` is
the full architecture; random weights), the same rows (first turns of ../shared/data/smoltalk_like,
pairs of ../shared/data/ultrafeedback_binarized, prompts of the latter; rows longer than --max-length
tokens under the chat template are left out, so neither side truncates), the same micro-batch,
gradient accumulation, optimizer steps, precision (fp32 on a CPU, bf16 mixed precision on a GPU) and
the same loss on the same tokens:
  sft       alignkit sft (loss on assistant tokens)      TRL SFTTrainer, assistant_only_loss=True
  dpo       alignkit dpo (sigmoid, beta 0.1, reference log-probs precomputed)
                                                         TRL DPOTrainer, sigmoid, precompute_ref_log_probs=True
  grpo      alignkit rl, algo grpo                       TRL GRPOTrainer
  rloo      alignkit rl, algo rloo                       TRL RLOOTrainer
            (both RL: 4 prompts a step, k = 4, 32 new tokens, temperature 1, beta 0.04, reward `length_reward`)
  generate  alignkit.generation.generate (per-sample seeded sampling, n = 4)
                                                         transformers' model.generate(do_sample=True), what TRL
                                                         samples with; same prompts, rows per call, stop tokens
Each (stage, side, repetition) runs in its own process; within a repetition the two sides alternate
which goes first, so load from other jobs on the machine hits both alike. Steady state: the time
between the end of optimizer step --warmup and the end of the last step (generate: calls after
--warmup), with the non-padding input tokens processed in those steps (each side counts its own batches:
its chat template may add a token or two). Peak memory: the process's peak resident set (CPU: whole
process, libraries included) or torch.cuda.max_memory_allocated (GPU). MFU (GPU): 6 x parameters x
tokens (output layer at every position, for both sides alike) over the device's bf16 dense peak.
Ratios: alignkit over TRL tokens/s (RL: TRL's step time over alignkit's), medians over repetitions.
--ak KEY=VALUE passes a dotted alignkit option (e.g. train.packing=true) to alignkit's stages only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHARED = Path(os.environ.get("ALIGNKIT_SHARED", HERE.parents[2] / "shared"))  # as tests/conftest.py
STAGES = ["sft", "dpo", "grpo", "rloo", "generate"]
RL_STAGES = {"grpo", "rloo"}
TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
TRAINING_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- elif not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
"""Qwen2.5's template for plain chats with TRL's {% generation %} markers around each reply and its <|im_end|>
(TRL cannot patch the base model's template itself); it renders the same tokens as the checkpoint's."""
RL = {"prompts": 4, "k": 4, "max_new_tokens": 32, "beta": 0.04, "temperature": 1.0}


def length_reward(prompt, response, **_) -> float:
    """The RL reward of both sides: closeness of the reply's length to 60 characters (deterministic, cheap)."""
    return -abs(len(response) - 60) / 60


def trl_length_reward(prompts, completions, **_) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [length_reward(None, t) for t in texts]


# --------------------------------------------------------------------------- the shared work


def settings(args) -> dict:
    tiny = args.size == "tiny"
    return {
        "size": args.size, "device": args.device, "steps": args.steps, "rl_steps": args.rl_steps or args.steps,
        "warmup": args.warmup,
        "max_length": args.max_length or (512 if tiny else 1024),
        "sft_batch": args.batch or (4 if tiny else 8), "dpo_batch": args.dpo_batch or (2 if tiny else 4),
        "grad_accum": args.grad_accum, "precision": "bf16" if args.device == "cuda" else "fp32",
        "rl": RL, "gen_prompts": 16, "gen_n": 4, "gen_rows_per_call": 16, "gen_new_tokens": 32,
        "alignkit_options": args.ak,
    }


def prepare(work: Path, s: dict) -> None:
    """The model and the three data files, written once per run and read by every child."""
    from alignkit.models import init_model
    from transformers import AutoTokenizer

    src = SHARED / "models" / "qwen2.5-0.5b"
    if not (work / "model" / "config.json").is_file():
        init_model(str(src), work / "model", overrides=TINY if s["size"] == "tiny" else {}, seed=0)
    tok = AutoTokenizer.from_pretrained(work / "model")
    (work / "data").mkdir(parents=True, exist_ok=True)
    n_sft = s["sft_batch"] * s["grad_accum"] * s["steps"]
    n_dpo = s["dpo_batch"] * s["grad_accum"] * s["steps"]

    def length(messages) -> int:
        return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    rows = []
    with open(SHARED / "data" / "smoltalk_like" / "train.jsonl") as f:
        for line in f:
            m = json.loads(line)["messages"]
            first = [x for x in m[:2]]
            if [x["role"] for x in first] == ["user", "assistant"] and length(first) <= s["max_length"]:
                rows.append({"messages": first})
            if len(rows) == n_sft:
                break
    write(work / "data" / "sft.jsonl", rows)
    pairs, prompts = [], []
    with open(SHARED / "data" / "ultrafeedback_binarized" / "train_prefs.jsonl") as f:
        for line in f:
            r = json.loads(line)
            ok = all(len(r[c]) == 2 and r[c][0]["role"] == "user" for c in ("chosen", "rejected"))
            if len(pairs) < n_dpo and ok and max(length(r["chosen"]), length(r["rejected"])) <= s["max_length"]:
                pairs.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
            if len(prompts) < 64 and len(r["prompt"]) < 400:
                prompts.append({"prompt": r["prompt"]})
            if len(pairs) == n_dpo and len(prompts) == 64:
                break
    write(work / "data" / "dpo.jsonl", pairs)
    write(work / "data" / "prompts.jsonl", prompts)


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- one measurement (a child)


class Meter:
    """Step-end times and cumulative tokens; steady state from step `warmup` on."""

    def __init__(self, warmup: int):
        self.warmup, self.ends, self.tokens, self.counted = warmup, [], [], 0

    def step_end(self) -> None:
        sync()
        self.ends.append(time.perf_counter())
        self.tokens.append(self.counted)

    def result(self) -> dict:
        w = self.warmup
        if len(self.ends) <= w:
            raise RuntimeError(f"{len(self.ends)} steps measured; --steps must exceed --warmup ({w})")
        start_t, start_tok = (self.ends[w - 1], self.tokens[w - 1]) if w > 0 else (self.t0, 0)
        dt = self.ends[-1] - start_t
        steps = len(self.ends) - w
        return {"timed_steps": steps, "step_s": dt / steps, "tokens_per_step": (self.tokens[-1] - start_tok) / steps,
                "tokens_per_s": (self.tokens[-1] - start_tok) / dt}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(stage: str, side: str, work: Path, s: dict) -> dict:
    import torch

    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    meter = Meter(s["warmup"])
    meter.t0 = t0
    fn = {"alignkit": run_alignkit, "trl": run_trl}[side]
    extra = fn(stage, work, s, meter) or {}
    out = {"stage": stage, "side": side, **meter.result(), "wall_s": time.perf_counter() - t0, **extra}
    if torch.cuda.is_available():
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["device_name"] = torch.cuda.get_device_name()
    else:
        out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        out["device_name"] = "cpu"
    return out


def ak_overrides(stage: str, work: Path, s: dict) -> dict:
    out = str(work / "runs" / f"ak-{stage}-{os.getpid()}")
    batch = s["dpo_batch"] if stage == "dpo" else RL["prompts"] if stage in RL_STAGES else s["sft_batch"]
    o = {"output_dir": out, "seed": 0, "quiet": True, "model.name_or_path": str(work / "model"),
         "train.max_steps": steps_of(stage, s), "train.batch_size": batch,
         "train.grad_accum": 1 if stage in RL_STAGES else s["grad_accum"],
         "train.learning_rate": 1e-6, "train.scheduler": "constant", "train.save_steps": None,
         "train.logging_steps": 1 if stage in RL_STAGES else 1000, "train.precision": s["precision"]}
    return o


def steps_of(stage: str, s: dict) -> int:
    return s["rl_steps"] if stage in RL_STAGES else s["steps"]


def run_alignkit(stage: str, work: Path, s: dict, meter: Meter) -> dict | None:
    from alignkit import config as C
    from alignkit.cli import quiet_third_party
    from alignkit.train.loop import Callback, read_metrics

    quiet_third_party()

    class Clock(Callback):
        def on_step_end(self, state, logs) -> None:
            meter.counted = state.tokens_seen
            meter.step_end()

    user = dict(kv.split("=", 1) for kv in s["alignkit_options"])
    o = ak_overrides(stage, work, s)
    if stage == "sft":
        from alignkit.train.sft import SFTConfig, run_sft

        cfg = C.load(SFTConfig, None, o | {"data.dataset": str(work / "data" / "sft.jsonl")} | user)
        run_sft(cfg, callbacks=[Clock()])
    elif stage == "dpo":
        from alignkit.train.dpo import DPOConfig, run_dpo

        cfg = C.load(DPOConfig, None, o | {"data.dataset": str(work / "data" / "dpo.jsonl"), "data.split": "train",
                                           "data.eval_split": None, "dpo.beta": 0.1, "train.warmup_ratio": 0.0} | user)
        run_dpo(cfg, callbacks=[Clock()])
    elif stage in RL_STAGES:
        from alignkit.train.rl import RLConfig, run_rl

        sys.path.insert(0, str(HERE.parent))
        rl = {"rl.algo": stage, "rl.k": RL["k"], "rl.max_new_tokens": RL["max_new_tokens"], "rl.beta": RL["beta"],
              "rl.temperature": RL["temperature"], "rl.log_samples_steps": 0,
              "prompts.dataset": str(work / "data" / "prompts.jsonl"), "prompts.split": "train",
              "reward.kind": "rule", "reward.rule": "stages:length_reward", "reward.allow_python_verifier": True}
        cfg = C.load(RLConfig, None, o | rl | user)
        run_rl(cfg, callbacks=[Clock()])
        rows = read_metrics(Path(cfg.output_dir))[s["warmup"]:]
        return {k: statistics.median(r[k] for r in rows) for k in ("time_sample_s", "time_logprobs_s") if rows and k in rows[0]}
    elif stage == "generate":
        return run_generate("alignkit", work, s, meter)
    return None


def run_generate(side: str, work: Path, s: dict, meter: Meter) -> dict:
    """n samples of each prompt, `gen_rows_per_call` sequences per call; the same prompts and calls both sides."""
    import torch

    from alignkit.config import ModelConfig
    from alignkit.data.chat import tokenize_prompt
    from alignkit.data.collate import pad
    from alignkit.generation import SamplingParams, generate
    from alignkit.models import load_tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = torch.device(s["device"])
    chat = load_tokenizer(ModelConfig(name_or_path=str(work / "model")))
    dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype).to(device).eval()
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in read(work / "data" / "prompts.jsonl")[: s["gen_prompts"]]]
    n, per_call = s["gen_n"], s["gen_rows_per_call"] // s["gen_n"]
    params = SamplingParams(max_new_tokens=s["gen_new_tokens"], temperature=1.0, n=n, seed=0)
    stop = chat.stop_ids()
    new_tokens = 0
    calls = [prompts[i : i + per_call] for i in range(0, len(prompts), per_call)]
    for c in range(s["warmup"] + s["steps"]):
        batch = calls[c % len(calls)]
        if side == "alignkit":
            res = generate(model, chat, batch, params, batch_size=s["gen_rows_per_call"])
            new_tokens += sum(len(x.token_ids) + (x.stop_id is not None) for r in res for x in r)
        else:
            enc = [tokenize_prompt(chat.tokenizer, p) for p in batch]
            ids = pad(enc, chat.pad_id, side="left").to(device)
            mask = pad([[1] * len(e) for e in enc], 0, side="left").to(device)
            cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=s["gen_new_tokens"],
                                   num_return_sequences=n, eos_token_id=stop, pad_token_id=chat.pad_id)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            gen = out[:, ids.shape[1]:]
            done = torch.isin(gen, torch.tensor(stop, device=device)).cumsum(1)
            new_tokens += int(((done == 0) | ((done == 1) & torch.isin(gen, torch.tensor(stop, device=device)))).sum())
        meter.counted = new_tokens
        meter.step_end()
    return {"note": "tokens: sampled tokens"}


def run_trl(stage: str, work: Path, s: dict, meter: Meter) -> dict | None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    if stage == "generate":
        return run_generate("transformers", work, s, meter)
    import trl

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

    def counting(cls):
        class Counted(cls):
            def training_step(self, model, inputs, *a, **kw):
                if isinstance(inputs, dict):  # SFT, DPO (RL: raw prompt rows, before sampling; timed per step)
                    meter.counted += sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask"))
                return super().training_step(model, inputs, *a, **kw)
        return Counted

    tok = AutoTokenizer.from_pretrained(work / "model")
    cuda = s["device"] == "cuda"
    rl = stage in RL_STAGES
    common = dict(output_dir=str(work / "runs" / f"trl-{stage}-{os.getpid()}"), max_steps=steps_of(stage, s), learning_rate=1e-6,
                  lr_scheduler_type="constant", per_device_train_batch_size=s["sft_batch"],
                  gradient_accumulation_steps=1 if rl else s["grad_accum"], logging_steps=1000, save_strategy="no",
                  report_to="none", seed=0, bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0,
                  model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True)
    model = str(work / "model")
    if stage == "sft":
        data = Dataset.from_list(read(work / "data" / "sft.jsonl"))
        sample = data[0]["messages"]
        same = tok.apply_chat_template(sample) == tok.apply_chat_template(sample, chat_template=TRAINING_TEMPLATE)
        if not same:
            raise RuntimeError("TRAINING_TEMPLATE renders other tokens than the checkpoint's template")
        tok.chat_template = TRAINING_TEMPLATE
        cfg = trl.SFTConfig(**common, assistant_only_loss=True, max_length=s["max_length"], packing=False)
        trainer = counting(trl.SFTTrainer)(model=model, args=cfg, train_dataset=data, processing_class=tok,
                                           callbacks=[Clock()])
        how = "SFTTrainer(assistant_only_loss=True, packing=False)"
    elif stage == "dpo":
        rows = [{"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
                for r in read(work / "data" / "dpo.jsonl")]
        common["per_device_train_batch_size"] = s["dpo_batch"]
        cfg = trl.DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], max_length=s["max_length"],
                            precompute_ref_log_probs=True, precompute_ref_batch_size=s["dpo_batch"])
        trainer = counting(trl.DPOTrainer)(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                                           processing_class=tok, callbacks=[Clock()])
        how = "DPOTrainer(loss_type=sigmoid, beta=0.1, precompute_ref_log_probs=True)"
    else:
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in read(work / "data" / "prompts.jsonl")]
        common["per_device_train_batch_size"] = RL["prompts"] * RL["k"]  # TRL counts completions
        knobs = dict(num_generations=RL["k"], max_completion_length=RL["max_new_tokens"], beta=RL["beta"],
                     temperature=RL["temperature"], steps_per_generation=1, log_completions=False)
        cls, cfg_cls = (trl.GRPOTrainer, trl.GRPOConfig) if stage == "grpo" else (trl.RLOOTrainer, trl.RLOOConfig)
        cfg = cfg_cls(**common, **knobs)
        trainer = counting(cls)(model=model, args=cfg, reward_funcs=trl_length_reward,
                                train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])
        how = f"{cls.__name__}(num_generations={RL['k']}, max_completion_length={RL['max_new_tokens']}, beta={RL['beta']})"
    trainer.train()
    return {"configured": how, "trl_version": trl.__version__}


# --------------------------------------------------------------------------- the parent


def model_facts(work: Path, s: dict) -> dict:
    cfg = json.loads((work / "model" / "config.json").read_text())
    h, v, L, i = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o, k, v, MLP (biases and norms left out)
    params = L * per_layer + v * h  # the tied output layer counts once
    return {"hidden_size": h, "layers": L, "vocab_size": v, "intermediate_size": i, "params_matmul": params}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((t for key, t in PEAK_BF16_TFLOPS.items() if key in name), None)


def summarise(rows: list[dict], s: dict, facts: dict, tflops_override) -> dict:
    out = {}
    for stage in s["stages"]:
        per = {}
        for side in ("alignkit", "trl"):
            got = [r for r in rows if r["stage"] == stage and r["side"] == side and "error" not in r]
            if not got:
                continue
            med = {k: statistics.median(r[k] for r in got) for k in got[0] if isinstance(got[0][k], (int, float))}
            med["reps"] = len(got)
            med["configured"] = got[0].get("configured", "")
            tf = peak_tflops(got[0]["device_name"], tflops_override)
            if tf and stage in ("sft", "dpo"):
                seq = med["tokens_per_step"] / max(1, s["sft_batch" if stage == "sft" else "dpo_batch"] * 2 ** (stage == "dpo"))
                flops_per_token = 6 * facts["params_matmul"] + 12 * facts["layers"] * facts["hidden_size"] * seq
                med["mfu"] = med["tokens_per_s"] * flops_per_token / (tf * 1e12)
            per[side] = med
        if "alignkit" in per and "trl" in per:
            a, t = per["alignkit"], per["trl"]
            per["ratio"] = (t["step_s"] / a["step_s"]) if stage in RL_STAGES else a["tokens_per_s"] / t["tokens_per_s"]
            per["ratio_of"] = "TRL step s / alignkit step s" if stage in RL_STAGES else "alignkit tokens/s / TRL tokens/s"
            per["mem_ratio"] = a["peak_mem_gb"] / t["peak_mem_gb"]
        out[stage] = per
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"alignkit vs TRL {meta.get('trl_version', '?')}, {meta['size']} model on {meta['device_name']}, "
             f"{meta['date']}; medians of {meta['reps']} repetitions, {meta['steps']} steps each, first {meta['warmup']} "
             f"not timed. Command: `{meta['command']}`", "",
             "| stage | alignkit tokens/s | TRL tokens/s | ratio | alignkit step s | TRL step s | "
             "alignkit peak GiB | TRL peak GiB | MFU alignkit / TRL |", "|---|---|---|---|---|---|---|---|---|"]
    for stage, per in summary.items():
        a, t = per.get("alignkit", {}), per.get("trl", {})

        def f(d, k, fmt="{:.0f}"):
            return fmt.format(d[k]) if k in d else "failed" if not d else "-"
        mfu = f"{a['mfu']:.1%} / {t['mfu']:.1%}" if "mfu" in a and "mfu" in t else "-"
        ratio = f"{per['ratio']:.2f}x" if "ratio" in per else "-"
        lines.append(f"| {stage} | {f(a, 'tokens_per_s')} | {f(t, 'tokens_per_s')} | {ratio} | {f(a, 'step_s', '{:.2f}')} | "
                     f"{f(t, 'step_s', '{:.2f}')} | {f(a, 'peak_mem_gb', '{:.2f}')} | {f(t, 'peak_mem_gb', '{:.2f}')} | {mfu} |")
    lines += ["", "Ratios: tokens/s for sft, dpo and generate (generate: sampled tokens; TRL column: transformers' "
              "`generate`), step time for grpo and rloo. Peak memory on a CPU is the whole process's resident set."]
    for stage, per in summary.items():
        if per.get("trl", {}).get("configured"):
            lines.append(f"- {stage}: TRL side {per['trl']['configured']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="sft,dpo,grpo,generate", help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (generate: calls)")
    ap.add_argument("--rl-steps", type=int, default=None, help="optimizer steps of grpo and rloo (default --steps)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps not timed")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="tiny", choices=["tiny", "0.5b"])
    ap.add_argument("--max-length", type=int, default=None, help="longest row in tokens (tiny 512, 0.5b 1024)")
    ap.add_argument("--batch", type=int, default=None, help="SFT micro-batch (tiny 4, 0.5b 8)")
    ap.add_argument("--dpo-batch", type=int, default=None, help="DPO pairs per micro-batch (tiny 2, 0.5b 4)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--ak", action="append", default=[], metavar="KEY=VALUE", help="alignkit option, e.g. train.packing=true")
    ap.add_argument("--sides", default="alignkit,trl")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak, for MFU")
    ap.add_argument("--work", default=None, help="folder for the model, data and runs (default: <out>/work)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/stages-<device>-<date>)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for kv in args.ak:
        if "=" not in kv:
            ap.error(f"--ak {kv!r}: expected KEY=VALUE")
    stages = [x for x in args.stages.split(",") if x]
    for x in stages:
        if x not in STAGES:
            ap.error(f"--stages: unknown stage {x!r}; use {','.join(STAGES)}")
    if min(args.steps, args.rl_steps or args.steps) <= args.warmup:
        ap.error("--steps and --rl-steps must exceed --warmup")
    s = settings(args) | {"stages": stages}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out or HERE.parent / "results" / f"stages-{args.device}-{date}")
    work = Path(args.work) if args.work else out / "work"
    if args.child:
        stage, side = args.child.split(":")
        print("RESULT " + json.dumps(child(stage, side, work, s)), flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device")
    prepare(work, s)
    facts = model_facts(work, s)
    sides = args.sides.split(",")
    rows = []
    base = [a for a in sys.argv[1:]]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    for rep in range(args.reps):
        for stage in stages:
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                cmd = [sys.executable, str(HERE), *base, "--work", str(work), "--out", str(out), "--child", f"{stage}:{side}"]
                t = time.perf_counter()
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                    line = next((x for x in res.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
                    row = json.loads(line[7:]) if line else {"stage": stage, "side": side, "error": res.stderr[-3000:]}
                except subprocess.TimeoutExpired:
                    row = {"stage": stage, "side": side, "error": f"timed out after {args.timeout} s"}
                row["rep"] = rep
                rows.append(row)
                msg = row.get("error", "").strip().splitlines()[-1:] if "error" in row else \
                    f"{row['tokens_per_s']:.0f} tokens/s, {row['step_s']:.2f} s/step, {row['peak_mem_gb']:.2f} GiB"
                print(f"rep {rep} {stage:<8} {side:<8} {time.perf_counter() - t:6.0f} s  {msg}", file=sys.stderr, flush=True)
                (out / "raw.jsonl").open("a").write(json.dumps(row) + "\n")
    summary = summarise(rows, s, facts, args.peak_tflops)
    ok = next((r for r in rows if "error" not in r), {})
    trl_version = next((r["trl_version"] for r in rows if "trl_version" in r), None)
    meta = {"date": date, "command": "python bench/stages.py " + " ".join(base), "device_name": ok.get("device_name", "?"),
            "host": platform.node(), "cpus": os.cpu_count(), "load_avg_end": os.getloadavg(), "trl_version": trl_version,
            "reps": args.reps, "steps": args.steps, "warmup": args.warmup, "size": args.size, "settings": s, "model": facts}
    (out / "stages.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1))
    md = markdown(summary, meta)
    (out / "stages.md").write_text(md)
    print(md)
    print(json.dumps({"meta": {k: meta[k] for k in ("date", "device_name", "trl_version")}, "summary": summary}))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
