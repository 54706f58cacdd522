"""The demo's offline world: a tokenizer trained on the toy task, a tiny model, data files.

The data come from one split of distinct prompts per task kind (`split_prompts`) into four
disjoint parts: held-out prompts that the demo evaluates on (in no file any stage trains or
validates on), RL prompts (in no chat or pair file), the prompts of the held-out preference pairs
(in no other file), and the rest for SFT chats and training pairs. `data_counts` checks the files
as written. The SFT replies carry the noise of scraped chats (`scraped_reply`): a typical slip on
one sub-type of each kind, near misses, a chatty sign-off. Deliberately simplified: one fixed
world (the words, the split and the noise do not change with the demo's --seed).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..data.chat import CHATML_TEMPLATE
from ..data.schema import DataError
from .task import KINDS, WORDS, all_prompts, habit, in_habit, make_dataset, make_example, near_miss, solve

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
"""The chatty ending that a share of the demo's SFT replies carry (`scraped_reply`)."""
SIGN_OFF_SHARE = 0.3
"""Share of the demo's SFT replies with the sign-off, which the verifier (wanting the bare answer) scores 0."""
HABIT_SHARE = 0.55
"""Share of the demo's SFT replies to a habit prompt (`task.in_habit`) that make the kind's typical slip:
more than half, so the SFT model's greedy answer there is the slip and its samples are often right."""
NOISE_SHARE = 0.1
"""Share of the other SFT replies that are a near miss (`task.near_miss`), as scraped chats have."""
PAIR_SIGN_OFF_SHARE = 0.2
"""Share of the demo's preference pairs whose rejected reply is the right answer with the sign-off."""

N_SFT_CHATS = 20000
"""SFT chats the demo writes: about 1.9 passes in its 1,200 steps of 32. How fast the tiny model learns
to copy (its loss falls from about 1.9 to 0.8 within a few hundred steps) varies with the seed and even
with the number of CPU threads; with 1,000 steps, lists of 3 to 5 items and a first-word kind, seed 1
reached 65% content on one thread and 48% on two (2026-12-07). Two-item lists (an easy start) and 1,200
steps made it reach the drop by step 700 on the seeds tried."""
N_PAIRS = 10000
"""Training preference pairs (DPO's and the reward model's). With 2,000 the reward model reached 77% on the
held-out pairs and RLOO against it lost on the verifier (9 wins, 11 losses; seed 0, 2026-12-07); with
12,000 and 600 steps of 32, 85%."""
N_HELD_OUT = 160
"""Distinct held-out prompts of the demo: 40 of each kind."""
MAX_HELD_OUT_SHARE = 0.4
"""At most this share of a kind's distinct prompts is held out; the rest stay for training."""
HELD_OUT_PER_KIND = 60
"""A kind gives at most this many held-out prompts, so the set stays near balanced."""
RL_PER_KIND = 100
"""Distinct RL prompts per kind: in no chat, pair or held-out file."""
PAIRS_EVAL_PER_KIND = 20
"""Distinct prompts per kind of the held-out preference pairs (test_prefs): in no other file."""
POOL_DRAWS = 4000
"""Samples from which the distinct sort prompts are collected (the other kinds are enumerated)."""


DEMO_VOCAB = 700
"""The demo's tokenizer: byte-level BPE with merges enough that every word of the world, and every digit,
is one token (`build_tokenizer` checks this). Its kinds copy and rearrange whole words, which a tiny
model learns fast at this grain; at character level (259 tokens, the previous world with 400
pseudo-words) the SFT model was right on 5 to 21% of held-out prompts after 1,000 steps
(2026-12-07)."""


def build_tokenizer(output_dir: str | Path, with_template: bool = True, vocab_size: int = 270) -> Path:
    """A byte-level BPE tokenizer trained on toy-task text, saved in Hugging Face format.

    The default vocabulary (256 bytes + 3 specials + 11 merges) is close to character level (tests use
    it); the demo asks for DEMO_VOCAB, where every word of the world is one token, with or without the
    leading space, which this checks.
    """
    corpus = []
    for ex in make_dataset(4000, seed=12345):
        corpus += [ex["prompt"], ex["completion"]]
    corpus += list(WORDS) + ["user", "assistant", "system", "You are a helpful assistant.", SIGN_OFF]
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
    if vocab_size >= DEMO_VOCAB:
        split = [w for w in WORDS for text in (w, " " + w) if len(fast.tokenize(text)) != 1]
        if split:
            raise ValueError(f"vocab_size={vocab_size}: words split into several tokens: {split[:5]}")
    fast.save_pretrained(output_dir)
    return Path(output_dir)


