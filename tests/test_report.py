"""`alignkit report` (issue #9): the report of a run directory, its plots, and the matrix's statistics that decide."""

import json
import math
import re
import sys

import pytest

import alignkit.evaluate.run as eval_run
from alignkit.cli import main
from alignkit.evaluate.run import EvalConfig, run_eval
from alignkit.winrate import bootstrap_ci, outcomes, summarize
from alignkit.report import find_stages, write_report

HOSTILE = "```\n# Heading <img src=x onerror=alert(1)>\n| a | b |\n````` [link](javascript:x) \x1b[31mred\x07\r\n~~~"


class LengthJudge:
    """Scores a response by its length."""

    identity = "test:length"

    def score(self, prompts, responses, columns=None):
        return [float(len(r)) for r in responses]


@pytest.fixture
def judge(monkeypatch):
    monkeypatch.setattr(eval_run, "reward_backend", lambda cfg, out: LengthJudge())
    monkeypatch.setattr(eval_run, "check_reward_config", lambda cfg: None)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stage_json(path, name, kind, config, status="done", wall_s=12.5):
    path.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "kind": kind, "hash": "x", "status": status, "started": f"2026-01-01T00:00:{len(list(path.parent.iterdir())):02d}",
              "finished": None, "wall_s": wall_s, "outputs": {}, "inputs": [], "config": config}
    (path / "stage.json").write_text(json.dumps(record))


def train_config(model, **extra):
    return {"model": {"name_or_path": model}, "data": {"dataset": "data"},
            "train": {"max_steps": 4, "learning_rate": 1e-3, "batch_size": 2, "grad_accum": 1}, **extra}


def metrics(keys: list[str], eval_keys: list[str], steps: int = 4) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "epoch": s / steps, "loss": 1 / s, **{k: 0.1 * s for k in keys}, "lr": 1e-3})
        if s % 2 == 0:
            rows.append({"step": s, "epoch": s / steps, "eval_loss": 1.5 / s, **{k: 0.2 * s for k in eval_keys}})
    return rows


def pairwise(path, model, reference, rewards_a, rewards_b, responses_a, responses_b, categories):
    """A pairwise eval's winrate.json and per_prompt.jsonl as run_eval writes them."""
    path.mkdir(parents=True, exist_ok=True)
    n = len(rewards_a)
    r = {"model": model, "reference": reference, "judge": "test:judge", "responses_per_prompt": {"A": 1, "B": 1},
         **summarize(rewards_a, rewards_b, [len(x) for x in responses_a], [len(x) for x in responses_b], 0.0, 200, 0)}
    r["per_category"] = {c: summarize([rewards_a[k] for k in range(n) if categories[k] == c], [rewards_b[k] for k in range(n) if categories[k] == c],
                                      [1] * categories.count(c), [1] * categories.count(c), 0.0, 50)["win_rate"] for c in sorted(set(categories))}
    (path / "winrate.json").write_text(json.dumps(r))
    write_jsonl(path / "per_prompt.jsonl", [
        {"prompt": f"prompt {k}", "response_a": responses_a[k], "response_b": responses_b[k], "reward_a": rewards_a[k], "reward_b": rewards_b[k],
         "outcome": "win" if rewards_a[k] > rewards_b[k] else "loss" if rewards_a[k] < rewards_b[k] else "tie", "category": categories[k]}
        for k in range(n)])


