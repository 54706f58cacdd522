"""`alignkit run PIPELINE.yaml` (#9): one file, one run directory, a rerun that does only what changed.

One module-scoped run of a tiny SFT -> DPO -> eval pipeline on the demo's toy world; each test
works on a copy of that run directory (hashes do not depend on where the run directory lies).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.stages import STAGES  # the table the pipeline runs from
from alignkit.config import ConfigError
from alignkit.pipeline import RunConfig, read_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]

STAGES_YAML = {
    "sft": {
        "seed": "${vars.seed}",
        "model": {"name_or_path": "${vars.world}/base-model"},
        "data": {"dataset": "${vars.world}/data", "split": "train"},
        "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "save_steps": 2, "logging_steps": 2, "precision": "fp32"},
    },
    "dpo": {
        "seed": "${vars.seed}",
        "model": {"name_or_path": "${sft.final}"},
        "data": {"dataset": "${vars.world}/prefs", "split": "train_prefs", "eval_split": None},
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": "${vars.dpo_lr}", "save_steps": 2, "logging_steps": 2,
                  "precision": "fp32"},
        "dpo": {"beta": 0.1},
    },
    "eval-dpo": {
        "kind": "eval",
        "model": "${dpo.final}",
        "reference": "${sft.final}",
        "prompts": {"dataset": "${vars.world}/data", "split": "test", "max_prompts": 6},
        "sampling": {"max_new_tokens": 6},
        "reward": {"kind": "rule", "rule": "toy"},
        "bootstrap": 50,
    },
}


def write_pipeline(path: Path, world: Path, stages: dict | None = None, **top) -> Path:
    doc = {"run_dir": str(path.parent / "run"), "vars": {"world": str(world), "seed": 0, "dpo_lr": 1e-4},
           "stages": STAGES_YAML if stages is None else stages, **top}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(pipeline: Path, *flags: str, **kw) -> Path | None:
    """run_pipeline with command-line flags (parsed as `alignkit run` does) or RunConfig fields."""
    from alignkit.cli import parse

    cfg = parse("run", [str(pipeline), "--quiet", *flags]) if flags else RunConfig(pipeline=str(pipeline), quiet=True, **kw)
    return run_pipeline(cfg)


def record(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "stage.json").read_text())


def plan_of(capsys) -> dict[str, tuple[str, str]]:
    """Stage -> (action, why) from the printed plan."""
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("pipeline "))
    rows = {}
    for line in out[start + 1 :]:
        if not line.startswith("  "):
            break
        name, action, why = line.split(maxsplit=2)
        rows[name] = (action, why)
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The toy tokenizer, a tiny base model, chats and preference pairs."""
    from alignkit.config import ModelConfig
    from alignkit.demo.world import build_tokenizer, write_chat_data, write_model_config, write_preference_data
    from alignkit.models import init_model, load_tokenizer

    w = tmp_path_factory.mktemp("world")
    tok = build_tokenizer(w / "tokenizer")
    vocab = len(load_tokenizer(ModelConfig(name_or_path=str(tok))).tokenizer)
    write_model_config(w / "model-config", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    init_model(str(w / "model-config"), w / "base-model", tokenizer_source=str(tok), seed=0)
    write_chat_data(w / "data", n_train=64, n_test=20)
    write_preference_data(w / "prefs", n_train=32, n_test=8, held_out=20)
    return w


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, world) -> Path:
    """The pipeline run once, to the end."""
    root = tmp_path_factory.mktemp("done")
    pipeline = write_pipeline(root / "pipeline.yaml", world)
    assert run(pipeline) == root / "run"
    return root


@pytest.fixture
def copy(tmp_path, done_run) -> Path:
    """A copy of the finished run (pipeline file and run directory) to change."""
    shutil.copytree(done_run / "run", tmp_path / "run")
    for saved in (tmp_path / "run").rglob("config.yaml"):  # as if the run had been here (a resume compares them)
        saved.write_text(saved.read_text().replace(str(done_run / "run"), str(tmp_path / "run")))
    doc = yaml.safe_load((done_run / "pipeline.yaml").read_text())
    doc["run_dir"] = str(tmp_path / "run")
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return tmp_path


def mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")}


