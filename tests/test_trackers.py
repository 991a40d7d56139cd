"""Tracker sinks: a run resumed from its checkpoint continues the same tracker run (the run ids are
kept in the checkpoint's trainer state). Each test skips when its tracker is not installed."""

from __future__ import annotations

import pytest
import torch

from bipost.run import train

from helpers import config

STEPS = ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "objectives.0.data.eval_fraction=0.1"]


def _train_then_resume(out, *overrides):
    """4 steps with a checkpoint at step 2, then the run resumed from that checkpoint (steps 3-4
    again): the run id the checkpoint holds."""
    train(config(out, *STEPS, *overrides))
    state = torch.load(out / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=False)
    train(config(out, *STEPS, *overrides, "train.resume=true"))
    return state["trackers"]


def test_mlflow_resumed_run_continues_the_same_run(tmp_path, monkeypatch):
    """One mlflow run, finished, holding steps 1-4 (3 and 4 twice: before and after the resume),
    the evaluations' losses (steps 0, 2, 4; 4 again after the resume), and the run's config."""
    pytest.importorskip("mlflow", reason="mlflow is the 'mlflow' extra")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind a flag
    uri = f"file:{tmp_path / 'mlruns'}"
    ids = _train_then_resume(tmp_path / "run", "train.report_to=mlflow", f"train.mlflow_tracking_uri={uri}",
                             "train.wandb_project=bipost-test", "train.run_name=resumable")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("bipost-test").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "resumable"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/sft"))
    assert steps == [1, 2, 3, 3, 4, 4]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/sft")) == [0, 2, 4, 4]
    assert "config.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_trackio_resumed_run_continues_the_same_run(tmp_path, monkeypatch):
    """One trackio run (named after the output folder) holding steps 1-4."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    pytest.importorskip("trackio", reason="trackio is the 'trackio' extra")
    import trackio.utils
    from trackio.sqlite_storage import SQLiteStorage

    if trackio.utils.TRACKIO_DIR != tmp_path / "trackio":
        pytest.skip("trackio was imported earlier in this process, with another TRACKIO_DIR")
    ids = _train_then_resume(tmp_path / "run", "train.report_to=trackio", "train.wandb_project=bipost-test")
    assert ids == {"trackio": "run"}  # named after the output folder
    assert SQLiteStorage.get_runs("bipost-test") == ["run"]
    logged = [r["step"] for r in SQLiteStorage.get_logs("bipost-test", "run") if "loss/sft" in r]
    assert sorted(set(logged)) == [1, 2, 3, 4]
