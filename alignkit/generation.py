"""Generate replies to chat prompts: one interface, a transformers engine and an optional vLLM engine.

`generate(model, chat, prompts, params) -> list[list[Completion]]` (n completions per prompt).
The transformers engine batches prompts longest first with left padding and the KV cache and
stops at the end-of-turn token. `alignkit generate` wraps it with prompt loading, a resumable
JSONL output, and prompt sharding across processes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .config import ModelConfig
from .data.chat import tokenize_prompt
from .data.collate import pad

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    """Completions per prompt."""
    num_beams: int = 1
    """Beam search width (transformers engine); n <= num_beams."""
    length_penalty: float = 1.0
    """Beam search: exponent on length when ranking finished beams."""
    seed: int | None = 0


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn) or "length"


@torch.no_grad()
def generate(model, chat, prompts: list[list[dict]], params: SamplingParams, batch_size: int = 16, progress: bool = False) -> list[list[Completion]]:
    """`params.n` completions per prompt, in prompt order."""
    tok = chat.tokenizer
    encoded = [tokenize_prompt(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    stop = chat.stop_ids()
    results: list[list[Completion]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    if params.seed is not None:
        torch.manual_seed(params.seed)
    device = next(model.parameters()).device
    sampling = params.temperature > 0
    if params.n > 1 and not sampling and params.num_beams < params.n:
        raise ValueError("n > 1 needs sampling (temperature > 0) or num_beams >= n")
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="generate"):
        idx = order[start : start + batch_size]
        ids = pad([encoded[i] for i in idx], chat.pad_id, side="left").to(device)
        mask = pad([[1] * len(encoded[i]) for i in idx], 0, side="left").to(device)
        kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None) if sampling else dict(do_sample=False)
        if params.num_beams > 1:
            kwargs.update(num_beams=params.num_beams, length_penalty=params.length_penalty, early_stopping=True)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, num_return_sequences=params.n,
            eos_token_id=stop, pad_token_id=chat.pad_id, **kwargs,
        )
        for row in range(out.shape[0]):
            i = idx[row // params.n]
            new = out[row, ids.shape[1] :].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop), None)
            new = new[:cut] if cut is not None else [t for t in new if t != chat.pad_id]
            results[i].append(Completion(tok.decode(new, skip_special_tokens=True), new, "stop" if cut is not None else "length"))
    model.train(was_training)
    return results


def generate_vllm(model_path: str, chat, prompts: list[list[dict]], params: SamplingParams) -> list[list[Completion]]:
    """The same interface on vLLM (the `[vllm]` extra, a GPU)."""
    try:
        from vllm import LLM
        from vllm import SamplingParams as VSampling
    except ImportError:
        raise ImportError("engine: vllm needs the vllm package: pip install 'alignkit[vllm]'") from None
    if params.num_beams > 1:
        raise ValueError("beam search is only supported by the transformers engine")
    llm = LLM(model=model_path, seed=params.seed or 0)
    vp = VSampling(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
        max_tokens=params.max_new_tokens, stop_token_ids=chat.stop_ids(), seed=params.seed,
    )
    inputs = [{"prompt_token_ids": tokenize_prompt(chat.tokenizer, p)} for p in prompts]
    outs = llm.generate(inputs, vp)
    return [[Completion(o.text, list(o.token_ids), "stop" if o.finish_reason == "stop" else "length") for o in req.outputs] for req in outs]


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptSource:
    dataset: str = "tatsu-lab/alpaca_eval"
    """Hub id or local file/folder, as for training data."""
    subset: str | None = None
    split: str = "eval"
    column: str | None = None
    """Column holding the prompt text; unset: messages (up to the last user turn), prompt, or instruction."""
    category_column: str | None = None
    """Column with a category (defaults: category, then dataset)."""
    max_prompts: int | None = None


def load_prompts(src: PromptSource) -> list[dict]:
    """[{id, messages, category}] from a dataset, in order."""
    from .data.loading import load_rows
    from .data.schema import DataError

    rows, source = load_rows(src.dataset, src.split, src.subset)
    if src.max_prompts is not None:
        rows = rows.select(range(min(src.max_prompts, len(rows))))
    cat_col = src.category_column or next((c for c in ("category", "dataset") if c in rows.column_names), None)
    out = []
    for i, row in enumerate(rows):
        messages = prompt_messages_of(row, src.column)
        if messages is None:
            raise DataError(f"{source.where(i)}: no prompt (expected {src.column or 'messages, prompt or instruction'})")
        out.append({"id": i, "messages": messages, "category": row.get(cat_col) if cat_col else None})
    return out


def prompt_messages_of(row: dict, column: str | None = None) -> list[dict] | None:
    if column:
        value = row.get(column)
        return [{"role": "user", "content": value}] if isinstance(value, str) and value.strip() else None
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
        last_user = max((k for k, m in enumerate(msgs) if m.get("role") == "user"), default=None)
        return [{"role": m["role"], "content": m["content"]} for m in msgs[: last_user + 1]] if last_user is not None else None
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt:
        return prompt
    for key in ("prompt", "instruction"):
        if isinstance(row.get(key), str) and row[key].strip():
            return [{"role": "user", "content": row[key]}]
    return None


# --------------------------------------------------------------------------- the stage


@dataclass
class GenerateConfig:
    output_dir: str = "runs/generate"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptSource = field(default_factory=PromptSource)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = 16
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    quiet: bool = False


def responses_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "responses.jsonl"


def run_generate(cfg: GenerateConfig) -> Path:
    """Write <output_dir>/responses.jsonl; rerunning continues an interrupted run."""
    from . import config as config_lib
    from .models import load_causal_lm, load_tokenizer
    from .train.loop import distributed_state

    state = distributed_state()
    out = Path(cfg.output_dir)
    final = responses_path(out)
    part = out / (f"responses.rank{state.process_index}.jsonl" if state.num_processes > 1 else "responses.jsonl")
    chat = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.prompts)
    done = completed_ids(part, cfg.sampling.n)
    mine = [p for k, p in enumerate(prompts) if k % state.num_processes == state.process_index and p["id"] not in done]
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config_lib.save(cfg, out / "config.yaml")
    if done:
        log.info("generate: %d prompts already done, %d to go", len(done), len(mine))
    params = asdict(cfg.sampling)
    if mine:
        if cfg.engine == "vllm":
            results = generate_vllm(cfg.model.name_or_path, chat, [p["messages"] for p in mine], cfg.sampling)
            write_results(part, mine, results, cfg, params)
        else:
            dtype = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())) else torch.float32
            model = load_causal_lm(cfg.model, chat, dtype=dtype).to(state.device)
            chunk = cfg.batch_size * 8  # written every chunk, so an interruption loses little
            for start in tqdm(range(0, len(mine), chunk), desc="generate", disable=cfg.quiet or not state.is_main_process):
                batch = mine[start : start + chunk]
                results = generate(model, chat, [p["messages"] for p in batch], cfg.sampling, cfg.batch_size)
                write_results(part, batch, results, cfg, params)
    if state.num_processes > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            rows = [r for k in range(state.num_processes) for r in read_jsonl(out / f"responses.rank{k}.jsonl")]
            rows.sort(key=lambda r: (r["id"], r["sample"]))
            tmp = final.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, final)
        state.wait_for_everyone()
    return final


def completed_ids(path: Path, n: int) -> set[int]:
    """Prompt ids with all n completions on disk; rows of half-written prompts are dropped."""
    if not path.exists():
        return set()
    rows = read_jsonl(path)
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    done = {i for i, c in counts.items() if c >= n}
    # Rewritten clean, so a line torn by a kill is not glued to the next append.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] in done))
    return done


def write_results(path: Path, prompts: list[dict], results: list[list[Completion]], cfg: GenerateConfig, params: dict) -> None:
    with path.open("a") as f:
        for p, completions in zip(prompts, results):
            for k, c in enumerate(completions):
                row = {
                    "id": p["id"], "sample": k, "prompt": p["messages"], "response": c.text, "n_tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason, "category": p["category"], "model": cfg.model.name_or_path, "params": params,
                }
                f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (from a kill mid-write) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: ignoring an incomplete line", path)
    return rows
