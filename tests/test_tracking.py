"""Experiment tracking (issue 26 item 1) and a finished fit's checkpoints (item 6): TensorBoard event files read back
with TensorBoard's own reader, trackers that are not installed refused with what to install, no fingerprint that
holds ``report_to``; checkpoints removed when a fit finishes, kept when asked, and a kill while removing them."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.training import checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"group_size": 4, "batch_size": 2, "verbose": False, "validate_every": 2, "metric": "RR@10",
           "learning_rate": 1e-3}


def student(tiny_model):
    return kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32)


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logs_loss_lr_temperature_throughput_and_the_validation_metric_per_step(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    res, qrels = training_frames(8)  # 4 steps of 2 queries; validations at steps 2 and 4
    trainer = kdcl.ContrastiveTrainer(student(tiny_model), temperature=0.5, output_dir=tmp_path / "cl",
                                      report_to="tensorboard", **OPTIONS)
    log = trainer.fit(res, qrels, res, qrels)

    logged = scalars(tmp_path / "cl" / "runs" / "kdcl")
    steps = list(log["step"])
    assert steps == [1, 2, 3, 4]
    assert [s for s, _ in logged["train/loss"]] == steps
    assert [v for _, v in logged["train/loss"]] == pytest.approx(list(log["loss"]), rel=1e-6)
    assert [v for _, v in logged["train/learning_rate"]] == pytest.approx(list(log["lr"]), rel=1e-6)
    assert [v for _, v in logged["train/temperature"]] == [0.5] * 4
    assert [s for s, _ in logged["train/pairs_per_second"]] == steps
    assert all(v > 0 for _, v in logged["train/pairs_per_second"])
    validated = log.dropna(subset=["metric"])
    assert [s for s, _ in logged["validation/RR_10"]] == list(validated["step"]) == [2, 4]
    assert [v for _, v in logged["validation/RR_10"]] == pytest.approx(list(validated["metric"]), rel=1e-6)
    assert [s for s, _ in logged["validation/seconds"]] == [2, 4]


def test_distillation_logs_both_temperatures(tiny_model, tmp_path):
    pytest.importorskip("tensorboard")
    from training_data import CountingTeacher

    res, qrels = training_frames(4)
    kdcl.DistillationTrainer(student(tiny_model), CountingTeacher(), teacher_temperature=3.0, student_temperature=1.5,
                             teacher_cache_key="counting", output_dir=tmp_path / "kd", report_to=["tensorboard"],
                             **OPTIONS).fit(res, qrels)
    logged = scalars(tmp_path / "kd" / "runs" / "kdcl")
    assert [v for _, v in logged["train/teacher_temperature"]] == [3.0, 3.0]
    assert [v for _, v in logged["train/student_temperature"]] == [1.5, 1.5]
    assert not any(tag.startswith("validation/") for tag in logged)  # no validation data, no metric


def wandb_history(directory) -> list[dict]:
    """The history records (one per logged step) of the one offline W&B run under ``directory``. W&B 0.31 has no
    Python reader of its ``.wandb`` file: it is a LevelDB-style log (a 7-byte file header, then 32 KiB blocks of
    records, each a 7-byte header of CRC, length and kind — full, first, middle, last — and its bytes) of
    ``wandb_internal_pb2.Record`` messages."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    data, block, position, pieces, records = path.read_bytes(), 32 * 1024, 7, b"", []
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                records.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return records


