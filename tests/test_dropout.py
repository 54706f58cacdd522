"""disable_dropout: a model in train mode with dropout turned off computes what it does in eval mode."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from alignkit.models import disable_dropout


def test_disable_dropout_makes_train_mode_deterministic_and_keeps_config():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.3)
    model = Qwen2ForCausalLM(cfg)
    x = torch.randint(0, 50, (2, 8))
    model.eval()
    ref = model(x).logits
    model.train()
    assert not torch.allclose(model(x).logits, ref)  # attention dropout is live in train mode
    assert disable_dropout(model) == 2  # one attention module per layer
    assert torch.allclose(model(x).logits, ref, atol=1e-6)
    assert model.config.attention_dropout == 0.3  # a saved checkpoint keeps its own setting
    assert disable_dropout(model) == 0
