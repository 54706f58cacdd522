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
    if is_adapter_dir(source):  # a LoRA reward model reads what its base read in training
        return is_causal_lm(adapter_base(source), trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


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
