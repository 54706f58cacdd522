"""Does `alignkit curriculum` find the weakest task kind of the demo's toy world?

Builds today's toy world (alignkit.demo.world), trains the tiny model with SFT for --steps, has the
eval stage compare it on the held-out prompts with the toy solver's answers (the reference: always
right) judged by the toy verifier, then runs `alignkit curriculum` on that eval (categories: the
task kind column) with the world's training prompts as seeds. The generator is a scripted loopback
chat endpoint that writes new prompts of the kind asked for with the world's own task generator
(`make_example`), standing in for a capable teacher; `--generator model` uses the SFT model itself.

Checked independently: the kind curriculum picks is the kind with the lowest mean verifier reward of
the SFT model, and every new prompt is of that kind (by the task's prompt patterns) and new (in no
training or held-out file). Not done here: a training round on the new prompts (that needs
`alignkit pairs`, mode self).

    python bench/curriculum_toy.py --output-dir runs/curriculum-toy --steps 200
    # on a shared, loaded machine: OMP_NUM_THREADS=1 nice -n 10 python bench/curriculum_toy.py ...
"""

from __future__ import annotations

import argparse
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
from alignkit.demo.task import KINDS, PATTERNS, make_example, solve
from alignkit.demo.world import build_tokenizer, write_chat_data, write_model_config, write_prompt_data
from alignkit.evaluate.run import EvalConfig, run_eval
from alignkit.loops.curriculum import CurriculumConfig, run_curriculum
from alignkit.models import init_model, load_tokenizer
from alignkit.train.sft import SFTConfig, run_sft


def teacher_endpoint() -> tuple[ThreadingHTTPServer, str]:
    """A chat endpoint that answers a curriculum request with a new toy prompt of the category asked for."""
    rng, lock = random.Random(1), threading.Lock()

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
            with lock:
                prompt = make_example(rng, kind)["prompt"] if kind in KINDS else "?"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", default="runs/curriculum-toy")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-prompts", type=int, default=100)
    ap.add_argument("--generator", choices=["teacher", "model"], default="teacher")
    args = ap.parse_args()
    quiet_third_party()
    out, t0 = Path(args.output_dir), time.time()
    world = out / "world"
    tok = build_tokenizer(world / "tokenizer")
    chat = load_tokenizer(ModelConfig(name_or_path=str(tok)))
    write_model_config(world / "model-config", vocab_size=len(chat.tokenizer))
    if not (world / "base-model").is_dir():
        init_model(str(world / "model-config"), world / "base-model", tokenizer_source=str(tok), seed=args.seed)
    write_chat_data(world / "data", n_train=4000)
    write_prompt_data(world / "prompts", n_train=1000)

    sft = C.build(SFTConfig, {
        "output_dir": str(out / "sft"), "seed": args.seed, "quiet": False, "resume": (out / "sft").is_dir(),
        "model.name_or_path": str(world / "base-model"), "data.dataset": str(world / "data"), "data.split": "train",
        "train.max_steps": args.steps, "train.batch_size": 32, "train.learning_rate": 3e-3, "train.weight_decay": 0.01,
        "train.scheduler": "cosine", "train.warmup_steps": 20, "train.logging_steps": 10, "train.save_steps": 100,
        "train.precision": "fp32"})
    if not (out / "sft" / "final").is_dir():
        run_sft(sft)
    test = [json.loads(line) for line in (world / "data" / "test.jsonl").read_text().splitlines() if line.strip()]
    reference = out / "solver.jsonl"
    reference.write_text("".join(json.dumps({"prompt": r["messages"][:1], "response": solve(r["messages"][0]["content"]),
                                             "category": r["category"]}) + "\n" for r in test))
    ev = C.build(EvalConfig, {"output_dir": str(out / "eval"), "model": str(out / "sft" / "final"),
                              "reference": str(reference), "prompts.dataset": str(world / "data"), "prompts.split": "test",
                              "sampling.max_new_tokens": 24, "reward.kind": "rule", "reward.rule": "toy",
                              "bootstrap": 200, "quiet": True})
    run_eval(ev)

    server, url = teacher_endpoint()
    try:
        cur = CurriculumConfig(output_dir=str(out / "curriculum"), eval=str(out / "eval"), weakest=1, min_prompts=10,
                               new_prompts=args.new_prompts, quiet=True)
        cur.model.name_or_path = str(out / "sft" / "final")
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
    card = json.loads((out / "curriculum" / "card.json").read_text())
    per_prompt = [json.loads(line) for line in (out / "eval" / "per_prompt.jsonl").read_text().splitlines() if line]
    reward = {k: [r["reward_a"] for r in per_prompt if r["category"] == k] for k in KINDS}
    mean = {k: sum(v) / len(v) for k, v in reward.items() if v}
    lowest = min(mean, key=lambda k: (mean[k], k))
    written = out / "curriculum" / "prompts.jsonl"
    new = [json.loads(line)["prompt"] for line in written.read_text().splitlines() if line] if written.is_file() else []
    known = {json.loads(line)["messages"][0]["content"] for f in ("train", "test")
             for line in (world / "data" / f"{f}.jsonl").read_text().splitlines() if line}
    known |= {json.loads(line)["prompt"] for line in (world / "prompts" / "train.jsonl").read_text().splitlines() if line}
    result = {
        "steps": args.steps, "seed": args.seed, "generator": card["generator"],
        "loss_rate": {k: round(r["loss_rate"], 3) for k, r in card["rates"].items()},
        "mean_reward_sft": {k: round(v, 3) for k, v in mean.items()},
        "picked": card["picked"], "lowest_mean_reward": lowest, "agree": card["picked"] == [lowest],
        "new_prompts": len(new), "new_of_picked_kind": sum(kind_of(p) in card["picked"] for p in new),
        "new_in_world_files": sum(p in known for p in new), "dropped": card["dropped"],
        "wall_s": round(time.time() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
