"""A Bradley-Terry reward model: a scalar head trained so that r(x, y_w) > r(x, y_l).

Works on a causal LM checkpoint (prompt and response through its chat template, scored at the
last token) or on an encoder such as MiniLM (prompt and response as one text, scored from the
pooled output). The result is an ordinary `AutoModelForSequenceClassification` directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, set_seed

from ..config import ConfigError, DataConfig, ModelConfig, TrainConfig
from ..data.collate import collate_pairs
from ..data.chat import tokenize_prompt
from ..data.prepare import keep_undropped, load_examples, pair_drop_reason, truncate_text
from ..models import check_source, fit_vocab, is_adapter_dir, is_peft_model, save_adapter, with_lora
from ..rewards.inputs import load_reward_tokenizer, reward_input_ids
from .loop import LossOutput, RunOptions, check_plan, distributed_state, to_device, train

log = logging.getLogger(__name__)


def bradley_terry_losses(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def packed_rewards(model, batch) -> torch.Tensor:
    """Each packed sequence's score at its last token (a causal scorer's pooling), one forward of the packed row.

    The scorer's own forward runs (DDP and hooks see it); its head is applied to the last hidden state at
    each sequence's last position, and its pooled output joins the graph at zero weight.
    """
    from accelerate.utils import extract_model_from_parallel

    from .logprobs import packed_inputs

    inner = extract_model_from_parallel(model)
    head = getattr(inner, "score", None)
    if head is None:
        raise ConfigError(f"train.packing: {type(inner).__name__} has no `score` head on its last hidden states; "
                          "packing applies to causal-LM reward models (set train.packing: false)")
    ids, _, pos, attend = packed_inputs(inner, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    # a sequence's last token: the next position starts a sequence, continues into padding, or ends the row
    nxt = torch.cat([pos[:, 1:], torch.zeros_like(pos[:, :1])], dim=1)
    mask = batch["attention_mask"]
    real = ids.new_ones(ids.shape, dtype=torch.bool) if ids.shape != mask.shape else mask.bool()
    after = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)
    ends = real & ((nxt == 0) | ~after)
    out = model(input_ids=ids, **attend, output_hidden_states=True)
    return head(out.hidden_states[-1][ends]).squeeze(-1).float() + out.logits.sum() * 0.0


def rm_loss(model, batch) -> LossOutput:
    if "position_ids" in batch:
        rewards = packed_rewards(model, batch)
    else:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
    chosen, rejected = rewards.chunk(2)
    losses = bradley_terry_losses(chosen, rejected)
    margin = (chosen - rejected).detach()
    metrics = {
        "accuracy": (margin > 0).float().sum(),
        "reward_margin": margin.sum(),
        "rewards_chosen": chosen.detach().sum(),
        "rewards_rejected": rejected.detach().sum(),
    }
    return LossOutput(losses.sum(), len(losses), metrics, tokens=int(batch["attention_mask"].sum()))


def length_baseline(pairs: list[dict]) -> float:
    """Agreement of "the longer response wins" with the labels (ties count half)."""
    longer = [(len(p["chosen"]), len(p["rejected"])) for p in pairs]
    score = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in longer)
    return score / len(pairs)


def tokenize_pairs_for_rm(rows: list[dict], tokenizer, causal: bool, max_length: int,
                          data: DataConfig | None = None) -> datasets.Dataset:
    """chosen_ids / rejected_ids (whole scored sequences) per pair, with the data limits applied.

    Same limits as DPO: pairs with a short response, a multi-turn prompt (first_turn_only) or a prompt over
    max_prompt_tokens are dropped; responses are cut to max_response_tokens tokens (at a token boundary of
    the text, before the sequence is built). `row` is each kept pair's index in `rows`.
    """
    data = data or DataConfig()

    def one(row, index):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "row": index, "truncated": False,
               "drop": pair_drop_reason(row, data)}
        limit = data.max_prompt_tokens
        if not out["drop"] and limit is not None and prompt_length(tokenizer, causal, row["prompt"]) > limit:
            out["drop"] = f"prompt longer than {data.max_prompt_tokens} tokens"
        if out["drop"]:
            return out
        for side in ("chosen", "rejected"):
            response, cut = truncate_text(tokenizer, row[side], data.max_response_tokens)
            out["truncated"] |= cut
            out[f"{side}_ids"] = reward_input_ids(tokenizer, causal, row["prompt"], response, max_length)
        return out

    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    ds = ds.map(one, with_indices=True, remove_columns=["prompt", "chosen", "rejected"], num_proc=data.num_proc,
                desc="tokenise pairs")
    return keep_undropped(ds, len(rows), "tokenise pairs")


def prompt_length(tokenizer, causal: bool, prompt: list[dict]) -> int:
    """Prompt tokens as max_prompt_tokens counts them: causal LMs as in DPO (template and assistant header);
    encoders the prompt's text."""
    if causal:
        return len(tokenize_prompt(tokenizer, prompt))
    return len(tokenizer("\n\n".join(m["content"] for m in prompt), add_special_tokens=False)["input_ids"])