def test_first_run_records_each_stage(done_run):
    """#9: each stage folder holds stage.json with its hash, status, times, outputs, inputs and resolved config."""
    run_dir = done_run / "run"
    sft, dpo, ev = (record(run_dir, n) for n in ("sft", "dpo", "eval-dpo"))
    for r, name, kind in ((sft, "sft", "sft"), (dpo, "dpo", "dpo"), (ev, "eval-dpo", "eval")):
        assert {"name", "kind", "hash", "status", "started", "finished", "wall_s", "outputs", "inputs", "config"} <= set(r)
        assert (r["name"], r["kind"], r["status"]) == (name, kind, "done") and r["wall_s"] > 0 and len(r["hash"]) == 64
        assert r["config"]["output_dir"] == str(run_dir / name)
    assert sft["outputs"] == {"dir": ".", "final": "final"}  # relative to the stage folder (#18.9)
    assert ev["outputs"]["winrate"] == "winrate.json"
    assert (sft["inputs"], dpo["inputs"], ev["inputs"]) == ([], ["sft"], ["dpo", "sft"])
    assert dpo["config"]["model"]["name_or_path"] == str(run_dir / "sft" / "final")
    assert dpo["config"]["train"]["learning_rate"] == 1e-4  # ${vars.dpo_lr}, typed by the stage's config
    assert json.loads((run_dir / "eval-dpo" / "winrate.json").read_text())["n"] == 6
    assert len({sft["hash"], dpo["hash"], ev["hash"]}) == 3


def test_rerun_skips_everything_and_touches_nothing(copy, capsys):
    """#9: a rerun of an unchanged pipeline skips every stage and does no work (no file in the run directory changes)."""
    before = mtimes(copy / "run")
    capsys.readouterr()
    assert run(copy / "pipeline.yaml") == copy / "run"
    assert plan_of(capsys) == {n: ("skip", "done, unchanged") for n in ("sft", "dpo", "eval-dpo")}
    assert mtimes(copy / "run") == before


def test_changed_dpo_reruns_dpo_and_what_follows_not_sft(copy, capsys):
    """#9: a changed DPO setting reruns DPO and the eval below it; SFT is skipped and its files stay."""
    old = {n: record(copy / "run", n) for n in ("sft", "dpo", "eval-dpo")}
    sft_files = mtimes(copy / "run" / "sft")
    capsys.readouterr()
    run(copy / "pipeline.yaml", "--var", "dpo_lr=2e-4", "--dry-run")
    assert plan_of(capsys) == {"sft": ("skip", "done, unchanged"), "dpo": ("run", "config changed: train.learning_rate"),
                               "eval-dpo": ("run", "upstream dpo reruns")}
    assert record(copy / "run", "dpo") == old["dpo"]  # a dry run does nothing
    run(copy / "pipeline.yaml", "--var", "dpo_lr=2e-4")
    new = {n: record(copy / "run", n) for n in ("sft", "dpo", "eval-dpo")}
    assert new["sft"] == old["sft"] and mtimes(copy / "run" / "sft") == sft_files
    assert new["dpo"]["hash"] != old["dpo"]["hash"] and new["dpo"]["config"]["train"]["learning_rate"] == 2e-4
    assert new["eval-dpo"]["hash"] != old["eval-dpo"]["hash"] and new["eval-dpo"]["started"] >= old["eval-dpo"]["finished"]
    assert new["eval-dpo"]["upstream"]["dpo"] == new["dpo"]["hash"]
    assert all(r["status"] == "done" for r in new.values())


def test_hash_follows_input_content_not_the_run_directory_place(copy, world, capsys, tmp_path):
    """#9: the hash covers the content of local inputs (a changed preference file changes DPO's hash and
    eval's, not SFT's); a run directory moved elsewhere keeps its hashes (every stage is skipped)."""
    prefs = tmp_path / "prefs"
    shutil.copytree(world / "prefs", prefs)
    stages = json.loads(json.dumps(STAGES_YAML))
    stages["dpo"]["data"]["dataset"] = str(prefs)
    pipeline = write_pipeline(tmp_path / "other.yaml", world, stages)
    before = [s.hash for s in read_pipeline(pipeline).stages]
    rows = (prefs / "train_prefs.jsonl").read_text()
    (prefs / "train_prefs.jsonl").write_text(rows + rows.splitlines()[0] + "\n")
    changed = read_pipeline(pipeline)
    assert [a == b for a, b in zip(before, [s.hash for s in changed.stages])] == [True, False, False]
    assert changed.stages[1].files[str(prefs)] != changed.stages[1].files.get(str(world / "base-model"), "")
    (prefs / "train_prefs.jsonl").write_text(rows)
    assert [s.hash for s in read_pipeline(pipeline).stages] == before
    (tmp_path / "moved").mkdir()
    shutil.move(str(copy / "run"), str(tmp_path / "moved" / "run"))
    capsys.readouterr()
    run(copy / "pipeline.yaml", dry_run=True, run_dir=str(tmp_path / "moved" / "run"))
    assert {a for a, _ in plan_of(capsys).values()} == {"skip"}


