"""A decoder reward model saved as `...ForSequenceClassification` (what `alignkit rm` writes, and
what Skywork-Reward and most published reward models are) reads its chat template when scored,
as it did in training; encoders (BERT family) read '[CLS] prompt [SEP] response [SEP]'."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.config import ModelConfig
from alignkit.rewards.backends import HFRewardModel
from alignkit.rewards.inputs import is_causal_lm, load_reward_tokenizer


def saved_decoder_rm(tiny_model_dir, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm", model.eval(), tok


def test_a_saved_decoder_reward_model_is_scored_through_its_chat_template(tiny_model_dir, tmp_path):
    rm, model, tok = saved_decoder_rm(tiny_model_dir, tmp_path)
    assert model.config.architectures == [type(model).__name__] and "ForSequenceClassification" in type(model).__name__
    assert is_causal_lm(str(rm), False)
    assert load_reward_tokenizer(ModelConfig(name_or_path=str(rm)))[1]
    prompt, answer = [{"role": "user", "content": "What is 2 plus 3?"}], "5"
    with torch.no_grad():
        text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        expected = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits.item()
    got = HFRewardModel(str(rm), device="cpu").score([prompt], [answer])[0]
    assert abs(got - expected) < 1e-4, (got, expected)


def test_an_encoder_is_not_a_decoder(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path)
    assert not is_causal_lm(str(tmp_path), False)
