"""`alignkit pairs`: preference pairs made from a policy's own samples, for `alignkit dpo`.

Modes (each a small pure selection function below, tested against hand-computed cases):
- rejection: the dataset's chosen answer against the policy's own sample as the rejected one
  (rejection-sampling DPO). `mix` is the share of the dataset's pairs replaced: exactly
  floor(mix * rows + 0.5) rows, a seeded draw; the others stay as they are. With
  `require_reward_agreement` a replacement is kept only when the reward scores the chosen answer
  above the sample (else the original pair stays, counted).
- self: K samples per prompt at a temperature schedule (`temperatures` with `samples_per_temperature`,
  e.g. 2 at 0.2, 3 at 0.7, 3 at 1.2), scored; chosen = the best (a tie goes to the earliest sample),
  rejected = a seeded random one of the three lowest-scored samples among those at least `min_gap`
  (and strictly) below the best whose text differs from it. A prompt whose samples all tie is dropped
  and counted; one with no sample far enough below the best too.
- best-worst: the best against the worst of the same samples (a tie for worst goes to the earliest).
- refine: an `alignkit refine` folder's kept revisions as chosen against the original answers as
  rejected (its responses.jsonl and refinements.jsonl are read; that stage is not imported), with the
  scores refine already paid for; answers refine did not improve are dropped and counted.
No pair ever has two identical sides (compared without surrounding whitespace) or an empty side (an
empty sample is never chosen or rejected: `alignkit dpo` refuses empty responses).

Writes dataset/train.jsonl (and dataset/test.jsonl with `eval_share`): rows of `prompt` (messages),
`chosen` and `rejected` (the assistant message), the preference schema `alignkit dpo` reads
(data: {dataset: <dir>/dataset, split: train, eval_split: test}); candidates.jsonl (every sample
with its score); card.json (counts, parameters, policy, reward identity, what was dropped and why),
written last, so its presence means complete.

Resume: samples come from `alignkit generate` (samples/t<T>/, resumable JSONL in chunks, the same
job continued), scores from the reward's SQLite cache (scores.sqlite); a rerun after a kill pays for
no sample or score twice. Every input (data file and columns, refine's files, config values and
ranges, the reward's settings) is checked before the first model call.

Simplified: a prompt's samples are scored alone (no reference answer); rejection mode samples one
answer per replaced row at `sampling.temperature`; the whole prompt set is held in memory.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from .. import code_version
from .. import config as config_lib
from ..config import ConfigError, ModelConfig, must_exist
from ..data.loading import load_rows
from ..data.prompts import PromptSource, load_prompts, read_jsonl
from ..data.schema import DataError, normalise
from ..files import write_atomic
from ..generation import GenerateConfig, SamplingParams, VLLMOptions, run_generate
from ..markdown import terminal_safe
from ..responses import prompt_key
from ..rewards.backends import CachedReward, RewardConfig, RuleReward, build_backend, check_reward_config

log = logging.getLogger(__name__)

MODES = ("rejection", "self", "best-worst", "refine")
BOTTOM = 3
"""`self` draws its rejected answer from this many lowest-scored samples."""
TIE = "all samples tie"
GAP = "no sample at least min_gap below the best"
SAME_TEXT = "sample identical to the chosen answer"
EMPTY = "sample empty"
EMPTY_TIE = "the non-empty samples all tie"
EMPTY_REFINE = "empty answer or revision"
DISAGREE = "reward does not score chosen above the sample"
NOT_REFINED = "no revision kept (refine kept the original answer)"


@dataclass
class PairsConfig:
    output_dir: str = "runs/pairs"
    mode: Literal["rejection", "self", "best-worst", "refine"] = "self"
    """rejection: dataset's chosen vs the policy's sample; self: best vs one of the bottom three of K
    samples; best-worst: best vs worst of K samples; refine: a refine folder's kept revision vs the
    original answer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy that samples (not used by mode refine)."""
    prompts: PromptSource = field(default_factory=lambda: PromptSource(dataset="", split="train"))
    """self, best-worst: the prompt set. rejection: a preference dataset (prompt/chosen/rejected, any schema
    `alignkit dpo` reads); subset, split, skip_prompts and max_prompts apply."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=512, temperature=0.7))
    """Decoding (max_new_tokens, top_p, seed, ...). rejection: one sample per replaced row at
    sampling.temperature; self, best-worst: temperatures and samples_per_temperature replace
    temperature and n."""
    temperatures: list[float] = field(default_factory=lambda: [0.2, 0.7, 1.2])
    """self, best-worst: the temperature schedule, one sampling pass each (distinct, > 0)."""
    samples_per_temperature: list[int] = field(default_factory=lambda: [2, 3, 3])
    """self, best-worst: samples per prompt at each of `temperatures` (K is their sum, >= 2)."""
    mix: float = 1.0
    """rejection: share of the dataset's pairs whose rejected answer is replaced by the policy's sample
    (exactly floor(mix * rows + 0.5) rows, seeded), 0 to 1."""
    require_reward_agreement: bool = False
    """rejection: keep a replacement only when the reward scores the chosen answer above the sample."""
    min_gap: float = 0.0
    """self, best-worst, refine: smallest score difference chosen - rejected (pairs always need > 0)."""
    refine_dir: str | None = None
    """refine: the output folder of an `alignkit refine` run (responses.jsonl, refinements.jsonl)."""
    eval_share: float = 0.0
    """Share of the pairs held out (seeded) in dataset/test.jsonl for DPO's evaluation, 0 to < 1."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Scores the samples (self, best-worst; rejection with require_reward_agreement)."""
    engine: Literal["transformers", "vllm"] = "transformers"
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    batch_size: int = 16
    """Sequences per generation batch (transformers engine)."""
    seed: int = 0
    """Seeds the draws (rejection's rows, self's rejected answer, the eval split); sampling.seed seeds samples."""
    overwrite: bool = False
    """When a samples/ folder holds a different job's responses: false stops naming what changed; true
    regenerates them. The same job resumes."""
    quiet: bool = False

    def validate(self, prefix: str) -> None:
        p = prefix
        if not 0 <= self.mix <= 1:
            raise ConfigError(f"{p}mix: {self.mix!r} is not allowed; expected a number in [0, 1]")
        if not 0 <= self.eval_share < 1:
            raise ConfigError(f"{p}eval_share: {self.eval_share!r} is not allowed; expected a number in [0, 1)")
        if self.min_gap < 0:
            raise ConfigError(f"{p}min_gap: {self.min_gap!r} is not allowed; expected a number >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"{p}batch_size: {self.batch_size} is not allowed; expected an integer >= 1")
        if self.sampling.n != 1 or self.sampling.num_beams != 1:
            raise ConfigError(f"{p}sampling.n and {p}sampling.num_beams must be 1 here; set the samples per prompt "
                              f"with {p}samples_per_temperature")
        if self.mode in ("self", "best-worst"):
            temps, counts = list(self.temperatures), list(self.samples_per_temperature)
            if not temps or len(temps) != len(counts):
                raise ConfigError(f"{p}temperatures {temps!r} and {p}samples_per_temperature {counts!r} must be "
                                  "non-empty lists of the same length (one sampling pass per temperature)")
            if any(not math.isfinite(t) or t <= 0 for t in temps) or len(set(temps)) < len(temps):
                raise ConfigError(f"{p}temperatures: {temps!r} is not allowed; expected distinct numbers > 0")
            if any(k < 1 for k in counts) or sum(counts) < 2:
                raise ConfigError(f"{p}samples_per_temperature: {counts!r} is not allowed; expected integers >= 1 "
                                  "adding up to at least 2 samples per prompt")
        if self.mode == "refine":
            if not self.refine_dir:
                raise ConfigError(f"{p}refine_dir is required for {p}mode refine (an `alignkit refine` output folder)")
            must_exist(p + "refine_dir", self.refine_dir, "refine output folder")
        else:
            if not str(self.prompts.dataset).strip():
                raise ConfigError(f"{p}prompts.dataset is required for {p}mode {self.mode}")
        if self.uses_reward() and self.reward.kind == "hf" and not self.reward.model:
            raise ConfigError(f"{p}reward.model is required for {p}reward.kind 'hf' (a reward model folder or "
                              f"Hub id); mode {self.mode} scores the policy's samples")

    def uses_reward(self) -> bool:
        return self.mode in ("self", "best-worst") or (self.mode == "rejection" and self.require_reward_agreement)


# --------------------------------------------------------------------------- the selection rules (pure)


def same_text(a: str, b: str) -> bool:
    """Two answers that would make a pair with identical sides (surrounding whitespace ignored)."""
    return a.strip() == b.strip()


def mix_count(rows: int, mix: float) -> int:
    """Rows replaced for a mix share: floor(mix * rows + 0.5), so 10% of 25 rows is 3 (2.5 rounds up)."""
    return min(rows, math.floor(mix * rows + 0.5))


def mix_rows(rows: int, mix: float, seed: int) -> list[int]:
    """The rows whose rejected answer is replaced: exactly mix_count(rows, mix) of them, a seeded draw, sorted."""
    return sorted(random.Random(f"mix:{seed}").sample(range(rows), mix_count(rows, mix)))


def rejection_verdict(chosen: str, sample: str, score_chosen: float | None = None,
                      score_sample: float | None = None, require_agreement: bool = False) -> str | None:
    """None when the policy's sample may replace the rejected answer of a pair, else why not."""
    if not sample.strip():
        return EMPTY
    if same_text(chosen, sample):
        return SAME_TEXT
    if require_agreement and not score_chosen > score_sample:
        return DISAGREE
    return None


def best_index(scores: list[float], among: list[int] | None = None) -> int:
    """The highest score (among these indices; default all); a tie goes to the earliest sample."""
    return max(range(len(scores)) if among is None else among, key=lambda k: (scores[k], -k))


def usable_samples(texts: list[str], scores: list[float]) -> list[int] | str:
    """Indices of the non-empty samples, or why the prompt is dropped (TIE: every score the same;
    EMPTY_TIE: the non-empty samples' scores all the same)."""
    if len(set(scores)) <= 1:
        return TIE
    usable = [k for k in range(len(texts)) if texts[k].strip()]
    if len({scores[k] for k in usable}) <= 1:
        return EMPTY_TIE
    return usable


def select_self(texts: list[str], scores: list[float], rng: random.Random,
                min_gap: float = 0.0) -> tuple[int, int] | str:
    """(chosen, rejected) sample indices for mode self, or why the prompt is dropped.

    Chosen: the best. Rejected: a random one (rng) of the BOTTOM lowest-scored samples, lowest first and
    ties in sample order, among the eligible: scored strictly and at least min_gap below the best, with a
    text that differs from the chosen one. Empty samples are neither."""
    usable = usable_samples(texts, scores)
    if isinstance(usable, str):
        return usable
    best = best_index(scores, usable)
    eligible = [k for k in usable if scores[k] < scores[best] and scores[best] - scores[k] >= min_gap
                and not same_text(texts[k], texts[best])]
    if not eligible:
        return GAP
    bottom = sorted(eligible, key=lambda k: (scores[k], k))[:BOTTOM]
    return best, rng.choice(bottom)


def select_best_worst(texts: list[str], scores: list[float], min_gap: float = 0.0) -> tuple[int, int] | str:
    """(best, worst) non-empty sample indices, or why the prompt is dropped; ties go to the earliest sample."""
    usable = usable_samples(texts, scores)
    if isinstance(usable, str):
        return usable
    best = best_index(scores, usable)
    worst = min(usable, key=lambda k: (scores[k], k))
    if scores[best] - scores[worst] < min_gap or same_text(texts[best], texts[worst]):
        return GAP
    return best, worst


def refine_verdict(original: str, kept: str, score_original: float | None, score_kept: float | None,
                   min_gap: float = 0.0) -> str | None:
    """None when refine's kept answer makes a pair (chosen) over the original (rejected), else why not."""
    if same_text(original, kept):
        return NOT_REFINED
    if not kept.strip() or not original.strip():
        return EMPTY_REFINE
    if score_original is None or score_kept is None or not score_kept > score_original:
        return "revision not scored above the original"
    if score_kept - score_original < min_gap:
        return GAP
    return None


def prompt_rng(seed: int, key: str) -> random.Random:
    """A prompt's own random stream (from the seed and the prompt), so a draw never depends on order or resume."""
    return random.Random(f"{seed}:{key}")


def pair_row(prompt: list[dict], chosen: str, rejected: str, origin: str, category=None,
             score_chosen: float | None = None, score_rejected: float | None = None) -> dict:
    """One row of the preference schema alignkit dpo reads (TRL's explicit-prompt conversational form)."""
    if same_text(chosen, rejected) or not chosen.strip() or not rejected.strip():
        raise ValueError("a pair with identical or empty sides")  # the selection rules never produce one
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "origin": origin,
            "category": None if category is None else str(category),
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def split_eval(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): floor(share * rows + 0.5) rows held out, a seeded draw; order kept."""
    held = set(mix_rows(len(rows), share, seed + 1)) if share > 0 else set()
    return [r for k, r in enumerate(rows) if k not in held], [r for k, r in enumerate(rows) if k in held]


# --------------------------------------------------------------------------- inputs


def group_name(t: float) -> str:
    return f"t{t:g}"


def schedule(cfg: PairsConfig) -> list[tuple[float, int]]:
    """(temperature, samples) per sampling pass."""
    if cfg.mode == "rejection":
        return [(cfg.sampling.temperature, 1)]
    return list(zip(cfg.temperatures, cfg.samples_per_temperature))


def read_preference_rows(src: PromptSource) -> list[dict]:
    """The rejection mode's pairs, validated (file, row, field) as alignkit dpo would read them."""
    rows, source = load_rows(src.dataset, src.split, src.subset)
    start = min(src.skip_prompts, len(rows))
    stop = len(rows) if src.max_prompts is None else min(len(rows), start + src.max_prompts)
    ids = list(range(start, stop))
    return normalise(rows.select(ids), source, "preference", row_ids=ids)


def read_refine(folder: Path) -> list[dict]:
    """(prompt, original, kept, their scores) per answer of a refine run, from its files."""
    responses, records = folder / "responses.jsonl", folder / "refinements.jsonl"
    for f in (responses, records):
        if not f.is_file():
            raise DataError(f"{f}: not found; refine_dir must be the output folder of a finished `alignkit refine`")
    first = {}
    for i, r in enumerate(read_jsonl(records), 1):
        if not isinstance(r, dict) or not {"id", "sample", "round", "answer"} <= set(r):
            raise DataError(f"{records}: line {i}: expected id, sample, round and answer (refine's records)")
        if r["round"] == 1:
            first[(r["id"], r["sample"])] = r
    out = []
    for i, r in enumerate(read_jsonl(responses), 1):
        need = {"id", "sample", "prompt", "response", "score", "original_score"}
        if not isinstance(r, dict) or not need <= set(r):
            raise DataError(f"{responses}: line {i}: expected {', '.join(sorted(need))} (refine's responses)")
        rec = first.get((r["id"], r["sample"]))
        if rec is None:
            raise DataError(f"{responses}: line {i}: id {r['id']} sample {r['sample']} has no round-1 record in "
                            f"{records.name}")
        out.append({"prompt": r["prompt"], "original": rec["answer"], "kept": r["response"],
                    "score_original": r["original_score"], "score_kept": r["score"], "category": r.get("category")})
    if not out:
        raise DataError(f"{responses}: no answers")
    return out


def policy_prompts(cfg: PairsConfig, prefs: list[dict] | None) -> list[dict]:
    """[{messages, category, columns}] the policy answers: the prompt set, or the replaced rows' prompts."""
    if prefs is not None:
        return [{"messages": p["prompt"], "category": p.get("category"), "columns": {}} for p in prefs]
    return [{"messages": p["messages"], "category": p["category"], "columns": p["columns"]}
            for p in load_prompts(cfg.prompts)]


def check_rule_rows(backend, prompts: list[dict]) -> None:
    """A rule verifier that needs columns the rows lack stops here, before any model call."""
    rule = backend.backend if isinstance(backend, CachedReward) else backend
    if isinstance(rule, RuleReward):
        rule.check_rows([p["messages"] for p in prompts], [p["columns"] for p in prompts],
                        lambda i: f"prompt {i + 1}")


# --------------------------------------------------------------------------- sampling and scoring


def write_prompt_file(path: Path, prompts: list[dict]) -> None:
    """The prompts generate reads (messages, category); rewritten only when they changed (resume)."""
    text = "".join(json.dumps({"messages": p["messages"], **({"category": str(p["category"])}
                                                              if p["category"] is not None else {})}) + "\n"
                   for p in prompts)
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, text)