def test_killed_stage_resumes_from_its_checkpoint(copy, capsys, monkeypatch):
    """#9: a stage left `running` (killed after a checkpoint) resumes from it with the same settings;
    the stage below it runs again; the stage above it is skipped."""
    run_dir = copy / "run"
    rec = record(run_dir, "dpo")
    rec.update(status="running", finished=None)
    (run_dir / "dpo" / "stage.json").write_text(json.dumps(rec))
    shutil.rmtree(run_dir / "dpo" / "final")
    shutil.rmtree(run_dir / "dpo" / "checkpoints" / "step-4")  # killed between the checkpoint at step 2 and the end
    seen = {}
    real = STAGES["dpo"].run

    def spy(cfg):
        seen["resume"] = cfg.resume
        return real(cfg)

    monkeypatch.setitem(STAGES, "dpo", STAGES["dpo"].__class__(STAGES["dpo"].config, spy, ""))
    capsys.readouterr()
    run(copy / "pipeline.yaml")
    assert plan_of(capsys) == {"sft": ("skip", "done, unchanged"), "dpo": ("resume", "interrupted, unchanged"),
                               "eval-dpo": ("run", "upstream dpo resumes")}
    assert seen == {"resume": True}
    after = record(run_dir, "dpo")
    assert after["status"] == "done" and after["hash"] == rec["hash"] and after["wall_s"] > rec["wall_s"]
    assert (run_dir / "dpo" / "final").is_dir()
    steps = [json.loads(line).get("step") for line in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # one clean log: the resumed run logged step 4 only


def test_failing_stage_stays_running_and_the_next_run_resumes_it(copy, monkeypatch, capsys):
    """#9: a stage that stops with an error keeps status running (with the error); the next run resumes it."""
    shutil.rmtree(copy / "run" / "eval-dpo")

    def boom(cfg):
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "eval", STAGES["eval"].__class__(STAGES["eval"].config, boom, ""))
    with pytest.raises(KeyboardInterrupt):
        run(copy / "pipeline.yaml")
    rec = record(copy / "run", "eval-dpo")
    assert rec["status"] == "running" and rec["error"] == "KeyboardInterrupt: " and rec["finished"] is None
    monkeypatch.undo()
    capsys.readouterr()
    run(copy / "pipeline.yaml", dry_run=True)
    assert plan_of(capsys)["eval-dpo"] == ("resume", "interrupted, unchanged")


def test_only_and_from_choose_stages_and_refuse_stale_upstream(copy, capsys, tmp_path, world):
    """#9: --only/--from leave the other stages alone; a chosen stage whose upstream is not done and
    unchanged is an error naming it; an unknown stage name is an error."""
    capsys.readouterr()
    run(copy / "pipeline.yaml", "--var", "dpo_lr=2e-4", "--only", "sft", "--dry-run")
    plan = plan_of(capsys)
    assert plan["sft"] == ("skip", "done, unchanged")
    assert plan["dpo"] == ("skip", "not chosen (--only); would run: config changed: train.learning_rate")
    run(copy / "pipeline.yaml", "--var", "dpo_lr=2e-4", "--from", "dpo", "--dry-run")
    assert [a for a, _ in plan_of(capsys).values()] == ["skip", "run", "run"]
    with pytest.raises(ConfigError, match=r"--only eval-dpo: stage 'eval-dpo' needs 'dpo', which is not done and unchanged "
                                          r"\(config changed: train.learning_rate\)"):
        run(copy / "pipeline.yaml", "--var", "dpo_lr=2e-4", "--only", "eval-dpo", "--dry-run")
    (tmp_path / "fresh").mkdir()
    fresh = write_pipeline(tmp_path / "fresh" / "pipeline.yaml", world)
    with pytest.raises(ConfigError, match=r"--from dpo: stage 'dpo' needs 'sft', which is not done and unchanged \(not started\)"):
        run(fresh, "--from", "dpo")
    with pytest.raises(ConfigError, match=r"--only dop: there is no stage 'dop'; did you mean 'dpo'\?"):
        run(fresh, "--only", "sft,dop")
    assert not (tmp_path / "fresh" / "run").exists()