def test_weights_and_biases_offline_logs_every_step_and_validation(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res, qrels = training_frames(8)
    log = kdcl.ContrastiveTrainer(student(tiny_model), temperature=0.5, output_dir=tmp_path / "cl", report_to="wandb",
                                  **OPTIONS).fit(res, qrels, res, qrels)
    history = wandb_history(tmp_path / "cl" / "runs")  # W&B's files under output_dir/runs
    assert [h["_step"] for h in history] == list(log["step"]) == [1, 2, 3, 4]
    assert [h["train/loss"] for h in history] == pytest.approx(list(log["loss"]), rel=1e-6)
    assert [h["train/learning_rate"] for h in history] == pytest.approx(list(log["lr"]), rel=1e-6)
    assert all(h["train/temperature"] == 0.5 and h["train/pairs_per_second"] > 0 for h in history)
    validated = log.dropna(subset=["metric"])
    assert [h["_step"] for h in history if "validation/RR_10" in h] == list(validated["step"]) == [2, 4]
    assert [h["validation/RR_10"] for h in history if "validation/RR_10" in h] == \
        pytest.approx(list(validated["metric"]), rel=1e-6)


def test_mlflow_logs_metrics_per_step_and_the_settings_as_parameters(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a local database: MLflow's file store is in maintenance mode
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res, qrels = training_frames(8)
    log = kdcl.ContrastiveTrainer(student(tiny_model), output_dir=tmp_path / "cl", report_to="mlflow",
                                  **OPTIONS).fit(res, qrels, res, qrels)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdcl").experiment_id])
    assert run.info.run_name == str(tmp_path / "cl")  # one run per fit, named by its output directory
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2, 3, 4]
    assert [m.value for m in loss] == pytest.approx(list(log["loss"]), rel=1e-6)
    metric = client.get_metric_history(run.info.run_id, "validation/RR_10")  # MLflow refuses '@' in a name
    validated = log.dropna(subset=["metric"])
    assert [m.step for m in metric] == list(validated["step"]) == [2, 4]
    assert [m.value for m in metric] == pytest.approx(list(validated["metric"]), rel=1e-6)
    assert run.data.params["metric"] == "RR@10" and run.data.params["group_size"] == "4"


def uninstalled(monkeypatch, name: str) -> None:
    """Makes ``name`` look not installed to ``importlib.util.find_spec`` (how the trackers' check looks)."""
    find_spec = importlib.util.find_spec

    def looked_up(module, *args):
        return None if module == name else find_spec(module, *args)

    monkeypatch.setattr(importlib.util, "find_spec", looked_up)


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_refused_naming_the_package(tiny_model, name, monkeypatch):
    uninstalled(monkeypatch, name)
    with pytest.raises(ValueError, match=rf"report_to=.*{name}.*needs the {name} package.*pip install {name}"):
        kdcl.ContrastiveTrainer(student(tiny_model), report_to=["tensorboard", name])


def test_report_to_refuses_unknown_trackers_and_tensorboard_without_a_directory(tiny_model):
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord'.*'tensorboard', 'wandb', 'mlflow'"):
        kdcl.ContrastiveTrainer(student(tiny_model), report_to="tensorbord")
    with pytest.raises(ValueError, match="output_dir"):
        kdcl.ContrastiveTrainer(student(tiny_model), report_to="tensorboard")
    for none in (None, "none", []):
        assert kdcl.ContrastiveTrainer(student(tiny_model), report_to=none).report_to == none


def test_report_to_changes_no_fingerprint(tiny_model, tmp_path, monkeypatch):
    from test_experiment_fusion import test_existing_configs_keep_their_fingerprints as recorded

    from pyterrier_kdcl.experiment import ExperimentRunner
    from pyterrier_kdcl.experiment import data as experiment_data
    from pyterrier_kdcl.experiment.config import ConfigError, load_config
    from pyterrier_kdcl.experiment.runner import Stage

    def config(training=None, student_training=None, check_environment=False):
        return load_config({
            "name": "fp", "train": {"dataset": "irds:kdcl/manpages/train", "depth": 20, "queries": 300},
            "validation": {"dataset": "irds:kdcl/manpages/dev", "depth": 20, "queries": 50},
            "teacher": {"model": "minilm-l6", "max_length": 128,
                        "data": {"dataset": "irds:kdcl/manpages/train", "depth": 20}},
            "students": [{"name": "s", "model": "minilm-l3", "max_length": 128,
                          **({"training": student_training} if student_training else {})}],
            "evaluation": {"in_domain": [{"dataset": "irds:kdcl/manpages/test", "depth": 20}]},
            **({"training": training} if training else {}),
        }, check_environment=check_environment)

    def prints(cfg):
        runner = ExperimentRunner(cfg, "unused", verbose=False)
        teacher = runner.teacher_spec(cfg.teacher).fingerprint()
        return [teacher, *(runner.student_spec(cfg.students[0], o, 42, teacher).fingerprint() for o in ("CL", "KD"))]

    recorded()  # the recorded fingerprints hold
    plain = prints(config())
    assert prints(config({"report_to": "tensorboard"})) == plain
    assert prints(config({"report_to": "none"}, {"report_to": ["tensorboard", "wandb"]})) == plain
    assert prints(config({"report_to": None})) == plain
    assert prints(config({"epochs": 2})) != plain  # a setting that does change results still does

    # the trainer of each stage gets it, and logs under the stage's own directory
    cfg = config({"report_to": "tensorboard"})
    monkeypatch.setattr(experiment_data, "text_stage", lambda data: None)
    stage = Stage(tmp_path / "students" / "s" / "CL" / "seed-42", "fp", "student s")
    kwargs = ExperimentRunner(cfg, tmp_path, verbose=False)._trainer_kwargs(cfg.students[0], 42, stage, cfg.train)
    assert kwargs["report_to"] == "tensorboard" and kwargs["output_dir"] == stage.path

    with pytest.raises(ConfigError, match=r"training.report_to: expected one of 'tensorboard', 'wandb', 'mlflow'"):
        config({"report_to": "tensorbord"})
    with monkeypatch.context() as patch:
        uninstalled(patch, "wandb")
        with pytest.raises(ConfigError, match=r"students\[0\].training.report_to: .*pip install wandb"):
            config(student_training={"report_to": ["wandb"]}, check_environment=True)
    # the trainer's identity: the reranker's fingerprint and repr, with or without tracking
    ce = student(tiny_model)
    tracked = kdcl.ContrastiveTrainer(ce, report_to="tensorboard", output_dir=tmp_path / "t")
    untracked = kdcl.ContrastiveTrainer(ce, output_dir=tmp_path / "t")
    assert tracked.fingerprint() == untracked.fingerprint() and repr(tracked) == repr(untracked)


# -- a finished fit's checkpoints (issue 26 item 6) ----------------------------------------------------------------
def test_a_finished_fit_removes_its_checkpoints_after_saving_the_best_weights(tiny_model, tmp_path):
    res, qrels = training_frames(8)
    trainer = kdcl.ContrastiveTrainer(student(tiny_model), output_dir=tmp_path / "run", checkpoint_every=1,
                                      **OPTIONS)
    log = trainer.fit(res, qrels, res, qrels)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not list((tmp_path / "run").glob(".old-*"))
    saved = kdcl.CrossEncoder.load(tmp_path / "run" / "model", verbose=False)
    for key, value in trainer.reranker.ranker.state_dict().items():  # the restored best weights were saved
        assert torch.equal(saved.ranker.state_dict()[key], value), key
    assert (tmp_path / "run" / "log.csv").exists() and len(log) == 4


def test_keep_checkpoints_keeps_them_and_a_resumed_finished_fit_changes_nothing(tiny_model, tmp_path):
    res, qrels = training_frames(8)
    options = {**OPTIONS, "output_dir": tmp_path / "run", "checkpoint_every": 1, "keep_checkpoints": True}
    first = kdcl.ContrastiveTrainer(student(tiny_model), **options)
    first.fit(res, qrels, res, qrels)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000004"]
    again = kdcl.ContrastiveTrainer(student(tiny_model), **options)
    log = again.fit(res, qrels, res, qrels, resume=True)  # nothing left to train: the same weights
    assert list(log["step"]) == [1, 2, 3, 4]
    for key, value in first.reranker.ranker.state_dict().items():
        assert torch.equal(again.reranker.ranker.state_dict()[key], value), key


def test_a_kill_while_removing_checkpoints_leaves_the_model_and_no_checkpoint_to_resume(tiny_model, tmp_path,
                                                                                          monkeypatch):
    res, qrels = training_frames(8)
    options = {**OPTIONS, "output_dir": tmp_path / "run", "checkpoint_every": 1}
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        if str(path).endswith(".old-checkpoints"):
            raise KeyboardInterrupt("killed while removing the finished fit's checkpoints")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        kdcl.ContrastiveTrainer(student(tiny_model), **options).fit(res, qrels, res, qrels)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real)
    assert (tmp_path / "run" / ".old-checkpoints").is_dir() and not (tmp_path / "run" / "checkpoints").exists()
    assert (tmp_path / "run" / "model" / "kdcl.json").exists()  # saved before anything was removed
    # a later fit in the directory finds nothing to resume: it trains afresh and clears the leftover
    log = kdcl.ContrastiveTrainer(student(tiny_model), **options).fit(res, qrels, res, qrels, resume=True)
    assert list(log["step"]) == [1, 2, 3, 4]
    assert not list((tmp_path / "run").glob(".old-*")) and not (tmp_path / "run" / "checkpoints").exists()


def test_the_training_bar_shows_the_last_validation_metric(tiny_model, capsys):
    res, qrels = training_frames(4)
    log = kdcl.ContrastiveTrainer(student(tiny_model), **{**OPTIONS, "verbose": True}).fit(res, qrels, res, qrels)
    bar = capsys.readouterr().err
    assert f"RR@10={log['metric'].iloc[-1]:.4f}" in bar and f"loss={log['loss'].iloc[-1]:.4f}" in bar