def sample(cfg: PairsConfig, out: Path, prompt_file: Path, n_prompts: int) -> list[list[dict]]:
    """Each prompt's samples (pass by pass, in sample order): {text, temperature, finish_reason}.
    Each pass is an `alignkit generate` job in samples/t<T>/ (resumable; seed = sampling.seed + pass)."""
    per_prompt: list[list[dict]] = [[] for _ in range(n_prompts)]
    for g, (t, n) in enumerate(schedule(cfg)):
        seed = None if cfg.sampling.seed is None else cfg.sampling.seed + g
        gen = GenerateConfig(
            output_dir=str(out / "samples" / group_name(t)), model=cfg.model,
            prompts=PromptSource(dataset=str(prompt_file), split="train"),
            sampling=replace(cfg.sampling, temperature=t, n=n, seed=seed), engine=cfg.engine, vllm=cfg.vllm,
            batch_size=cfg.batch_size, overwrite=cfg.overwrite, quiet=cfg.quiet)
        for r in sorted(read_jsonl(run_generate(gen)), key=lambda r: (r["id"], r["sample"])):
            per_prompt[r["id"]].append({"text": r["response"], "temperature": t, "finish_reason": r["finish_reason"]})
    return per_prompt


def score_all(backend, items: list[tuple[list[dict], str, dict]]) -> list[float]:
    """Scores of (prompt, response, columns) items; each distinct (prompt, response) scored once, so
    identical answers tie (through the cache, a rerun pays for none twice)."""
    index: dict[tuple[str, str], int] = {}
    unique = []
    for messages, response, columns in items:
        key = (prompt_key(messages), response)
        if key not in index:
            index[key] = len(unique)
            unique.append((messages, response, columns))
    if not unique:
        return []
    scores = backend.score([m for m, _, _ in unique], [r for _, r, _ in unique], [c for _, _, c in unique])
    return [scores[index[(prompt_key(m), r)]] for m, r, _ in items]