def test_dry_run_of_a_new_run_directory_plans_everything(world, tmp_path, capsys):
    """#9: --dry-run prints each stage with run / skip / resume and why, and creates nothing."""
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", world)
    capsys.readouterr()
    assert main(["run", str(pipeline), "--dry-run"]) == 0
    first = capsys.readouterr().out
    for argv in (["--dry-run", str(pipeline)], ["--dry-run", "true", str(pipeline)]):  # the file after a switch
        assert main(["run", *argv]) == 0
        assert capsys.readouterr().out == first
    assert main(["run", "--only", "sft", str(pipeline)]) == 2
    assert "give the pipeline file first" in capsys.readouterr().err
    out = first
    assert out.splitlines()[:4] == [
        f"pipeline {pipeline} -> {tmp_path / 'run'}",
        "  sft       run     not started",
        "  dpo       run     not started",
        "  eval-dpo  run     not started",
    ]
    assert not (tmp_path / "run").exists()
    (tmp_path / "run" / "dpo").mkdir(parents=True)
    (tmp_path / "run" / "dpo" / "mine.txt").write_text("not the runner's")
    assert main(["run", str(pipeline)]) == 2  # a stage folder the runner did not make is never cleared
    assert "holds files but no stage.json: it was not made by `alignkit run`" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["dpo"]


def stage_with(name: str, **changes) -> dict:
    stages = json.loads(json.dumps(STAGES_YAML))
    stages[name].update(changes)
    return stages


