"""Does `alignkit curriculum` find the weakest task kind of the demo's toy world, and does a round on it help?

Takes the demo's SFT model (`--from-demo DIR`: a finished `alignkit demo --output-dir DIR`, its world
and sft/final; else builds the demo's world and trains the demo pipeline's `sft` stage here), has the
eval stage compare it on the 160 held-out prompts with the toy solver's answers (the reference:
always right) judged by the toy verifier, then runs `alignkit curriculum` on that eval (categories:
the task kind column; weakest: 1) with the world's RL prompts as seeds. The generator is a scripted
loopback chat endpoint that writes new prompts of the kind asked for with the world's own task
generator (`make_example`), standing in for a capable teacher; `--generator model` uses the SFT model.

Checked independently: the picked kind is the kind with the lowest mean verifier reward of the SFT
model, every new prompt is of that kind (by the task's prompt patterns), and none is a held-out prompt;
how many are already in a training file of the world (SFT chats, preference pairs) is counted: a kind
with few prompts (repeat: 256) has no others left.

Then one training round on the new prompts (--fresh-only: only those in no world file; --with-seeds:
the picked kind's seed prompts too), as the demo pipeline's `self-pairs` and `self-dpo` stages
run it: `alignkit pairs` mode self from the SFT model (K = 8: 2/3/3 samples at temperatures
0.2/0.7/1.2, the toy verifier scores, max_new_tokens 24), then DPO-Positive from the SFT model on those
pairs (beta 0.1, dpop_lambda 5, lr 3e-4, batch 16, cosine, warmup 10, fp32; --dpo-steps, default 25: about
four passes over the round's ~95 pairs, where the demo's 100 steps are for ~800; 100 here cost other kinds).
Greedy replies of the SFT and the new model on the held-out prompts: content rate (right once a
trailing sign-off is cut) per kind before and after, wins / losses on the picked kind with the exact
sign test, and on the other kinds together. Prints one JSON line; writes result.json.

    python bench/curriculum_toy.py --from-demo runs/demo --output-dir runs/curriculum-toy
    python bench/curriculum_toy.py --output-dir runs/curriculum-toy --steps 1000   # builds the world
    # on a shared, loaded machine: OMP_NUM_THREADS=1 nice -n 10 python bench/curriculum_toy.py ...
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from alignkit import config as C
from alignkit.cli import quiet_third_party
from alignkit.config import ModelConfig
from alignkit.data.loading import DataError
from alignkit.demo.run import PIPELINE, demo_sft_config, demo_vars, toy_scores, write_world_data
from alignkit.demo.task import KINDS, PATTERNS, in_habit, make_example, solve
from alignkit.demo.world import DEMO_MODEL, DEMO_VOCAB, build_tokenizer, read_prompts, write_model_config
from alignkit.evaluate.run import EvalConfig, run_eval
from alignkit.loops.curriculum import CurriculumConfig, run_curriculum
from alignkit.loops.pairs import run_pairs
from alignkit.models import init_model, load_tokenizer
from alignkit.pipeline import read_pipeline
from alignkit.train.dpo import DPOConfig, run_dpo
from alignkit.train.sft import run_sft
from alignkit.winrate import paired_counts

WORLD_FILES = ("data/train.jsonl", "data/test.jsonl", "prefs/train_prefs.jsonl", "prefs/test_prefs.jsonl",
               "prompts/train.jsonl", "prompts/test.jsonl")


def teacher_endpoint(seed: int = 1) -> tuple[ThreadingHTTPServer, str]:
    """A chat endpoint that answers a curriculum request with a new toy prompt of the category asked for.
    Its draw is seeded by the request's text (the seed prompts it shows), not by arrival order: curriculum
    sends requests concurrently, and a shared generator made the prompts' order differ from run to run."""

    class Teacher(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            kind = re.search(r'category "([^"]+)"', body["messages"][-1]["content"]).group(1)
            key = hashlib.sha256(f"{seed}:{json.dumps(body['messages'])}".encode()).hexdigest()
            prompt = make_example(random.Random(key), kind)["prompt"] if kind in KINDS else "?"
            raw = json.dumps({"choices": [{"message": {"role": "assistant", "content": prompt}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def kind_of(prompt: str) -> str | None:
    return next((k for k, p in PATTERNS.items() if p.match(prompt)), None)


def build_world(out: Path, steps: int | None, seed: int) -> None:
    """The demo's world and its SFT stage, in out/world and out/sft (kept when already there)."""
    world = out / "world"
    if not (world / "data" / "test.jsonl").is_file():
        tok = build_tokenizer(world / "tokenizer", vocab_size=DEMO_VOCAB)
        chat = load_tokenizer(ModelConfig(name_or_path=str(tok)))
        write_model_config(world / "model-config", vocab_size=len(chat.tokenizer), **DEMO_MODEL)
        init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok), seed=seed)
        write_world_data(world)
    if not (out / "sft" / "final").is_dir():
        sft = demo_sft_config(world, out / "sft", steps or 1000, quiet=True, seed=seed)
        run_sft(sft)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", default="runs/curriculum-toy")
    ap.add_argument("--from-demo", default=None, help="a finished demo's --output-dir: its world and sft/final")
    ap.add_argument("--steps", type=int, default=None, help="SFT steps when building the world (default: the demo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-prompts", type=int, default=200)
    ap.add_argument("--dpo-steps", type=int, default=25)
    ap.add_argument("--generator", choices=["teacher", "model"], default="teacher")
    ap.add_argument("--dpo-set", nargs=2, action="append", metavar=("KEY", "VALUE"),
                    help="override one of the round's DPO settings, e.g. --dpo-set dpo.beta 0.3")
    ap.add_argument("--with-seeds", action="store_true",
                    help="the round also samples the picked kinds' seed prompts")
    ap.add_argument("--fresh-only", action="store_true",
                    help="train the round only on prompts no world file holds")
    ap.add_argument("--no-round", action="store_true", help="stop after curriculum (no pairs, DPO, comparison)")
    args = ap.parse_args()
    leaves = C.leaf_fields(DPOConfig)
    for key, _ in args.dpo_set or []:  # checked before any work
        if key not in leaves:
            raise SystemExit(f"--dpo-set: unknown key {key}{C.suggest(key, sorted(leaves))}")
    quiet_third_party()
    out, t0, timings = Path(args.output_dir), time.time(), {}
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.from_demo) if args.from_demo else out
    if not args.from_demo:
        start = time.time()
        build_world(out, args.steps, args.seed)
        timings["world_sft_s"] = round(time.time() - start)
    world, sft_final = root / "world", root / "sft" / "final"

    start = time.time()
    test = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    reference = out / "solver.jsonl"
    reference.write_text("".join(json.dumps({"prompt": r["messages"][:1], "response": solve(r["messages"][0]["content"]),
                                             "category": r["category"]}) + "\n" for r in test))
    ev = C.build(EvalConfig, {"output_dir": str(out / "eval"), "model": str(sft_final),
                              "reference": str(reference), "prompts.dataset": str(world / "data"), "prompts.split": "test",
                              "sampling.max_new_tokens": 24, "reward.kind": "rule", "reward.rule": "toy",
                              "bootstrap": 200, "quiet": True})
    run_eval(ev)
    timings["eval_s"] = round(time.time() - start)

    start = time.time()
    server, url = teacher_endpoint(args.seed + 1)
    try:
        cur = CurriculumConfig(output_dir=str(out / "curriculum"), eval=str(out / "eval"), weakest=1, min_prompts=10,
                               new_prompts=args.new_prompts, quiet=True)
        cur.model.name_or_path = str(sft_final)
        cur.prompts.dataset, cur.prompts.split, cur.prompts.column = str(world / "prompts"), "train", None
        cur.prompts.max_prompts = None
        if args.generator == "teacher":
            cur.generator.kind, cur.generator.base_url, cur.generator.model = "openai", url, "toy-teacher"
        cur.generator.sampling.n, cur.generator.sampling.max_new_tokens = 1, 24
        try:
            run_curriculum(cur)
        except DataError as e:  # nothing new survived: the card says why
            print(f"curriculum: {e}")
    finally:
        server.shutdown()
    timings["curriculum_s"] = round(time.time() - start)
    card = json.loads((out / "curriculum" / "card.json").read_text())
    per_prompt = [json.loads(line) for line in (out / "eval" / "per_prompt.jsonl").read_text().splitlines() if line]
    reward = {k: [r["reward_a"] for r in per_prompt if r["category"] == k] for k in KINDS}
    mean = {k: sum(v) / len(v) for k, v in reward.items() if v}
    lowest = min(mean, key=lambda k: (mean[k], k))
    written = out / "curriculum" / "prompts.jsonl"
    new = [json.loads(line)["prompt"] for line in written.read_text().splitlines() if line] if written.is_file() else []
    known = {p for f in WORLD_FILES if (world / f).is_file() for _, p in read_prompts(world / f)}
    result = {
        "from_demo": args.from_demo, "seed": args.seed, "generator": card["generator"],
        "loss_rate": {k: round(r["loss_rate"], 3) for k, r in card["rates"].items()},
        "mean_reward_sft": {k: round(v, 3) for k, v in mean.items()},
        "picked": card["picked"], "lowest_mean_reward": lowest, "agree": card["picked"] == [lowest],
        "new_prompts": len(new), "new_distinct": len(set(new)),
        "new_of_picked_kind": sum(kind_of(p) in card["picked"] for p in new),
        "new_in_world_files": sum(p in known for p in new), "dropped": card["dropped"],
    }

    if new and not args.no_round:
        variables = [v for v in demo_vars(world, 1, 1, args.seed) if v.split("=")[0] in {"world", "seed"}]
        stages = {s.name: s.config for s in read_pipeline(PIPELINE, variables, run_dir=str(root)).stages}
        pairs, dpo = stages["self-pairs"], stages["self-dpo"]
        pairs.output_dir, pairs.quiet, pairs.overwrite = str(out / "pairs"), True, True  # a rerun's prompts may differ
        pairs.model.name_or_path = str(sft_final)
        # curriculum drops seed and eval prompts; a prompt that an SFT chat or a preference pair already
        # holds stays in the round unless --fresh-only (a kind with few prompts, like repeat's 256, has
        # none left that no training file holds). No held-out prompt may reach the round.
        fresh = [json.loads(line) for line in written.read_text().splitlines() if line]
        held_out = {p for _, p in read_prompts(world / "data" / "test.jsonl")}
        assert not any(r["prompt"] in held_out for r in fresh), "a held-out prompt reached the round"
        if args.fresh_only:
            fresh = [r for r in fresh if r["prompt"] not in known]
        if args.with_seeds:  # the picked kinds' seed prompts (the world's RL prompts) join the round
            fresh += [{"prompt": p, "category": k} for k, p in read_prompts(world / "prompts" / "train.jsonl")
                      if k in card["picked"]]
        round_prompts = out / "round-prompts.jsonl"
        round_prompts.write_text("".join(json.dumps(r) + "\n" for r in fresh))
        pairs.prompts.dataset, pairs.prompts.split = str(round_prompts), "train"
        start = time.time()
        try:
            run_pairs(pairs)
            pcard = json.loads((out / "pairs" / "card.json").read_text())
            if pcard["counts"]["train"] < dpo.train.batch_size * dpo.train.grad_accum:
                raise DataError(f"{pcard['counts']['train']} pairs, fewer than one DPO batch ({pcard['dropped']})")
        except DataError as e:  # e.g. a weak model whose samples all tie: no round to measure
            result["round"] = {"skipped": str(e)}
            return finish(out, result, timings, t0)
        timings["pairs_s"] = round(time.time() - start)
        dpo.output_dir, dpo.quiet = str(out / "dpo"), True
        dpo.model.name_or_path = str(sft_final)
        dpo.data.dataset, dpo.data.split = str(out / "pairs" / "dataset"), "train"
        dpo.train.max_steps, dpo.train.save_steps = args.dpo_steps, None
        for key, value in (args.dpo_set or []):  # e.g. --dpo-set dpo.beta 0.3, typed as the command line
            *parents, leaf = key.split(".")
            setattr(functools.reduce(getattr, parents, dpo), leaf, C.coerce(value, leaves[key][0], key))
        start = time.time()
        run_dpo(dpo)
        timings["dpo_s"] = round(time.time() - start)
        start = time.time()
        before, after = toy_scores(sft_final, test), toy_scores(out / "dpo" / "final", test)
        timings["score_s"] = round(time.time() - start)
        picked = card["picked"][0]
        is_picked = [p["category"] == picked for p in test]
        a, b = [s["content"] for s in after["samples"]], [s["content"] for s in before["samples"]]

        def among(picked_kind: bool) -> tuple[list, list]:
            """The two models' content marks on the held-out prompts of the picked kind (or the others)."""
            keep = [m == picked_kind for m in is_picked]
            return [x for x, k in zip(a, keep) if k], [y for y, k in zip(b, keep) if k]

        made = [json.loads(line)["prompt"][-1]["content"]
                for line in (out / "pairs" / "dataset" / "train.jsonl").read_text().splitlines() if line]
        habit = [in_habit(p["messages"][0]["content"]) for p in test]
        sub = {}
        for name, want in (("habit", True), ("other", False)):
            keep = [m and h == want for m, h in zip(is_picked, habit)]
            sa, sb = [x for x, k in zip(a, keep) if k], [y for y, k in zip(b, keep) if k]
            sub[name] = {"n": len(sa), "sft": sum(sb), "new": sum(sa)}
        result["round"] = {
            "round_prompts": len(fresh),
            "round_prompts_in_training_files": sum(r["prompt"] in known for r in fresh),
            "round_prompts_habit": sum(in_habit(r["prompt"]) for r in fresh),
            "pairs_on_habit_prompts": sum(in_habit(p) for p in made),
            "pairs": pcard["counts"], "pairs_dropped": pcard["dropped"], "pairs_mean_gap": pcard["mean_gap"],
            "dpo_steps": dpo.train.max_steps, "dpo": {"beta": dpo.dpo.beta, "dpop_lambda": dpo.dpo.dpop_lambda,
                                                      "lr": dpo.train.learning_rate, "batch": dpo.train.batch_size},
            "content_per_kind": {k: {"sft": round(before["content_per_task"][k], 3),
                                     "new": round(after["content_per_task"][k], 3)} for k in KINDS},
            "content_all": {"sft": round(sum(b) / len(b), 3), "new": round(sum(a) / len(a), 3)},
            "exact_all": {"sft": round(before["accuracy"], 3), "new": round(after["accuracy"], 3)},
            "stop_rate": {"sft": before["stop_rate"], "new": after["stop_rate"]},
            "sign_off_rate": {"sft": before["sign_off_rate"], "new": after["sign_off_rate"]},
            "picked_kind_right_by_subtype": sub,
            "picked_kind": {"n": sum(is_picked), **paired_counts(*among(True))},
            "other_kinds": {"n": len(test) - sum(is_picked), **paired_counts(*among(False))},
            "all": paired_counts(a, b),
        }
    finish(out, result, timings, t0)


def finish(out: Path, result: dict, timings: dict, t0: float) -> None:
    result["timings_s"] = timings
    result["wall_s"] = round(time.time() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