DEMO_MODEL = {"num_hidden_layers": 2}
"""The demo's model: TINY_MODEL with 2 layers (0.7M parameters with the demo's tokenizer). With 4 layers
the SFT model's loss stayed near 1.1 to 1.3 after 1,200 steps on some seeds (seed 1: 31% content) while
others dropped to 0.5 by step 700 (seed 0: 74%); with 2 layers every seed tried (1, 2, 3) dropped by
step 500 and reached 77 to 78% (2026-12-07, one thread each)."""


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
    """Distinct prompts per kind in four disjoint parts: `test` (held out of every stage), `rl` (RL's
    prompts only), `pairs_eval` (the reward model's and DPO's held-out pairs only), `train` (SFT chats and
    training pairs)."""

    train: dict[str, list[str]]
    test: dict[str, list[str]]
    rl: dict[str, list[str]] = field(default_factory=dict)
    pairs_eval: dict[str, list[str]] = field(default_factory=dict)


def prompt_pools(seed: int = 0, draws: int = POOL_DRAWS, kinds: tuple[str, ...] = KINDS) -> dict[str, list[str]]:
    """The distinct prompts of each kind, sorted: every prompt of repeat, and for the other kinds the
    distinct ones among `draws` seeded samples."""
    rng = random.Random(seed)
    return {k: sorted(set(all_prompts(k))) if k == "repeat" else sorted({make_example(rng, k)["prompt"]
                                                                         for _ in range(draws)}) for k in kinds}


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


def split_prompts(n_test: int = N_HELD_OUT, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> PromptSplit:
    """Hold out `n_test` distinct prompts, then RL_PER_KIND RL prompts and PAIRS_EVAL_PER_KIND pair-eval
    prompts per kind (seeded choice within each kind); SFT and the training pairs use the others."""
    pools = prompt_pools(seed, kinds=kinds)
    counts = held_out_counts(n_test, {k: len(p) for k, p in pools.items()})
    rng = random.Random(seed + 1)
    train, test, rl, pairs_eval = {}, {}, {}, {}
    for k, pool in pools.items():
        order = rng.sample(pool, len(pool))
        a, b, c = counts[k], counts[k] + RL_PER_KIND, counts[k] + RL_PER_KIND + PAIRS_EVAL_PER_KIND
        test[k], rl[k], pairs_eval[k], train[k] = (sorted(order[:a]), sorted(order[a:b]), sorted(order[b:c]),
                                                   sorted(order[c:]))
    return PromptSplit(train, test, rl, pairs_eval)


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


def scraped_reply(prompt: str, rng: random.Random, habit_share: float = 0.0, noise_share: float = 0.0,
                  sign_off_share: float = 0.0) -> str:
    """A reply as a scraped chat gives it: on a habit prompt (`in_habit`) its kind's typical slip with
    probability `habit_share`; otherwise a near miss with probability `noise_share`, else the right
    answer; then SIGN_OFF appended with probability `sign_off_share` (one seeded draw each)."""
    slip, noise, chatty = rng.random(), rng.random(), rng.random()
    if in_habit(prompt) and slip < habit_share:
        reply = habit(prompt)
    elif noise < noise_share:
        reply = near_miss(prompt, rng)
    else:
        reply = solve(prompt)
    return reply + SIGN_OFF if chatty < sign_off_share else reply


def write_chat_data(
    directory: str | Path, n_train: int = 4000, n_test: int = N_HELD_OUT, seed: int = 0, sign_off_share: float = 0.0,
    habit_share: float = 0.0, noise_share: float = 0.0, kinds: tuple[str, ...] = KINDS,
) -> Path:
    """Toy task as smol-smoltalk-style chats: `{split}.jsonl` files with `messages` and `category`.

    test.jsonl: `n_test` distinct held-out prompts, kinds in turn, with the bare answers; train.jsonl:
    `n_train` rows, kinds balanced, on the SFT prompts only. The training replies carry the noise of
    scraped chats (`scraped_reply`: habitual slips, near misses, the chatty sign-off; none by default).
    `kinds`: a subset of the task's kinds (tests use the short-answer ones).
    """
    directory = Path(directory)
    split = split_prompts(n_test, seed, kinds)
    train = balanced_prompts(split.train, n_train, random.Random(seed))
    noisy = random.Random(seed + 11)
    for name, rows in (("train", train), ("test", interleave(split.test))):
        chats = []
        for k, p in rows:
            reply = scraped_reply(p, noisy, habit_share, noise_share, sign_off_share) if name == "train" else solve(p)
            chats.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": reply}],
                          "category": k})
        write_jsonl(chats, directory / f"{name}.jsonl")
    return directory


