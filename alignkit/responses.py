"""Responses to a prompt set, from a model (generated) or from a file: what eval, best-of-N,
refinement and the win rate during training compare, each side keyed by its prompt.

`responses_for(spec, name, job)`: a `.jsonl` spec is read (prompt/instruction and response/output,
e.g. AlpacaEval outputs; several responses per prompt allowed); anything else is a model, whose
responses `alignkit generate` writes (resumably) into <job.output_dir>/<name>/ with `job`'s prompts,
sampling and engine. A side that samples has its own seed stream (`side_sampling`). Below the stages
that use it, beside the engines; simplified: a side's responses are held in memory.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

from .config import ModelConfig
from .data.prompts import prompt_messages_of, read_jsonl
from .data.schema import DataError
from .generation import GenerateConfig, SamplingParams, run_generate


def prompt_key(messages: list[dict]) -> str:
    return json.dumps(messages, sort_keys=True)


def side_sampling(sampling: SamplingParams, spec: str, side: str) -> SamplingParams:
    """A side's decoding with its own seed stream when it samples: the seed salted with the side's name
    and model, so that two sides (A and B, or best-of-N's candidates and its reference) never draw the
    same noise, even when they are one model. Greedy decoding (which uses no seed) is left as it is."""
    if sampling.temperature <= 0 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=zlib.crc32(json.dumps([sampling.seed, side, spec]).encode()))


def responses_for(spec: str, name: str, job: GenerateConfig) -> list[dict]:
    """[{messages, response, category}] of a model (generated into <job.output_dir>/<name>/, one
    response per prompt) or read from a file; a file may hold several responses per prompt (n samples)."""
    if spec.endswith(".jsonl"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"responses file not found: {spec}")
        rows = []
        for i, r in enumerate(read_jsonl(spec)):
            messages = r["prompt"] if isinstance(r.get("prompt"), list) else prompt_messages_of(r)
            response = r.get("response", r.get("output"))
            if messages is None or not isinstance(response, str):
                raise DataError(f"{spec}, line {i + 1}: expected a prompt (or instruction) and a response "
                                "(or output)")
            rows.append({"messages": messages, "response": response,
                         "category": r.get("category", r.get("dataset"))})
        return rows
    sampling = side_sampling(replace(job.sampling, n=1), spec, name)
    gen = replace(job, output_dir=str(Path(job.output_dir) / name), model=ModelConfig(name_or_path=spec),
                  sampling=sampling)
    path = run_generate(gen)
    return [{"messages": r["prompt"], "response": r["response"], "category": r["category"]}
            for r in sorted(read_jsonl(path), key=lambda r: r["id"])]