@torch.no_grad()
def pair_accuracy(model, pairs, collate, batch_size: int) -> float:
    """Share of pairs the model ranks chosen over rejected (what rm_eval.json reports for final/)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0.0
    for start in range(0, len(pairs), batch_size):
        batch = to_device(collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]), device)
        correct += float(rm_loss(model, batch).metrics["accuracy"])
    model.train(was_training)
    return correct / len(pairs)


def rm_data_defaults() -> DataConfig:
    return DataConfig(dataset="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", eval_split="test_prefs")


def rm_train_defaults() -> TrainConfig:
    return TrainConfig(learning_rate=1e-5, batch_size=8, grad_accum=4, warmup_ratio=0.03, scheduler="linear", save_steps=200)


@dataclass
class RMConfig:
    output_dir: str = "runs/rm"
    seed: int = 42
    resume: bool = False
    quiet: bool = False
    max_length: int = 1024
    """Tokens per scored sequence (prompt + response); longer ones are cut (causal: from the left)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=rm_data_defaults)
    train: TrainConfig = field(default_factory=rm_train_defaults)


def run_rm(cfg: RMConfig, callbacks=()) -> Path:
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)  # before any model is built: the scalar head is initialised at random
    source = check_source(cfg.model.name_or_path, "model")
    if is_adapter_dir(source):
        raise ConfigError(f"model.name_or_path: {source} is an adapter folder; a reward model starts from full weights: "
                          f"write them with `alignkit merge --source {source} --output_dir DIR` and train from DIR")
    train_rows, eval_rows = load_examples(cfg.data, "preference", cfg.seed, rm_data_defaults().eval_split)
    chat, causal = load_reward_tokenizer(cfg.model)
    if not causal and (cfg.model.chat_template or cfg.model.end_of_turn_token):
        raise ConfigError(
            f"model.chat_template / model.end_of_turn_token: {source} is an encoder, scored on plain "
            "'prompt [SEP] response' text without a chat template; unset them"
        )
    tokenizer = chat.tokenizer
    train_pairs = tokenize_pairs_for_rm(train_rows, tokenizer, causal, cfg.max_length, cfg.data)
    eval_pairs = tokenize_pairs_for_rm(eval_rows, tokenizer, causal, cfg.max_length, cfg.data) if eval_rows else None
    if cfg.train.packing and not causal:
        raise ConfigError(f"train.packing: {source} is an encoder (bidirectional, pooled from its first token); "
                          "packing applies to causal-LM reward models: set train.packing: false")
    check_plan(train_pairs, cfg.train)  # train.max_tokens_per_batch fits the data
    attn = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
        dtype=torch.float32, **attn
    )
    fit_vocab(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id  # causal scorers find the last real token by it
    # LoRA: adapters on the body; the new scalar head trains in full (peft's modules_to_save)
    model = with_lora(model, cfg.model, "SEQ_CLS", [n for n in ("score", "classifier") if hasattr(model, n)])
    log.info("reward model: %d training pairs, %d eval pairs", len(train_pairs), len(eval_pairs) if eval_pairs else 0)

    def save(model, _chat, path):
        if is_peft_model(model):
            save_adapter(model, Path(path))
        else:
            model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    train(
        model, chat, train_pairs, eval_pairs, partial(collate_pairs, pad_token_id=tokenizer.pad_token_id), rm_loss,
        cfg.train, RunOptions(out, cfg.seed, cfg.resume, cfg.quiet, config=cfg), list(callbacks), save_fn=save,
    )
    if eval_pairs is not None and distributed_state().is_main_process:
        # The model as saved in final/ (early stopping may have restored an earlier step than the last evaluation).
        kept = [eval_rows[i] for i in eval_pairs["row"]]
        collate = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
        accuracy = pair_accuracy(model, eval_pairs, collate, cfg.train.batch_size)
        summary = {"eval_accuracy": accuracy, "length_baseline": length_baseline(kept), "eval_pairs": len(kept)}
        (out / "rm_eval.json").write_text(json.dumps(summary, indent=1))
        log.info("reward model (final/): held-out accuracy %.3f; 'longer response wins' baseline %.3f (%d pairs)",
                 accuracy, summary["length_baseline"], len(kept))
    return out