@pytest.fixture
def run_dir(tmp_path, judge):
    """A pipeline run directory from synthetic stage outputs: SFT, DPO, RL, two evals, a matrix, a best-of-N
    sweep, and a stage still running with nothing written yet."""
    run = tmp_path / "run"
    stage_json(run / "sft", "sft", "sft", train_config("base"))
    write_jsonl(run / "sft" / "metrics.jsonl", metrics([], []))
    stage_json(run / "dpo", "dpo", "dpo", train_config(str(run / "sft" / "final"), dpo={"beta": 0.1, "loss_type": "sigmoid", "dpop_lambda": 5.0}))
    write_jsonl(run / "dpo" / "metrics.jsonl", metrics(["reward_margin", "reward_accuracy"], ["eval_reward_margin", "eval_reward_accuracy"]))
    stage_json(run / "rl", "rl", "rl", train_config(str(run / "dpo" / "final"), rl={"algo": "rloo", "k": 4, "beta": 0.05}))
    write_jsonl(run / "rl" / "metrics.jsonl", metrics(["reward", "kl", "completion_length"], ["eval_reward", "eval_win_rate"]))
    cats = ["math", "code", "math", "code", "math", "chat"]
    answers = [HOSTILE, "a longer answer " + "z" * 3000, "x", "short", "same", "same"]
    reference = ["ref one", "ref", "ref three", "ref", "same", "same"]
    stage_json(run / "eval-sft", "eval-sft", "eval", {"model": str(run / "sft" / "final"), "reference": "Qwen/ref", "ties": "zero"})
    pairwise(run / "eval-sft", str(run / "sft" / "final"), "Qwen/ref", [1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], ["sft " + a for a in answers], reference, cats)
    stage_json(run / "eval-rl", "eval-rl", "eval", {"model": str(run / "rl" / "final"), "reference": "Qwen/ref", "ties": "zero"})
    pairwise(run / "eval-rl", str(run / "rl" / "final"), "Qwen/ref", [1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], answers, reference, cats)
    files = [write_jsonl(tmp_path / name / "responses.jsonl", [{"instruction": f"q{k}", "output": name * (k % 3 + 1)} for k in range(6)])
             for name in ("aa", "b", "ccc")]
    stage_json(run / "matrix", "matrix", "eval", {"matrix": files})
    run_eval(EvalConfig(output_dir=str(run / "matrix"), matrix=files, bootstrap=100))
    rows = [{"temperature": t, "n": n, "win_rate": 0.3 + 0.05 * n * t, "ci95": [0.2, 0.5], "win_rate_ties_half": 0.5, "ci95_ties_half": [0.4, 0.6],
             "wins": 3 * n, "losses": 10 - n, "ties": 2, "sign_test_p": 0.5, "non_tied_win_share": 3 * n / (10 + 2 * n), "ceiling": n / (n + 1),
             "mean_reward": 0.1 * n} for t in (0.7, 1.0) for n in (1, 2, 4)]
    stage_json(run / "bon", "bon", "bon", {"model": "rl/final"})
    (run / "bon" / "sweep.json").write_text(json.dumps({"reference": "Qwen/ref", "judge": "test:judge", "temperatures": [0.7, 1.0],
                                                        "n_values": [1, 2, 4], "rows": rows}))
    stage_json(run / "refine", "refine", "refine", {}, status="running", wall_s=None)
    return run


def code_blocks(report: str) -> tuple[list[str], str]:
    """The fenced blocks of a Markdown text (CommonMark: closed by a line of at least as many backticks) and
    the text outside them; an unclosed block fails."""
    lines, blocks, outside, i = report.split("\n"), [], [], 0
    while i < len(lines):
        m = re.match(r"^(`{3,})", lines[i])
        if not m:
            outside.append(lines[i])
            i += 1
            continue
        fence, start = m.group(1), i
        i += 1
        while i < len(lines) and not re.fullmatch(fence + "`*\\s*", lines[i]):
            i += 1
        assert i < len(lines), f"code block opened at line {start} is never closed"
        blocks.append("\n".join(lines[start + 1: i]))
        i += 1
    return blocks, "\n".join(outside)


