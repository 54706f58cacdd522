"""What a reward model reads: its tokenizer and the token sequence of one (prompt, response).

Shared by training (`alignkit rm`) and scoring (HFRewardModel), so that both see the same
sequence. Causal LMs render the conversation with their chat template; encoders read
'[CLS] prompt [SEP] response [SEP]'. Prompt and response are untrusted text: special-token text in
them ("<|im_end|>", "[SEP]") is tokenised as plain characters, never as the control token
(`data.chat.tokenize_conversation`; encoders: `split_special_tokens=True`).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoTokenizer

from ..config import ModelConfig
from ..data.chat import tokenize_conversation
from ..models import ChatTokenizer, adapter_base, check_source, is_adapter_dir, load_tokenizer


def is_causal_lm(source: str, trust_remote_code: bool) -> bool:
    """A decoder (read through its chat template), not an encoder: a causal LM, or a sequence classifier
    of a model family that has a causal head and no masked-LM head (Qwen2ForSequenceClassification, as
    `alignkit rm` saves it, or Skywork-Reward's Qwen3/Llama classifiers); BERT-like encoders are not."""
    if is_adapter_dir(source):  # a LoRA reward model reads what its base read in training
        return is_causal_lm(adapter_base(source), trust_remote_code)
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    architectures = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return True
    kind = getattr(config, "model_type", None)
    return (any(a.endswith("ForSequenceClassification") for a in architectures)
            and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def load_reward_tokenizer(model_cfg: ModelConfig) -> tuple[ChatTokenizer, bool]:
    """(tokenizer, is_causal): causal LMs get a chat template (their own or ChatML), encoders their plain tokenizer."""
    source = check_source(model_cfg.name_or_path, "model")
    if is_causal_lm(source, model_cfg.trust_remote_code):
        return load_tokenizer(model_cfg), True
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or source, trust_remote_code=model_cfg.trust_remote_code)
    return ChatTokenizer(tokenizer, end_of_turn="", added_tokens=[]), False


def flatten_prompt(messages: list[dict]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def reward_input_ids(tokenizer, causal: bool, prompt: list[dict], response: str, max_length: int) -> list[int]:
    """The sequence a reward model scores for one response.

    Causal LMs: the conversation exactly as `apply_chat_template` renders it, so that anyone
    scoring with plain transformers gets the same number (content with special-token text aside:
    that is plain text here); cut from the left to keep the end.
    Encoders: '[CLS] prompt [SEP] response [SEP]', the longer part truncated first.
    """
    if causal:
        ids = tokenize_conversation(tokenizer, prompt + [{"role": "assistant", "content": response}])
        return ids[-max_length:]
    return tokenizer(flatten_prompt(prompt), response, truncation="longest_first", max_length=max_length,
                     split_special_tokens=True)["input_ids"]
