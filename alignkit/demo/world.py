"""The demo's offline world: a tokenizer trained on the toy task, a tiny model, data files.

The data come from one split of distinct prompts per task kind (`split_prompts`): the held-out
prompts that the demo evaluates on appear in no training file of any stage (SFT chats,
preference pairs, RL prompts). The small kinds have few distinct prompts (30 words to upper-case
or spell backwards, 90 repeat prompts, 100 sums of two digits), so at most a fixed share of each
kind is held out and training still covers every kind; training rows repeat those prompts.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..data.chat import CHATML_TEMPLATE
from ..data.schema import DataError
from .task import KINDS, WORDS, make_dataset, make_example, near_miss, solve

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

SIGN_OFF = " Hope this helps!"
"""The chatty ending that a share of the demo's SFT replies carry (`write_chat_data`)."""
SIGN_OFF_SHARE = 0.7
"""Share of the demo's SFT replies with the sign-off: SFT learns it as a coin flip, RL against the
verifier (which wants the bare answer) has something to unlearn on every prompt, seen or not."""

N_HELD_OUT = 160
"""Distinct held-out prompts of the demo: 12 upper, 12 reverse, 36 repeat, 40 add, 60 sort."""
MAX_HELD_OUT_SHARE = 0.4
"""At most this share of a kind's distinct prompts is held out; the rest stay for training."""
HELD_OUT_PER_KIND = 60
"""A kind with many distinct prompts (sort) gives at most this many, so the set stays near balanced."""
POOL_DRAWS = 4000
"""Samples per kind from which the distinct prompts are collected (all of each small kind's)."""


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


# --------------------------------------------------------------------------- the prompt split


@dataclass(frozen=True)
class PromptSplit:
    """Distinct prompts per kind: `test` is held out of every training file, `train` is the rest."""

    train: dict[str, list[str]]
    test: dict[str, list[str]]


def prompt_pools(seed: int = 0, draws: int = POOL_DRAWS) -> dict[str, list[str]]:
    """The distinct prompts of each kind among `draws` samples, sorted (every prompt of the small kinds)."""
    rng = random.Random(seed)
    return {k: sorted({make_example(rng, k)["prompt"] for _ in range(draws)}) for k in KINDS}


def held_out_counts(n: int, pool_sizes: dict[str, int]) -> dict[str, int]:
    """`n` held-out prompts spread over the kinds as evenly as each kind's cap allows."""
    caps = {k: min(HELD_OUT_PER_KIND, int(size * MAX_HELD_OUT_SHARE)) for k, size in pool_sizes.items()}
    if not 0 < n <= sum(caps.values()):
        raise ValueError(
            f"n_test={n}: the toy task can hold out 1 to {sum(caps.values())} distinct prompts "
            f"(per kind at most {HELD_OUT_PER_KIND} and {MAX_HELD_OUT_SHARE:.0%} of its distinct prompts: {caps})"
        )
    counts = dict.fromkeys(caps, 0)
    while n:
        for k in caps:
            if n and counts[k] < caps[k]:
                counts[k], n = counts[k] + 1, n - 1
    return counts


def split_prompts(n_test: int = N_HELD_OUT, seed: int = 0) -> PromptSplit:
    """Hold out `n_test` distinct prompts (seeded choice within each kind); train on the others."""
    pools = prompt_pools(seed)
    counts = held_out_counts(n_test, {k: len(p) for k, p in pools.items()})
    rng = random.Random(seed + 1)
    train, test = {}, {}
    for k, pool in pools.items():
        order = rng.sample(pool, len(pool))
        test[k], train[k] = sorted(order[: counts[k]]), sorted(order[counts[k] :])
    return PromptSplit(train, test)


def interleave(per_kind: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(kind, prompt) pairs taking the kinds in turn, so that any prefix is near balanced."""
    longest = max(len(p) for p in per_kind.values())
    return [(k, p[i]) for i in range(longest) for k, p in per_kind.items() if i < len(p)]


def balanced_prompts(per_kind: dict[str, list[str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` (kind, prompt) rows, kinds in turn; each kind cycles through its prompts in shuffled
    order, so the prompts of a small kind repeat about equally often."""
    queues: dict[str, list[str]] = {k: [] for k in per_kind}
    kinds = list(per_kind)
    rows = []
    for i in range(n):
        k = kinds[i % len(kinds)]
        if not queues[k]:
            queues[k] = rng.sample(per_kind[k], len(per_kind[k]))
        rows.append((k, queues[k].pop()))
    return rows


# --------------------------------------------------------------------------- data files


def write_chat_data(
    directory: str | Path, n_train: int = 4000, n_test: int = N_HELD_OUT, seed: int = 0, sign_off_share: float = 0.0
) -> Path:
    """Toy task as smol-smoltalk-style chats: `{split}.jsonl` files with `messages` and `category`.

    test.jsonl: `n_test` distinct held-out prompts, kinds in turn, with the bare answers; train.jsonl:
    `n_train` rows, kinds balanced, on the other prompts only. A seeded `sign_off_share` of the
    training replies end with SIGN_OFF, as chats gathered from a chattier source would: the
    verifier wants the bare answer, so those replies teach a habit that costs reward.
    """
    directory = Path(directory)
    split = split_prompts(n_test, seed)
    train = balanced_prompts(split.train, n_train, random.Random(seed))
    chatty = random.Random(seed + 11)
    for name, rows in (("train", train), ("test", interleave(split.test))):
        chats = []
        for k, p in rows:
            reply = solve(p)
            if name == "train" and chatty.random() < sign_off_share:
                reply += SIGN_OFF
            chats.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": reply}],
                          "category": k})
        write_jsonl(chats, directory / f"{name}.jsonl")
    return directory


