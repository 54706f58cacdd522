"""Issue 18.11: after early stopping restores the best checkpoint, the last eval logged is of the
restored weights (what final/ holds), marked with the step it was restored from."""

import pytest

from alignkit.train.loop import read_metrics

from .test_train import FakeMetric, sft_cfg


def test_the_last_logged_eval_is_of_the_restored_model(tmp_path, tiny_model_dir, toy_data_dir):
    from alignkit.train.sft import run_sft

    cfg = sft_cfg(tmp_path / "run", tiny_model_dir, toy_data_dir, eval_split="test", max_steps=20, eval_steps=2,
                  save_total_limit=1, early_stopping_patience=2, metric_for_best="eval_fake", greater_is_better=False)
    run_sft(cfg, callbacks=[FakeMetric([3.0, 1.0, 2.0, 4.0, 5.0])])
    evals = [m for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    assert [(m["step"], m.get("restored_from_step")) for m in evals] == [(2, None), (4, None), (6, None), (8, None), (8, 4)]
    assert evals[-1]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-6)  # the weights of step 4, evaluated again
    assert evals[-1]["eval_loss"] != pytest.approx(evals[-2]["eval_loss"], rel=1e-6)



def test_the_report_names_the_restored_step(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from alignkit import report

    rep = report.Report(tmp_path, tmp_path, draw=False)
    rows = [{"step": 2, "eval_loss": 3.0}, {"step": 4, "eval_loss": 1.0}, {"step": 8, "eval_loss": 1.0, "restored_from_step": 4}]
    monkeypatch.setattr(report, "panels_for", lambda s: [("loss", ["eval_loss"])])
    report.curves_section(rep, [SimpleNamespace(metrics=rows, title=lambda: "sft")])
    assert "| eval_loss | 3 (step 2) | 1 (final, restored from step 4) |" in "\n".join(rep.lines)
