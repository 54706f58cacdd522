"""The demo's offline world: a tokenizer trained on the toy task, a tiny model, data files."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..data.chat import CHATML_TEMPLATE
from .task import WORDS, make_dataset, near_miss

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A Qwen2-shaped model small enough to train in about a minute on two CPU cores.
TINY_MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def build_tokenizer(output_dir: str | Path, with_template: bool = True, vocab_size: int = 270) -> Path:
    """A byte-level BPE tokenizer trained on toy-task text, saved in Hugging Face format.

    The default vocabulary (256 bytes + 3 specials + 11 merges) is close to character level on
    purpose: whole-word tokens would hide the letters that the upper-case and spelling tasks need.
    """
    corpus = []
    for ex in make_dataset(4000, seed=12345):
        corpus += [ex["prompt"], ex["completion"]]
    corpus += WORDS + [w.upper() for w in WORDS] + ["user", "assistant", "system", "You are a helpful assistant."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    if with_template:
        fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(output_dir)
    return Path(output_dir)


def write_model_config(output_dir: str | Path, vocab_size: int, **overrides) -> Path:
    """A Qwen2 config.json for a tiny model (init-model turns it into weights)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=vocab_size, **(TINY_MODEL | overrides))
    cfg.save_pretrained(output_dir)
    return Path(output_dir)


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_chat_data(directory: str | Path, n_train: int = 4000, n_test: int = 100, seed: int = 0) -> Path:
    """Toy task as smol-smoltalk-style chats: `{split}.jsonl` files with `messages` and `category`."""
    directory = Path(directory)
    test = make_dataset(n_test, seed + 1)
    held_out = {ex["prompt"] for ex in test}
    # Test prompts never appear in training, so the demo measures more than memorisation.
    train = [ex for ex in make_dataset(n_train + n_test * 2, seed) if ex["prompt"] not in held_out][:n_train]
    for split, examples in (("train", train), ("test", test)):
        rows = [
            {
                "messages": [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["completion"]}],
                "category": ex["category"],
            }
            for ex in examples
        ]
        write_jsonl(rows, directory / f"{split}.jsonl")
    return directory


def write_preference_data(directory: str | Path, n_train: int = 1000, n_test: int = 100, seed: int = 0) -> Path:
    """Toy preference pairs (ultrafeedback_binarized schema): the right answer over a near miss."""
    import random

    directory = Path(directory)
    rng = random.Random(seed + 7)
    for split, n, s in (("train_prefs", n_train, seed), ("test_prefs", n_test, seed + 1)):
        rows = []
        examples = make_dataset(n, s)
        for ex in examples:
            wrong = near_miss(ex["prompt"], rng)
            user = {"role": "user", "content": ex["prompt"]}
            rows.append(
                {
                    "prompt": ex["prompt"],
                    "chosen": [user, {"role": "assistant", "content": ex["completion"]}],
                    "rejected": [user, {"role": "assistant", "content": wrong}],
                    "category": ex["category"],
                }
            )
        write_jsonl(rows, directory / f"{split}.jsonl")
    return directory