# --------------------------------------------------------------------------- the stage


def build_pairs(cfg: PairsConfig, out: Path) -> tuple[list[dict], list[dict], Counter, dict, str | None]:
    """(pairs, candidates, dropped reasons, counts, reward identity) for the config's mode."""
    dropped: Counter = Counter()
    if cfg.mode == "refine":
        rows = read_refine(Path(cfg.refine_dir))
        pairs = []
        for r in rows:
            why = refine_verdict(r["original"], r["kept"], r["score_original"], r["score_kept"], cfg.min_gap)
            if why:
                dropped[why] += 1
                continue
            pairs.append(pair_row(r["prompt"], r["kept"], r["original"], "refine", r["category"],
                                  r["score_kept"], r["score_original"]))
        judge = (json.loads((Path(cfg.refine_dir) / "refine.json").read_text()).get("judge")
                 if (Path(cfg.refine_dir) / "refine.json").is_file() else None)
        return pairs, [], dropped, {"answers": len(rows)}, judge

    prefs = read_preference_rows(cfg.prompts) if cfg.mode == "rejection" else None
    replaced = mix_rows(len(prefs), cfg.mix, cfg.seed) if prefs is not None else None
    prompts = policy_prompts(cfg, [prefs[k] for k in replaced] if prefs is not None else None)
    backend = build_backend(cfg.reward, cfg.reward.cache_path(out)) if cfg.uses_reward() else None
    if backend is not None:
        check_rule_rows(backend, prompts)
    out.mkdir(parents=True, exist_ok=True)
    prompt_file = out / "prompts.jsonl"
    write_prompt_file(prompt_file, prompts)
    samples = sample(cfg, out, prompt_file, len(prompts)) if prompts else []
    judge = backend.identity if backend is not None else None

    if cfg.mode == "rejection":
        mine = dict(zip(replaced, samples))
        scores = {}
        if backend is not None:
            items = [(prefs[k]["prompt"], text, {}) for k in replaced for text in (prefs[k]["chosen"], mine[k][0]["text"])]
            flat = score_all(backend, items)
            scores = {k: (flat[2 * j], flat[2 * j + 1]) for j, k in enumerate(replaced)}
        pairs, candidates = [], []
        for k, p in enumerate(prefs):
            if k in mine:
                text = mine[k][0]["text"]
                sc, ss = scores.get(k, (None, None))
                candidates.append({"row": k, "prompt": p["prompt"], "response": text, "score": ss,
                                   "chosen_score": sc, "temperature": mine[k][0]["temperature"]})
                why = rejection_verdict(p["chosen"], text, sc, ss, cfg.require_reward_agreement)
                if why is None:
                    pairs.append(pair_row(p["prompt"], p["chosen"], text, "policy", p.get("category"), sc, ss))
                    continue
                dropped[f"replacement refused: {why} (original pair kept)"] += 1
            pairs.append(pair_row(p["prompt"], p["chosen"], p["rejected"], "dataset", p.get("category")))
        counts = {"dataset_rows": len(prefs), "replacements_planned": len(replaced),
                  "replaced": sum(r["origin"] == "policy" for r in pairs),
                  "samples": len(replaced)}
        counts["replaced_share"] = counts["replaced"] / len(prefs)
        return pairs, candidates, dropped, counts, judge

    items = [(p["messages"], s["text"], p["columns"]) for p, ss in zip(prompts, samples) for s in ss]
    flat = iter(score_all(backend, items))
    pairs, candidates = [], []
    for i, (p, ss) in enumerate(zip(prompts, samples)):
        texts, scores = [s["text"] for s in ss], [next(flat) for _ in ss]
        for j, (s, sc) in enumerate(zip(ss, scores)):
            candidates.append({"id": i, "sample": j, "prompt": p["messages"], "response": s["text"], "score": sc,
                               "temperature": s["temperature"], "finish_reason": s["finish_reason"]})
        if cfg.mode == "self":
            picked = select_self(texts, scores, prompt_rng(cfg.seed, prompt_key(p["messages"])), cfg.min_gap)
        else:
            picked = select_best_worst(texts, scores, cfg.min_gap)
        if isinstance(picked, str):
            dropped[picked] += 1
            continue
        c, r = picked
        pairs.append(pair_row(p["messages"], texts[c], texts[r], "policy", p["category"], scores[c], scores[r]))
    counts = {"prompts": len(prompts), "samples": len(items),
              "samples_per_prompt": sum(cfg.samples_per_temperature)}
    return pairs, candidates, dropped, counts, judge


