"""`alignkit run` (#18.3-6, 18.9, 18.13, 17.5, 17.15): no stage keeps results of an upstream that is
gone, every input the config names is in the hash, a moved run keeps its hashes, a shipped run folder
cannot make the runner write outside it, and planning stays fast on a huge tree.

Works on copies of test_pipeline's finished tiny SFT -> DPO -> eval run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

import alignkit.pipeline as pipeline_lib
from alignkit.config import ConfigError
from alignkit.pipeline import input_files, read_pipeline
from tests.test_pipeline import (  # noqa: F401  (fixtures: copy, done_run, world)
    STAGES_YAML, copy, done_run, plan_of, record, run, world, write_pipeline)


def test_upstream_that_ran_again_with_the_same_hash_reruns_its_dependants(copy, capsys):
    """#18.3: SFT re-run alone (`--only sft` after its outputs went missing) gets a new run id; DPO and
    the eval, whose hashes did not change, were made from the old SFT and run again. The report of the
    run in between flags them stale (#18.6)."""
    run_dir = copy / "run"
    old = {n: record(run_dir, n) for n in ("sft", "dpo", "eval-dpo")}
    shutil.rmtree(run_dir / "sft" / "final")
    capsys.readouterr()
    run(copy / "pipeline.yaml", "--only", "sft")
    plan = plan_of(capsys)
    assert plan["sft"][0] == "run" and plan["dpo"][0] == "skip"
    run(copy / "pipeline.yaml", dry_run=True)
    assert plan_of(capsys) == {"sft": ("skip", "done, unchanged"),
                               "dpo": ("run", "upstream sft ran again since this stage used it"),
                               "eval-dpo": ("run", "upstream dpo reruns")}
    report = (run_dir / "report" / "report.md").read_text()
    assert "| dpo | dpo | done, stale |" in report and "| eval-dpo | eval | done, stale |" in report
    assert "dpo (upstream sft ran again since)" in report
    new_sft = record(run_dir, "sft")
    assert new_sft["hash"] == old["sft"]["hash"] and new_sft["run_id"] != old["sft"]["run_id"]
    assert old["dpo"]["consumed"] == {"sft": old["sft"]["run_id"]}
    assert old["eval-dpo"]["consumed"] == {"dpo": old["dpo"]["run_id"], "sft": old["sft"]["run_id"]}


def test_bare_relative_paths_are_in_the_hash(tmp_path, world, monkeypatch):
    """#18.4: `model: base` and `dataset: data` (relative to the working directory, no ./) are inputs:
    cutting data/train.jsonl changes the stage's hash."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(world / "base-model", tmp_path / "base")
    shutil.copytree(world / "data", tmp_path / "data")
    stages = json.loads(json.dumps(STAGES_YAML))
    stages["sft"]["model"]["name_or_path"] = "base"
    stages["sft"]["data"]["dataset"] = "data"
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", world, {"sft": stages["sft"]})
    before = read_pipeline(pipeline).stages[0]
    rows = (tmp_path / "data" / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "data" / "train.jsonl").write_text("".join(rows[:-1]))
    after = read_pipeline(pipeline).stages[0]
    assert after.hash != before.hash and sorted(after.files) == ["base", "data"]


def test_every_named_path_and_the_verifier_module_are_inputs(tmp_path, monkeypatch):
    """#18.4: bare relative paths (`model: base`, `dataset: data`, `chat_template: x.jinja`) are
    fingerprinted, so are a `module:function` verifier's source (found without importing it) and
    nothing for name-only keys (`split: train` beside a folder `train`)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("base", "data", "train"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "f.txt").write_text(folder)
    (tmp_path / "x.jinja").write_text("{{ messages }}")
    (tmp_path / "mods" / "pkg").mkdir(parents=True)
    (tmp_path / "mods" / "pkg" / "__init__.py").write_text("raise SystemExit('imported')")
    (tmp_path / "mods" / "pkg" / "myrule.py").write_text("def fn(prompt, response):\n    return 1.0\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "mods"), *sys.path])
    config = {"model": {"name_or_path": "base", "chat_template": "x.jinja"},
              "data": {"dataset": "data", "split": "train"},
              "reward": {"kind": "rule", "rule": "pkg.myrule:fn"}, "output_dir": "run/me"}
    files, notes, named = input_files(config, tmp_path / "run", ["me"])
    assert sorted(files) == ["base", "data", "pkg.myrule:fn", "x.jinja"] and notes == [] and named == {}
    (tmp_path / "mods" / "pkg" / "myrule.py").write_text("def fn(prompt, response):\n    return 0.0\n")
    (tmp_path / "data" / "f.txt").write_text("cut")
    after = input_files(config, tmp_path / "run", ["me"])[0]
    assert [files[k] == after[k] for k in sorted(files)] == [True, False, False, True]


def test_an_adapters_base_is_an_input_and_a_chain_of_adapters_ends(tmp_path, monkeypatch):
    """An adapter folder holds deltas on the base its adapter_config.json names: a base retrained in
    place changes the stage's hash (else the stage would be skipped with yesterday's merged model).
    A chain (adapter on adapter on base) is followed to its end, a cycle ends, a Hub id is not a file,
    and a base inside an earlier stage's folder makes that stage an input."""
    monkeypatch.chdir(tmp_path)

    def folder(name: str, base: str | None = None) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_text(name)
        if base is not None:
            (tmp_path / name / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        return tmp_path / name

    base = folder("base")
    folder("first", str(base))          # absolute, as alignkit records a local base
    folder("second", "first")           # relative to the working directory, as peft reads it
    config = {"model": {"name_or_path": "second"}, "output_dir": "run/me"}
    files, notes, named = input_files(config, tmp_path / "run", ["me"])
    assert sorted(files) == sorted(["second", "first", str(base)]) and named == {}
    (base / "weights.bin").write_text("retrained")
    assert input_files(config, tmp_path / "run", ["me"])[0][str(base)] != files[str(base)]

    folder("loop", "loop2")
    folder("loop2", "loop")             # a cycle: each visited once
    looped = input_files({"model": {"name_or_path": "loop"}}, tmp_path / "run", ["me"])[0]
    assert sorted(looped) == ["loop", "loop2"]
    folder("hub", "Qwen/Qwen2.5-0.5B")  # a Hub id is not on disk: the adapter alone
    assert sorted(input_files({"model": {"name_or_path": "hub"}}, tmp_path / "run", ["me"])[0]) == ["hub"]
    (tmp_path / "run" / "sft" / "final").mkdir(parents=True)
    folder("outside", str(tmp_path / "run" / "sft" / "final"))
    files, _, named = input_files({"model": {"name_or_path": "outside"}}, tmp_path / "run", ["sft", "me"])
    assert sorted(files) == ["outside"] and list(named) == ["sft"]
    assert "base of the adapter in outside" in named["sft"][0]


def test_the_alignkit_code_is_in_the_hash(copy, capsys, monkeypatch):
    """#18.4 / #18.13: after an upgrade, or an edit of the checkout that keeps the version string,
    every stage reruns, saying why, and so the report is rewritten."""
    from alignkit import code_version

    monkeypatch.setattr(pipeline_lib, "code_version", lambda: "0.1.0+edited")
    capsys.readouterr()
    run(copy / "pipeline.yaml", dry_run=True)
    plan = plan_of(capsys)
    assert plan["sft"] == ("run", f"alignkit changed: {code_version()} -> 0.1.0+edited")
    assert {a for a, _ in plan.values()} == {"run"}


def test_code_version_follows_every_source_file_not_caches_or_swap_files(tmp_path):
    """The digest behind code_version: an edit of any file of the package changes it (a one-character
    fix in a loss, the demo's pipeline file); a compiled cache file or an editor's swap file does not."""
    import alignkit
    from alignkit import source_digest

    package = Path(alignkit.__file__).parent
    copy = tmp_path / "alignkit"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = source_digest(copy)
    assert before == source_digest(package) and alignkit.code_version() == f"{alignkit.__version__}+{before}"
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "winrate.cpython-311.pyc").write_bytes(b"\0")
    (copy / ".winrate.py.swp").write_bytes(b"\0")  # an editor's swap file
    (copy / "winrate.py~").write_bytes(b"\0")
    assert source_digest(copy) == before
    loss = copy / "train" / "dpo.py"
    loss.write_text(loss.read_text().replace("def ", "def  ", 1))
    after_loss = source_digest(copy)
    assert after_loss != before
    recipe = copy / "demo" / "pipeline.yaml"
    recipe.write_text(recipe.read_text() + "\n")
    assert source_digest(copy) not in (before, after_loss)


def test_report_is_rewritten_when_written_by_another_alignkit(copy, capsys, monkeypatch):
    """#18.13: a rerun that skips every stage rewrites a report that another alignkit wrote (report.json
    says which; here only the report's code changed), and leaves a current one alone."""
    import alignkit.report as report_lib

    report = copy / "run" / "report"
    before = (report / "report.md").stat().st_mtime_ns
    run(copy / "pipeline.yaml")
    assert (report / "report.md").stat().st_mtime_ns == before
    monkeypatch.setattr(report_lib, "code_version", lambda: "99.0")
    run(copy / "pipeline.yaml")
    assert "(alignkit 99.0)" in (report / "report.md").read_text()
    state = json.loads((report / "report.json").read_text())
    assert state["alignkit"] == "99.0" and set(state["stages"]) == {"sft", "dpo", "eval-dpo"}


def test_literal_path_into_a_stage_folder_is_a_dependency(copy, capsys, tmp_path):
    """#18.5: `model: <run_dir>/dpo/final` written out (not ${dpo.final}) makes the stage depend on dpo,
    so it reruns with it; a literal path into a later stage or the stage's own folder is refused."""
    doc = yaml.safe_load((copy / "pipeline.yaml").read_text())
    run_dir = Path(doc["run_dir"])
    doc["stages"]["eval-dpo"]["model"] = str(run_dir / "dpo" / "final")
    doc["stages"]["eval-dpo"]["reference"] = "${sft.final}"
    path = tmp_path / "literal.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    pipe = read_pipeline(path)
    assert pipe.stages[2].inputs == ["sft", "dpo"]
    capsys.readouterr()
    run(path, "--var", "dpo_lr=2e-4", "--dry-run")
    assert plan_of(capsys)["eval-dpo"][0] == "run"
    doc["stages"]["sft"]["data"]["dataset"] = str(run_dir / "eval-dpo" / "per_prompt.jsonl")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError, match=r"stage 'sft': data.dataset: .* lies in the folder of stage "
                                          r"'eval-dpo', "
                                          r"which comes later"):
        read_pipeline(path)
    doc["stages"]["sft"]["data"]["dataset"] = str(run_dir / "sft" / "mine.jsonl")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError, match=r"lies in the folder of stage 'sft' itself"):
        read_pipeline(path)