def referenced_images(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_report_of_a_pipeline_run(run_dir):
    """#9: stages with settings and wall times, curves per stage, win rates with both tie rules, the sign test and a
    verdict, per-category bars, the matrix, the best-of-N sweep; every plot referenced is there and non-empty."""
    path = write_report(run_dir)
    assert path == run_dir / "report" / "report.md"
    report = path.read_text()
    images = referenced_images(report)
    assert sorted(images) == sorted(["curves-sft.png", "curves-dpo.png", "curves-rl.png", "per-category.png", "matrix-matrix.png", "bon-bon.png"])
    for name in images:
        data = (path.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert [s.name for s in find_stages(run_dir)] == ["sft", "dpo", "rl", "eval-sft", "eval-rl", "matrix", "bon", "refine"]
    row = next(line for line in report.splitlines() if line.startswith("| dpo |"))
    assert "model sft/final" in row and "beta 0.1" in row and "loss sigmoid" in row and "dpop_lambda 5" in row and "12.5 s" in row
    assert "algo rloo; k 4; beta 0.05" in next(line for line in report.splitlines() if line.startswith("| rl |"))
    assert "| refine | refine | running |" in report
    assert "| reward_margin | 0.1 (step 1) | 0.4 (step 4) |" in report and "| eval_win_rate | 0.4 (step 2) | 0.8 (step 4) |" in report
    assert "ties count 0 (course protocol)" in report and "win rate, ties count 0.5" in report
    rl_row = [line for line in report.splitlines() if line.startswith("| eval-rl |")][-1]  # in the win-rate table
    # 5 wins, 0 losses, 1 tie: ties as 0 gives 5/6, as half 5.5/6; sign test 2 / 2^5
    assert "| 5 / 0 / 1 | 0.833 (" in rl_row and "| 0.917 (" in rl_row and "| 0.0625 |" in rl_row
    assert rl_row.endswith("| A is not distinguishable from B |") and "| rl/final | Qwen/ref |" in rl_row
    assert "| math | 0.333 / 0.500 (1 / 1 / 1) | 0.667 / 0.833 (2 / 0 / 1) |" in report  # per category, a column per eval
    assert "| 0.7 | 2 | 0.370 (0.200 to 0.500) | 0.500 (0.400 to 0.600) | 6 / 8 / 2 |" in report
    assert "| 0.6667 |" in report  # the N/(N+1) ceiling at N=2


def test_model_text_stays_fenced(run_dir):
    """#9 / #13.9: answers with backticks, HTML, table pipes, links and escape codes stay inside code blocks."""
    report = write_report(run_dir, draw=False).read_text()
    assert "\x1b" not in report and "\x07" not in report and "\r" not in report
    blocks, outside = code_blocks(report)
    assert any("<img src=x onerror=alert(1)>" in b and "`````" in b for b in blocks)
    assert "<img" not in outside and "javascript:" not in outside and "# Heading" not in outside
    assert "prompt 0" in "\n".join(blocks)  # the prompt with the hostile answer is among the ones shown (it was decided)
    assert "a longer answer " + "z" * 1984 + "\n[... 1016 more characters]" in report  # long answers are cut, and said so
    assert "**rl/final**" in outside and "**sft/final**" in outside and "**Qwen/ref**" in outside


def test_partial_and_single_stage_dirs(tmp_path):
    """#9: a stage still running (no metrics, a half-written line), a folder of stage dirs without stage.json (today's
    demo), one stage's own output dir and an empty dir all give a report."""
    run = tmp_path / "run"
    stage_json(run / "sft", "sft", "sft", train_config("base"), status="running", wall_s=None)
    (run / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    stage_json(run / "dpo", "dpo", "dpo", {}, status="running", wall_s=None)
    report = write_report(run, draw=False).read_text()
    assert "| sft | sft | running |" in report and "| dpo | dpo | running |" in report and "| loss | 2 (step 1) | 2 (step 1) |" in report

    plain = tmp_path / "plain"
    (plain / "dpo").mkdir(parents=True)
    (plain / "dpo" / "config.yaml").write_text("model:\n  name_or_path: m\ndpo:\n  beta: 0.2\n  loss_type: ipo\ntrain:\n  max_steps: 3\n")
    write_jsonl(plain / "dpo" / "metrics.jsonl", metrics(["reward_margin"], []))
    (plain / "world").mkdir()
    report = write_report(plain, draw=False).read_text()
    assert "| dpo | dpo | incomplete | model m; steps 3; beta 0.2; loss ipo | - |" in report
    assert "world" not in report.split("## Stages")[1] and "| reward_margin | 0.1 (step 1) |" in report

    single = write_report(plain / "dpo", draw=False)
    assert single == plain / "dpo" / "report" / "report.md" and "| dpo | dpo |" in single.read_text()
    (tmp_path / "empty").mkdir()
    assert "No stage output found" in write_report(tmp_path / "empty", draw=False).read_text()


def test_without_matplotlib_the_report_says_so(run_dir, monkeypatch):
    """#9: matplotlib is optional; without it the Markdown is written, without plots, and says why."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = write_report(run_dir).read_text()
    assert "matplotlib is not installed" in report and referenced_images(report) == []
    assert "| eval-rl |" in report


def test_cli_report_takes_the_run_dir_as_argument(run_dir, tmp_path, capsys):
    """#9: `alignkit report RUN_DIR` (a first positional argument fills run_dir); a missing dir is a user error."""
    assert main(["report", str(run_dir), "--samples", "1", "--plots", "false"]) == 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "### Prompt 1" in report and "### Prompt 2" not in report and "Plots: not drawn" in report
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["report"]) == 2


def test_matrix_pairs_carry_the_statistics_that_decide(tmp_path, judge):
    """#9: every matrix pair has wins/losses/ties, the sign test, the ties-as-half rate with its interval and a verdict
    (hand-computed), in matrix.json and report.md."""
    lengths = {"x": [5] * 10, "y": [3] * 8 + [5, 7], "z": [5] * 9 + [6]}
    files = [write_jsonl(tmp_path / name / "responses.jsonl", [{"instruction": f"q{k}", "output": "w" * n} for k, n in enumerate(ls)])
             for name, ls in lengths.items()]
    run_eval(EvalConfig(output_dir=str(tmp_path / "m"), matrix=files, bootstrap=300, seed=3))
    m = json.loads((tmp_path / "m" / "matrix.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in m["pairs"]}
    assert set(pairs) == {("x/responses", "y/responses"), ("x/responses", "z/responses"), ("y/responses", "z/responses")}
    xy = pairs["x/responses", "y/responses"]  # x beats y on 8 prompts, loses 1, ties 1
    assert (xy["wins"], xy["losses"], xy["ties"], xy["n"]) == (8, 1, 1, 10)
    assert xy["sign_test_p"] == pytest.approx(2 * (1 + 9) / 2**9) == pytest.approx(0.0390625)
    assert xy["win_rate"] == pytest.approx(0.8) and xy["win_rate_ties_half"] == pytest.approx(0.85)
    assert xy["ci95_ties_half"] == pytest.approx(list(bootstrap_ci(outcomes([5] * 10, lengths["y"], 0.5), 300, 3)))
    assert xy["verdict"] == "x/responses is better than y/responses at 95% (sign test p=0.0391)"
    xz = pairs["x/responses", "z/responses"]  # one loss, nine ties
    assert (xz["wins"], xz["losses"], xz["ties"], xz["sign_test_p"], xz["win_rate"], xz["win_rate_ties_half"]) == (0, 1, 9, 1.0, 0.0, 0.45)
    assert xz["verdict"].startswith("x/responses is not distinguishable from z/responses")
    yz = pairs["y/responses", "z/responses"]  # 3 < 5 on eight prompts, 5 = 5 on one, 7 > 6 on the last
    assert (yz["wins"], yz["losses"], yz["ties"]) == (1, 8, 1) and yz["verdict"].startswith("y/responses is worse than z/responses")
    assert math.isclose(yz["sign_test_p"], 0.0390625)
    report = (tmp_path / "m" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| x/responses | y/responses |"))
    assert "| 8 / 1 / 1 | 0.800 (" in row and "| 0.850 (" in row and "| 0.0391 |" in row and row.endswith("is better than y/responses |")


def check_demo_report(out):
    """#9: the report the demo writes at its end (a run dir without stage.json files) renders, with every plot file
    present and non-empty. Called from tests/test_cli.py's demo test, so that the demo runs once in the suite."""
    path = out / "report" / "report.md"
    report = path.read_text()
    assert [s.name for s in find_stages(out)] == ["sft", "dpo", "eval-dpo-vs-sft", "rloo", "eval-rloo-vs-sft", "rm",
                                                   "rloo-rm", "eval-rloo-rm-vs-sft"]  # the others: demo --full
    images = referenced_images(report)
    assert set(images) >= {"curves-sft.png", "curves-dpo.png", "curves-rloo.png", "curves-rm.png", "curves-rloo-rm.png",
                           "per-category.png", "proxy-gold-rloo-rm.png"}
    assert all((path.parent / name).stat().st_size > 2000 for name in images)
    assert "| eval-dpo-vs-sft | dpo/final | sft/final |" in report and "## Sample answers" in report
    assert "| eval-rloo-vs-sft | rloo/final | sft/final |" in report and "| eval-rloo-rm-vs-sft | rloo-rm/final | sft/final |" in report
    assert "## Proxy and gold reward" in report and "Proxy: hf rm/final. Gold: rule toy." in report
    assert "| reward_margin |" in report and "| eval_loss |" in report
    code_blocks(report)


def test_pipeline_report_lists_the_files_stages_flags_stale_ones_and_names_plots_by_folder(tmp_path):
    """#18.6: `sft-old` (a copy of an older sft, its stage.json says "sft") is reported as sft-old with its
    own curve file, not as a second "sft"; given the pipeline's stages only those are reported, in file order; a
    record whose upstream ran again since (another run id) or is gone is flagged stale."""
    run = tmp_path / "run"
    stage_json(run / "sft", "sft", "sft", train_config("base"))
    write_jsonl(run / "sft" / "metrics.jsonl", metrics([], []))
    stage_json(run / "sft-old", "sft", "sft", train_config("base"))
    write_jsonl(run / "sft-old" / "metrics.jsonl", [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}])
    stage_json(run / "dpo", "dpo", "dpo", train_config(str(run / "sft" / "final")))
    stage_json(run / "removed", "removed", "sft", train_config("base"))
    extras = {"sft": {"run_id": "new"}, "dpo": {"run_id": "d", "inputs": ["sft"], "consumed": {"sft": "old"}},
              "removed": {"run_id": "r", "inputs": ["gone"], "consumed": {"gone": "g"}}}
    for name, extra in extras.items():
        rec = json.loads((run / name / "stage.json").read_text())
        (run / name / "stage.json").write_text(json.dumps(rec | extra))
    report = write_report(run).read_text()
    assert [s.name for s in find_stages(run)] == ["sft", "sft-old", "dpo", "removed"]
    assert {"curves-sft.png", "curves-sft-old.png"} <= set(referenced_images(report))
    assert "### sft-old (sft)" in report and "| loss | 9 (step 1) | 8 (step 2) |" in report
    assert "| removed | sft | done, stale |" in report and "removed (upstream gone is gone)" in report
    report = write_report(run, stages=["dpo", "sft"]).read_text()
    table = report.split("## Stages")[1].split("##")[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["stage", "dpo", "sft"]
    assert "sft-old" not in report and "removed" not in report
    assert "| dpo | dpo | done, stale |" in report and "dpo (upstream sft ran again since)" in report


def test_judge_label_names_the_model_for_hf_and_remote_judges():
    """#18.10: an hf or remote judge is labelled by its model (and host), not by the rule field's default."""
    from alignkit.report import reward_text

    assert reward_text({"kind": "hf", "rule": "toy", "model": "runs/rm/final"}) == "hf runs/rm/final"
    assert reward_text({"kind": "remote", "rule": "toy", "model": "judge-1", "base_url": "https://h/v1"}) \
        == "remote judge-1 at https://h/v1"
    assert reward_text({"kind": "rule", "rule": "countdown", "model": None}) == "rule countdown"


def test_grpo_kl_per_sequence_and_per_token_have_their_own_panels(tmp_path):
    """#18.13: GRPO logs `kl` (per sequence) and `kl_k3` (per token): two scales, two panels."""
    from alignkit.report import StageRun, panels_for

    panels = panels_for(StageRun("rl", tmp_path, "rl", "done", {}))
    holding = [keys for _, keys in panels if "kl" in keys or "kl_k3" in keys]
    assert holding == [["kl"], ["kl_k3"]]


def test_values_that_should_be_numbers_never_reach_the_report_raw(tmp_path):
    """#17.13: a step, counts, matrix and best-of-N fields holding HTML are escaped, or not shown."""
    run = tmp_path / "run"
    img, link = "<img src=x onerror=alert(1)>", "<a href=javascript:x>y</a>"
    stage_json(run / "sft", "sft", "sft", train_config("base"), wall_s=img)
    write_jsonl(run / "sft" / "metrics.jsonl", [{"step": img, "loss": 1.0}, {"step": link, "loss": 0.5}])
    pairwise(run / "eval", "m", "r", [1, 0], [0, 0], ["a", "b"], ["c", "d"], ["x", "y"])
    r = json.loads((run / "eval" / "winrate.json").read_text())
    (run / "eval" / "winrate.json").write_text(json.dumps(r | {"wins": img, "n": link}))
    stage_json(run / "eval", "eval", "eval", {"model": "m"})
    (run / "bon").mkdir()
    rows = [{"temperature": 1.0, "n": n, "win_rate": 0.5, "wins": w, "losses": 1, "ties": 0}
            for n, w in ((1, 3), (2, img))]
    (run / "bon" / "sweep.json").write_text(json.dumps({"reference": link, "judge": img, "rows": rows}))
    (run / "m").mkdir()
    matrix = {"labels": ["a", "b"], "n": img, "win_rate": [[None, 0.5], [0.5, None]], "mean_reward": [1, 1],
              "prompts_per_entry": [2, 2], "dropped_per_entry": [0, 0]}
    (run / "m" / "matrix.json").write_text(json.dumps(matrix))
    report = write_report(run, draw=False).read_text()
    _, outside = code_blocks(report)
    assert "<img" not in outside and "<a href" not in outside
    assert "(step &lt;img src=x onerror=alert(1)&gt;)" in report
    assert "Not shown: eval/winrate.json: field wins" in report
    assert "Not shown: m/matrix.json: field n" in report
    assert "Not shown: 1 row(s) of bon/sweep.json" in report and "| 1 | 1 | 0.5 |" in report