def mode_parameters(cfg: PairsConfig) -> dict:
    common = {"seed": cfg.seed, "eval_share": cfg.eval_share}
    if cfg.mode == "refine":
        return {**common, "refine_dir": cfg.refine_dir, "min_gap": cfg.min_gap}
    sampling = asdict(cfg.sampling)
    if cfg.mode == "rejection":
        return {**common, "mix": cfg.mix, "require_reward_agreement": cfg.require_reward_agreement,
                "sampling": sampling}
    sampling.pop("temperature")
    return {**common, "temperatures": list(cfg.temperatures),
            "samples_per_temperature": list(cfg.samples_per_temperature), "min_gap": cfg.min_gap,
            "bottom": BOTTOM if cfg.mode == "self" else None, "sampling": sampling}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


RESULTS = ("card.json", "candidates.jsonl", "dataset/train.jsonl", "dataset/test.jsonl")


def run_pairs(cfg: PairsConfig) -> Path:
    """Checks (config, data, reward) first, then samples, scores, the pairs, and card.json last."""
    config_lib.validate(cfg)
    if cfg.uses_reward():
        check_reward_config(cfg.reward)
    out = Path(cfg.output_dir)
    for name in RESULTS:  # a failed run leaves none of an earlier run's results
        (out / name).unlink(missing_ok=True)
    pairs, candidates, dropped, counts, judge = build_pairs(cfg, out)
    if not pairs:
        raise DataError(f"pairs: no pair was made from {counts} (dropped: {dict(dropped) or 'none'}); "
                        "look at candidates.jsonl, or lower min_gap")
    train, test = split_eval(pairs, cfg.eval_share, cfg.seed)
    (out / "dataset").mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out / "config.yaml")
    write_jsonl(out / "dataset" / "train.jsonl", train)
    if test:
        write_jsonl(out / "dataset" / "test.jsonl", test)
    if candidates:
        write_jsonl(out / "candidates.jsonl", candidates)
    card = {
        "stage": "pairs", "mode": cfg.mode, "alignkit": code_version(),
        "policy": None if cfg.mode == "refine" else cfg.model.name_or_path,
        "source": cfg.refine_dir if cfg.mode == "refine" else cfg.prompts.dataset,
        "reward": judge, "parameters": mode_parameters(cfg),
        "counts": {**counts, "pairs": len(pairs), "train": len(train), "test": len(test),
                   "dropped": sum(dropped.values())},
        "dropped": dict(sorted(dropped.items())),
        "mean_gap": mean([p["score_chosen"] - p["score_rejected"] for p in pairs if p["score_chosen"] is not None]),
        "files": {"train": "dataset/train.jsonl", **({"test": "dataset/test.jsonl"} if test else {}),
                  **({"candidates": "candidates.jsonl"} if candidates else {})},
    }
    write_atomic(out / "card.json", json.dumps(card, indent=1))
    if not cfg.quiet:
        why = "; ".join(f"{n} x {k}" for k, n in card["dropped"].items()) or "none"
        print(terminal_safe(f"pairs ({cfg.mode}): {len(pairs)} pairs ({len(train)} train, {len(test)} test) in "
                            f"{out / 'dataset'}; dropped: {why}"))
    return out
