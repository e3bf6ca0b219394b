"""What ``kdcl experiment`` writes while it runs (issue 26 item 6): plain lines without control codes when stderr is
not a terminal, and nothing but results with ``--quiet``."""

import logging
import warnings

import pyterrier as pt
import pytest

from pyterrier_kdcl.experiment import console

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def restored():
    """configure() sets process-wide state: PyTerrier's bar class, logging's switch, warning filters."""
    bar = pt.tqdm
    with warnings.catch_warnings():
        yield
    pt.tqdm = bar
    logging.disable(logging.NOTSET)


def nested_bars(model_dir) -> list[str]:
    """pt.Experiment's bar around a reranker's own bar, for two systems sharing their first stage (PyTerrier
    advises plan='tree' then): what an experiment's evaluation shows. Returns the warnings shown."""
    from pyterrier.measures import nDCG
    from training_data import training_frames

    import pyterrier_kdcl as kdcl

    res, qrels = training_frames(3, depth=4)
    first_stage = pt.Transformer.from_df(res)
    ce = kdcl.CrossEncoder(model_dir, batch_size=2, max_length=32)  # verbose: its own bar
    topics = res[["qid", "query"]].drop_duplicates()
    with warnings.catch_warnings(record=True) as shown:  # the filters in force, recording instead of printing
        pt.Experiment([first_stage, first_stage >> ce], topics, qrels, [nDCG @ 10], verbose=True)
    return [str(w.message) for w in shown]


def test_without_a_terminal_bars_are_plain_lines(tiny_model, capfd, restored):
    model_dir = tiny_model("bert")
    console.configure(quiet=False)  # under capfd, stderr is a pipe
    assert pt.tqdm is console.PlainProgress
    capfd.readouterr()
    shown = nested_bars(model_dir)
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\r" not in err, repr(err[:500])
    lines = err.splitlines()
    assert any(line.startswith("pt.Experiment: 2/2") for line in lines), err
    assert any(line.startswith("CrossEncoder(") and "12/12" in line for line in lines), err
    assert not [w for w in shown if "plan='tree'" in w]  # advice the person running the command cannot act on


def test_quiet_shows_no_bars_no_info_lines_and_no_advice(tiny_model, capfd, restored):
    import ir_datasets

    model_dir = tiny_model("bert")
    console.configure(quiet=True)
    capfd.readouterr()
    shown = nested_bars(model_dir)
    ir_datasets.log.easy("ir_datasets.test_console").info("Opening docs.pklz4/bin with direct file access")
    assert capfd.readouterr().err == ""
    assert not [w for w in shown if "plan='tree'" in w]


def test_the_cli_configures_the_console_before_the_run(monkeypatch, capfd, restored):
    from pyterrier_kdcl.experiment import cli, config, runner

    seen = []

    class Runner:
        def __init__(self, config, out, *, verbose, wait):
            seen.append(verbose)

        def run(self):
            for _ in pt.tqdm(range(3), desc="training"):
                pass

    monkeypatch.setattr(config, "load_config", lambda path: object())
    monkeypatch.setattr(runner, "ExperimentRunner", Runner)
    assert cli.main(["experiment", "exp.yaml", "--out", "out", "--quiet"]) == 0
    assert seen == [False] and capfd.readouterr().err == ""
    monkeypatch.setattr("pyterrier_kdcl.experiment.plan.plan", lambda config: "the plan")
    assert cli.main(["experiment", "exp.yaml", "--out", "out"]) == 0
    err = capfd.readouterr().err
    assert "training: 3/3" in err and "\r" not in err


def test_the_cli_leaves_the_process_as_it_found_it(tmp_path, capsys):
    """`kdcl experiment --quiet` called in-process (as tests and notebooks do) restores bars and logging after it."""
    import logging

    import pyterrier as pt

    from pyterrier_kdcl.experiment import console

    bars, disabled = pt.tqdm, logging.root.manager.disable
    with console.configured(quiet=True):
        assert pt.tqdm is console.SilentProgress and logging.root.manager.disable >= logging.INFO
    assert pt.tqdm is bars and logging.root.manager.disable == disabled
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    with console.configured(quiet=False, stream=tmp_path.joinpath("log").open("w")):
        assert pt.tqdm is console.PlainProgress
        assert not hf_logging.is_progress_bar_enabled()  # its nested weight-loading bars wrote ESC[A into logs
    assert pt.tqdm is bars and hf_logging.is_progress_bar_enabled()