MALFORMED = {
    "unknown stage kind": (stage_with("eval-dpo", kind="evl"), {},
                           r"stage 'eval-dpo': unknown stage kind 'evl'; did you mean 'eval'\?"),
    "unknown kind from the name": ({"sfft": STAGES_YAML["sft"]}, {},
                                   r"stage 'sfft': unknown stage kind 'sfft'; did you mean 'sft'\? \(the kind defaults to the stage name"),
    "unknown key": (stage_with("dpo", train={"lr": 1e-4}), {},
                    r"stage 'dpo': unknown config key 'train.lr'; did you mean 'train.learning_rate'\?"),
    "bad value": (stage_with("sft", train={"max_steps": 0}), {}, r"stage 'sft': train.max_steps: 0 is not allowed"),
    "missing input": (stage_with("sft", data={"dataset": "./no/such.jsonl"}), {},
                      r"stage 'sft': data.dataset: './no/such.jsonl': no such dataset file or folder"),
    "forward reference": (stage_with("sft", model={"name_or_path": "${dpo.final}"}), {},
                          r"stage 'sft': model.name_or_path: \$\{dpo.final\}: stage 'dpo' comes later"),
    "self reference": (stage_with("dpo", model={"name_or_path": "${dpo.final}"}), {},
                       r"stage 'dpo': model.name_or_path: \$\{dpo.final\} refers to the stage itself"),
    "no such stage": (stage_with("dpo", model={"name_or_path": "${sfy.final}"}), {},
                      r"stage 'dpo': model.name_or_path: \$\{sfy.final\}: there is no stage 'sfy'; did you mean 'sft'\?"),
    "unknown output": (stage_with("eval-dpo", model="${dpo.fnal}"), {},
                       r"stage 'eval-dpo': model: \$\{dpo.fnal\}: stage 'dpo' \(kind dpo\) has no output 'fnal'; "
                       r"did you mean 'final'\?; it has: dir, final"),
    "not a reference": (stage_with("eval-dpo", model="${dpo}"), {}, r"stage 'eval-dpo': model: \$\{dpo\} is not a reference"),
    "unknown var": (stage_with("sft", seed="${vars.sed}"), {}, r"stage 'sft': seed: \$\{vars.sed\}: there is no var 'sed'; did you mean 'seed'\?"),
    "bad var value": (None, {"vars": {"world": ["a"]}}, r"vars.world: \['a'\] is not allowed"),
    "unknown top-level key": (None, {"stage": {}}, r"unknown top-level key 'stage'; did you mean 'stages'\?"),
    "output_dir given": (stage_with("dpo", output_dir="runs/x"), {}, r"stage 'dpo': output_dir cannot be set in a pipeline"),
    "resume given": (stage_with("sft", resume=True), {}, r"stage 'sft': resume cannot be set in a pipeline"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_pipeline_is_refused_before_any_work(case, world, tmp_path):
    """#9: the whole file is checked first; the error names the stage and the key; nothing is created."""
    stages, top, message = MALFORMED[case]
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", world, stages, **top)
    with pytest.raises(ConfigError, match=message):
        run(pipeline)
    assert not (tmp_path / "run").exists()


def test_cli_errors_exit_2_and_name_the_var(world, tmp_path, capsys):
    """#9: `alignkit run` reports a bad --var and a duplicate stage as one message with exit status 2."""
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", world)
    assert main(["run", str(pipeline), "--var", "wrld=x", "--dry-run"]) == 2
    assert "--var wrld: the pipeline has no var 'wrld'; did you mean 'world'?" in capsys.readouterr().err
    text = pipeline.read_text().replace("\n  dpo:\n", "\n  sft:\n", 1)
    pipeline.write_text(text)
    assert main(["run", str(pipeline), "--dry-run"]) == 2
    assert "key 'sft' is given twice" in capsys.readouterr().err


def test_recipe_path_and_overrides(world, tmp_path):
    """#9: a stage's recipe (relative to the pipeline file; its output_dir ignored) with inline keys over it."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "sft.yaml").write_text(yaml.safe_dump({"output_dir": "runs/elsewhere", **STAGES_YAML["sft"]}))
    stages = {"sft": {"recipe": "recipes/sft.yaml", "train.max_steps": 3}, "dpo": STAGES_YAML["dpo"]}
    pipe = read_pipeline(write_pipeline(tmp_path / "pipeline.yaml", world, stages))
    sft = pipe.stages[0].config
    assert sft.output_dir == str(tmp_path / "run" / "sft") and sft.train.max_steps == 3 and sft.train.batch_size == 8
    assert sft.model.name_or_path == f"{world}/base-model" and pipe.stages[1].inputs == ["sft"]
    stages["sft"]["recipe"] = "recipes/sft.yml"
    with pytest.raises(ConfigError, match=r"stage 'sft': recipe not found: .*recipes/sft.yml"):
        read_pipeline(write_pipeline(tmp_path / "pipeline.yaml", world, stages))


def test_reference_pipeline_recipe_validates(tmp_path, capsys):
    """#9: recipes/pipeline-qwen2.5-0.5b.yaml (the reference setting end to end) passes the whole-file check."""
    recipe = ROOT / "recipes" / "pipeline-qwen2.5-0.5b.yaml"
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "ref"), "--dry-run"]) == 0
    plan = plan_of(capsys)
    assert list(plan)[:3] == ["sft", "dpo", "rloo"] and all(a == ("run", "not started") for a in plan.values())
    pipe = read_pipeline(recipe, run_dir=str(tmp_path / "ref"))
    evals = [s for s in pipe.stages if s.kind == "eval"]
    assert {s.config.model for s in evals} >= {str(tmp_path / "ref" / n / "final") for n in ("sft", "dpo", "rloo")}
    instruct = next(s for s in pipe.stages if s.name == "generate-instruct")
    assert instruct.config.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert instruct.config.prompts.split == "test_prefs" and instruct.config.prompts.max_prompts == 500
    for s in evals:  # the course protocol, every model on the same prompts and decoding as the reference
        assert s.config.reference == instruct.outputs["responses"] and s.inputs[-1] == "generate-instruct"
        assert s.config.ties == "zero" and s.config.reward.kind == "hf"
        assert (s.config.prompts, s.config.sampling) == (instruct.config.prompts, instruct.config.sampling)


def test_demo_pipeline_is_package_data():
    """#9: the demo's pipeline file ships in the package (pyproject package-data) and names the demo's stages."""
    from alignkit.demo.run import PIPELINE

    assert PIPELINE.is_file() and "demo/pipeline.yaml" in (ROOT / "pyproject.toml").read_text()
    assert list(yaml.safe_load(PIPELINE.read_text())["stages"]) == ["sft", "dpo", "eval-dpo-vs-sft", "rloo", "eval-rloo-vs-sft", "rm",
                                                                 "rloo-rm", "eval-rloo-rm-vs-sft", "grpo", "eval-grpo-vs-sft", "self-pairs",
                                                                 "self-dpo", "eval-self-dpo-vs-sft", "bon", "refine"]
