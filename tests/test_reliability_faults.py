"""Reliability of an experiment's files (issue 23 items 21-25): a stage killed while it finishes, files left empty
or corrupt, files in ``--out`` that the run did not write, and Ctrl-C. The kill at every write is
``test_reliability_kills.py``; the config checks of item 24 are in ``test_config_schema.py``."""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml
from test_experiment import _data_dir, _fast_cpu, collection  # noqa: F401 — fixtures
from test_reliability_kills import kill_config, outcome
from training_data import training_frames

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.experiment import cli, run_experiment
from pyterrier_kdcl.experiment import runner as experiment_module
from pyterrier_kdcl.paths import UnreadableFile
from pyterrier_kdcl.training import RerankerTrainer
from pyterrier_kdcl.training.teachers import SCORE_FILE, ScoreStore


@pytest.fixture(scope="module")
def reference(tiny_model, collection, tmp_path_factory):  # noqa: F811
    """One uninterrupted run of the small kill config: (config, its output directory, what it computed)."""
    cfg = kill_config(tiny_model, collection)
    out = tmp_path_factory.mktemp("reference")
    run_experiment(copy.deepcopy(cfg), out, verbose=False)
    return cfg, out, outcome(out)


def counting_steps(monkeypatch) -> list:
    steps = []
    original = RerankerTrainer._step

    def step(self, *args, **kwargs):
        steps.append(str(self.output_dir))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RerankerTrainer, "_step", step)
    return steps


# -- item 21: a kill while a finished stage removes its checkpoints ----------------------------------------------
def test_a_stage_killed_before_done_json_resumes_from_its_last_checkpoint_without_training(reference, tmp_path,
                                                                                          monkeypatch):
    cfg, _, expected = reference
    finish = experiment_module.Stage.finish

    def killed_finish(self, info, processes=None):
        raise KeyboardInterrupt("killed after the model was saved, before done.json")

    monkeypatch.setattr(experiment_module.Stage, "finish", killed_finish)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    teacher = tmp_path / "teacher"
    assert (teacher / "model").is_dir() and not (teacher / "done.json").exists()
    assert any((teacher / "checkpoints").iterdir())  # kept until done.json (before: removed with the model saved)
    monkeypatch.setattr(experiment_module.Stage, "finish", finish)
    steps = counting_steps(monkeypatch)
    run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert not [s for s in steps if s == str(teacher)]  # the last checkpoint had nothing left to train
    assert outcome(tmp_path) == expected  # the best weights, not the last step's
    assert not (teacher / "checkpoints").exists()


def test_checkpoints_a_kill_left_after_done_json_are_removed_by_the_next_run(reference, tmp_path, monkeypatch):
    cfg, out, expected = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    for leftover in ("checkpoints/step-00000004", ".old-checkpoints/step-00000002"):
        (tmp_path / "teacher" / leftover).mkdir(parents=True)
        (tmp_path / "teacher" / leftover / "state.json").write_text("{")  # half deleted
    steps = counting_steps(monkeypatch)
    run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert steps == [] and outcome(tmp_path) == expected
    assert not (tmp_path / "teacher" / "checkpoints").exists()
    assert not (tmp_path / "teacher" / ".old-checkpoints").exists()


# -- item 22: files a kill or a full disk left empty or cut short --------------------------------------------------
def test_emptied_or_truncated_run_files_and_evaluation_csvs_are_computed_again(reference, tmp_path, capsys):
    cfg, out, expected = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    runs = tmp_path / "runs" / "tiny-test"
    (runs / "perquery.csv").write_text("")  # before: pandas' EmptyDataError from inside pt.Experiment
    (runs / "aggregated.csv").write_text("")
    (runs / "teacher.res.gz").write_bytes(b"")  # before: read as no results, then "8 topics, but no results"
    (tmp_path / "teacher" / "done.json").write_text('{"fingerp')
    run_experiment(copy.deepcopy(cfg), tmp_path, verbose=True)
    assert outcome(tmp_path) == expected
    said = capsys.readouterr().out
    for name in ("perquery.csv", "aggregated.csv", "teacher.res.gz", "done.json"):
        assert f"{name} cannot be read" in said, name


def test_a_log_csv_that_cannot_be_read_is_named_with_what_to_do(reference, tmp_path):
    cfg, out, _ = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    (tmp_path / "teacher" / "log.csv").write_text("")
    with pytest.raises(UnreadableFile, match=r"teacher/log.csv cannot be read .*delete .*teacher/done.json"):
        run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)


# -- item 23: files in --out that the run did not write ----------------------------------------------------------
def test_a_folder_of_the_users_own_where_a_stage_goes_is_never_deleted(reference, tmp_path):
    cfg, _, _ = reference
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "my-notes.txt").write_text("mine")
    with pytest.raises(experiment_module.ForeignFiles, match=r"teacher holds files this experiment did not write "
                                                             r"\(it has no stage.json\): my-notes.txt.*--out"):
        run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert (tmp_path / "teacher" / "my-notes.txt").read_text() == "mine"  # before: 'training afresh', deleted


def test_a_run_file_no_run_recorded_is_neither_deleted_nor_reused(reference, tmp_path):
    cfg, out, _ = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    (tmp_path / "runs" / "tiny-test" / "systems.json").unlink()
    with pytest.raises(experiment_module.ForeignFiles, match=r"BM25.res.gz was not written by this experiment"):
        run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert (tmp_path / "runs" / "tiny-test" / "BM25.res.gz").stat().st_size > 0


# -- item 25: corrupt files the run wrote, and Ctrl-C ----------------------------------------------------------
def test_a_corrupt_checkpoint_is_named_with_what_to_do(tiny_model, tmp_path):
    res, qrels = training_frames(4)

    def trainer():
        return kdcl.ContrastiveTrainer(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, max_length=32),
                                       group_size=4, batch_size=2, output_dir=tmp_path, keep_checkpoints=True,
                                       verbose=False)

    trainer().fit(res, qrels)
    [checkpoint] = (tmp_path / "checkpoints").iterdir()
    (checkpoint / "weights.safetensors").write_bytes(b"\x00" * 10)  # before: a bare SafetensorError
    with pytest.raises(UnreadableFile, match=rf"{checkpoint}/weights.safetensors cannot be read .*delete {checkpoint}"):
        trainer().fit(res, qrels, resume=True)
    (checkpoint / "weights.safetensors").unlink()
    with pytest.raises(UnreadableFile, match=r"weights.safetensors is missing: delete"):
        trainer().fit(res, qrels, resume=True)


def test_a_corrupt_teacher_score_database_is_named_with_what_to_do(tmp_path):
    ScoreStore(tmp_path).put([b"k"], [1.0])
    (tmp_path / SCORE_FILE).write_bytes(b"not a database" * 100)  # before: a bare DatabaseError naming no file
    with pytest.raises(UnreadableFile, match=rf"{tmp_path / SCORE_FILE} cannot be read .*delete {tmp_path} \(its "
                                             "teacher scores are computed again\\)"):
        ScoreStore(tmp_path)


def test_ctrl_c_stops_with_one_line_and_status_130(reference, tmp_path, monkeypatch, capsys):
    cfg, _, _ = reference
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_module.ExperimentRunner, "run", interrupted)
    assert cli.main(["experiment", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted: what finished is kept (stages, checkpoints, run files); run the same command again to continue"]