def test_moved_run_directory_keeps_every_stage(copy, capsys, tmp_path):
    """#18.9: outputs are recorded relative to the stage folder, so a run directory moved away from where
    it ran (nothing left at the old place) is skipped, not rerun."""
    run_dir = copy / "run"
    made_in = str(Path(record(run_dir, "sft")["config"]["output_dir"]).parent)
    for name in ("sft", "dpo", "eval-dpo"):  # as if the run had been made here (absolute paths say so)
        f = run_dir / name / "stage.json"
        f.write_text(f.read_text().replace(made_in, str(run_dir)))
    (tmp_path / "moved").mkdir()
    shutil.move(str(run_dir), str(tmp_path / "moved" / "run"))
    assert not run_dir.exists()
    capsys.readouterr()
    run(copy / "pipeline.yaml", dry_run=True, run_dir=str(tmp_path / "moved" / "run"))
    assert plan_of(capsys) == {n: ("skip", "done, unchanged") for n in ("sft", "dpo", "eval-dpo")}


def test_shipped_run_folder_cannot_write_through_a_link(copy, tmp_path, capsys):
    """#17.5: a stage left "running" with report.md -> a file outside: the runner refuses the folder
    (plan included) and the file outside is untouched; a link in report/ is refused too."""
    victim = tmp_path / "bashrc"
    victim.write_text("mine\n")
    run_dir = copy / "run"
    made_in = str(Path(record(run_dir, "sft")["config"]["output_dir"]).parent)
    for job in run_dir.rglob("job.json"):  # as if the run had been made here, so that a resume may go on
        job.write_text(job.read_text().replace(made_in, str(run_dir)))
    rec = record(run_dir, "eval-dpo")
    rec.update(status="running", finished=None)
    (run_dir / "eval-dpo" / "stage.json").write_text(json.dumps(rec))
    (run_dir / "eval-dpo" / "report.md").unlink()
    os.symlink(os.path.relpath(victim, run_dir / "eval-dpo"), run_dir / "eval-dpo" / "report.md")
    for flags in ((), ("--dry-run",)):
        with pytest.raises(ConfigError, match=r"stage 'eval-dpo': .*eval-dpo/report.md is a symbolic link"):
            run(copy / "pipeline.yaml", *flags)
    assert victim.read_text() == "mine\n"
    (run_dir / "eval-dpo" / "report.md").unlink()
    done = record(run_dir, "eval-dpo") | {"status": "done"}
    (run_dir / "eval-dpo" / "stage.json").write_text(json.dumps(done))
    (run_dir / "report" / "report.md").unlink()
    os.symlink(victim, run_dir / "report" / "report.md")
    for flags in ((), ("--dry-run",)):
        with pytest.raises(ConfigError, match=r"report: .*report/report.md is a symbolic link"):
            run(copy / "pipeline.yaml", *flags)
    assert victim.read_text() == "mine\n"