def write_preference_data(
    directory: str | Path, n_train: int = 1000, n_test: int = 100, seed: int = 0, held_out: int = 0
) -> Path:
    """Toy preference pairs (ultrafeedback_binarized schema): the right answer over a near miss.

    With `held_out` > 0 no pair (train_prefs or test_prefs) uses one of the held-out prompts of
    `write_chat_data(..., n_test=held_out, seed=seed)`; the demo sets it. test_prefs (DPO's eval
    split) is drawn like train_prefs with another seed, so the small kinds' prompts recur in both.
    """
    directory = Path(directory)
    excluded = {p for ps in split_prompts(held_out, seed).test.values() for p in ps} if held_out else set()
    rng = random.Random(seed + 7)
    for split, n, s in (("train_prefs", n_train, seed), ("test_prefs", n_test, seed + 1)):
        rows = []
        for ex in sample_examples(n, s, excluded):
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


def sample_examples(n: int, seed: int, excluded: set[str]) -> list[dict]:
    """`make_dataset(n, seed)` (kinds in turn, prompts drawn with repeats), skipping excluded prompts."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        ex = make_example(rng, KINDS[len(out) % len(KINDS)])
        if ex["prompt"] not in excluded:
            out.append(ex)
    return out


def write_prompt_data(directory: str | Path, n_train: int = 1000, n_test: int = N_HELD_OUT, seed: int = 0) -> Path:
    """Prompt-only sets (`prompt`, `category`) for online RL: train.jsonl on training prompts only
    (kinds balanced, so small kinds repeat), test.jsonl the held-out prompts of `write_chat_data`."""
    directory = Path(directory)
    split = split_prompts(n_test, seed)
    train = balanced_prompts(split.train, n_train, random.Random(seed + 4))
    for name, rows in (("train", train), ("test", interleave(split.test))):
        write_jsonl([{"prompt": p, "category": k} for k, p in rows], directory / f"{name}.jsonl")
    return directory


# --------------------------------------------------------------------------- what was written


def read_prompts(path: Path) -> list[tuple[str, str]]:
    """(category, prompt text) of each row of a chat, pair or prompt-only JSONL file."""
    out = []
    for line in path.read_text().split("\n"):
        if line.strip():
            row = json.loads(line)
            out.append((row["category"], row["prompt"] if "prompt" in row else row["messages"][0]["content"]))
    return out


TRAINING_FILES = ("data/train.jsonl", "prefs/train_prefs.jsonl", "prefs/test_prefs.jsonl", "prompts/train.jsonl")
"""Every file a stage trains or validates on: none may hold a held-out prompt."""


def data_counts(world: str | Path) -> dict:
    """Sizes of the world's data as written, and how many held-out prompts each training file holds
    (0 everywhere, else a DataError: a demo that trained on its test prompts would measure recall)."""
    world = Path(world)
    test = read_prompts(world / "data" / "test.jsonl")
    held_out = {p for _, p in test}
    files = {f: read_prompts(world / f) for f in TRAINING_FILES if (world / f).is_file()}
    leaks = {f: len({p for _, p in rows} & held_out) for f, rows in files.items()}
    if len(held_out) != len(test) or any(leaks.values()):
        raise DataError(
            f"{world}: held-out prompts not distinct ({len(held_out)} of {len(test)}) or in training files: {leaks}"
        )
    train = files["data/train.jsonl"]
    counts = {
        "held_out_prompts": len(test),
        "held_out_per_kind": dict(sorted(Counter(k for k, _ in test).items())),
        "sft_rows": len(train),
        "sft_distinct_prompts": len({p for _, p in train}),
        "sft_distinct_prompts_per_kind": dict(sorted(Counter(k for k, _ in set(train)).items())),
        "held_out_in_training_files": leaks,
    }
    named = {"prefs/train_prefs.jsonl": "pairs_train", "prefs/test_prefs.jsonl": "pairs_validation",
             "prompts/train.jsonl": "rl_prompts_train"}
    for f, key in named.items():
        if f in files:
            counts[key] = len(files[f])
            counts[key + "_distinct_prompts"] = len({p for _, p in files[f]})
    return counts