def write_preference_data(
    directory: str | Path, n_train: int = 1000, n_test: int = 100, seed: int = 0, held_out: int = 0,
    sign_off_share: float = 0.0,
) -> Path:
    """Toy preference pairs (ultrafeedback_binarized schema): the right bare answer over a near miss
    (on a habit prompt half the time its typical slip), or, for a seeded `sign_off_share` of the pairs,
    over the right answer with SIGN_OFF.

    train_prefs is on the SFT prompts of `split_prompts(held_out or N_HELD_OUT, seed)`; test_prefs (the
    reward model's held-out accuracy, DPO's eval loss) on its `pairs_eval` prompts, in no other file.
    """
    directory = Path(directory)
    split = split_prompts(held_out or N_HELD_OUT, seed)
    rng = random.Random(seed + 7)
    for name, n, per_kind in (("train_prefs", n_train, split.train), ("test_prefs", n_test, split.pairs_eval)):
        rows = []
        for k, prompt in balanced_prompts(per_kind, n, random.Random(seed + len(name))):
            answer = solve(prompt)
            wrong = answer + SIGN_OFF if rng.random() < sign_off_share else near_miss(prompt, rng)
            user = {"role": "user", "content": prompt}
            rows.append({"prompt": prompt, "chosen": [user, {"role": "assistant", "content": answer}],
                         "rejected": [user, {"role": "assistant", "content": wrong}], "category": k})
        write_jsonl(rows, directory / f"{name}.jsonl")
    return directory


def write_prompt_data(directory: str | Path, n_train: int = 1000, n_test: int = N_HELD_OUT, seed: int = 0) -> Path:
    """Prompt-only sets (`prompt`, `category`) for online RL: train.jsonl on the RL prompts only (in no
    chat or pair file; kinds balanced, so prompts repeat), test.jsonl the held-out prompts of
    `write_chat_data`."""
    directory = Path(directory)
    split = split_prompts(n_test, seed)
    train = balanced_prompts(split.rl, n_train, random.Random(seed + 4))
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
RL_PROMPTS = "prompts/train.jsonl"
PAIRS_EVAL = "prefs/test_prefs.jsonl"
EXCLUSIVE = {RL_PROMPTS: ("data/train.jsonl", "prefs/train_prefs.jsonl", "prefs/test_prefs.jsonl"),
             PAIRS_EVAL: ("data/train.jsonl", "prefs/train_prefs.jsonl")}
"""A file's prompts that may be in none of the files named: RL prompts are new to the SFT model; the
held-out pairs are new to the reward model and its base (the SFT model)."""


def data_counts(world: str | Path) -> dict:
    """Sizes of the world's data as written, and how many held-out prompts each training file holds (0
    everywhere, else a DataError: a demo that trained on its test prompts would measure recall); likewise
    for the RL prompts and the held-out pairs against the files in EXCLUSIVE."""
    world = Path(world)
    test = read_prompts(world / "data" / "test.jsonl")
    held_out = {p for _, p in test}
    files = {f: read_prompts(world / f) for f in TRAINING_FILES if (world / f).is_file()}
    prompts = {f: {p for _, p in rows} for f, rows in files.items()}
    leaks = {f: len(ps & held_out) for f, ps in prompts.items()}
    if len(held_out) != len(test) or any(leaks.values()):
        raise DataError(
            f"{world}: held-out prompts not distinct ({len(held_out)} of {len(test)}) or in training files: {leaks}"
        )
    overlaps = {f"{f} in {g}": len(prompts[f] & prompts[g]) for f, others in EXCLUSIVE.items() if f in prompts
                for g in others if g in prompts}
    if any(overlaps.values()):
        raise DataError(f"{world}: prompts shared between files that must be disjoint: {overlaps}")
    train = files["data/train.jsonl"]
    counts = {
        "held_out_prompts": len(test),
        "held_out_per_kind": dict(sorted(Counter(k for k, _ in test).items())),
        "held_out_habit_prompts": sum(in_habit(p) for _, p in test),
        "sft_rows": len(train),
        "sft_distinct_prompts": len({p for _, p in train}),
        "sft_distinct_prompts_per_kind": dict(sorted(Counter(k for k, _ in set(train)).items())),
        "sft_replies_right": sft_replies_right(world / "data" / "train.jsonl"),
        "held_out_in_training_files": leaks,
        "shared_prompts_between_disjoint_files": overlaps,
    }
    named = {"prefs/train_prefs.jsonl": "pairs_train", "prefs/test_prefs.jsonl": "pairs_validation",
             "prompts/train.jsonl": "rl_prompts_train"}
    for f, key in named.items():
        if f in files:
            counts[key] = len(files[f])
            counts[key + "_distinct_prompts"] = len(prompts[f])
    return counts


def sft_replies_right(path: Path) -> dict:
    """Share of SFT replies that are exactly right, and right once a trailing SIGN_OFF is cut."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    exact = sum(solve(p) == a for p, a in pairs)
    content = sum(solve(p) == (a[: -len(SIGN_OFF)] if a.endswith(SIGN_OFF) else a) for p, a in pairs)
    return {"exact": round(exact / len(pairs), 4), "ignoring_sign_off": round(content / len(pairs), 4)}