def test_write_atomic_replaces_a_link_instead_of_following_it(tmp_path):
    """#17.5: outputs go through a fresh temporary file and os.replace: a link at the target (or a
    planted NAME.tmp link) is never written through."""
    from alignkit.files import write_atomic

    victim = tmp_path / "victim"
    victim.write_text("mine")
    os.symlink(victim, tmp_path / "out.json")
    os.symlink(victim, tmp_path / "out.json.tmp")
    write_atomic(tmp_path / "out.json", "{}")
    assert victim.read_text() == "mine" and not (tmp_path / "out.json").is_symlink()
    assert (tmp_path / "out.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.json.tmp", "victim"]


def test_planning_a_huge_input_is_bounded_and_says_so(tmp_path, world, monkeypatch, capsys):
    """#17.15: a 4 GiB (sparse) file is fingerprinted by size and mtime past the content budget, and a
    folder of more files than the bound by its first ones; the plan says so and stays fast."""
    big = tmp_path / "tok"
    (big / "many").mkdir(parents=True)
    with open(big / "weights.bin", "wb") as fh:
        fh.truncate(4 << 30)
    for k in range(300):
        (big / "many" / f"{k:04d}.txt").write_text(str(k))
    monkeypatch.setattr(pipeline_lib, "MAX_FILES", 200, raising=False)
    stages = json.loads(json.dumps(STAGES_YAML))
    stages["sft"]["model"]["tokenizer"] = str(big)
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", world, {"sft": stages["sft"]})
    capsys.readouterr()
    t0 = time.perf_counter()
    run(pipeline, dry_run=True)
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert f"(input {big}: more than 200 files, fingerprinted by the first 200" in out
    assert took < 5, took  # reading 4 GiB would take far longer
    digest, note = pipeline_lib.fingerprint(big / "weights.bin")
    assert note == "1 file(s) past the 256 MiB content budget fingerprinted by size and modification time"
    os.utime(big / "weights.bin", ns=(0, 0))
    assert pipeline_lib.fingerprint(big / "weights.bin")[0] != digest
    small = pipeline_lib.fingerprint(big / "many" / "0001.txt")
    (big / "many" / "0001.txt").write_text("x")  # same size, other bytes: small files by content
    assert pipeline_lib.fingerprint(big / "many" / "0001.txt")[0] != small[0] and small[1] is None
