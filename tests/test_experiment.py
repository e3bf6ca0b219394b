"""The KD-vs-CL experiment runner end to end on tiny models and a tiny local ir_datasets collection.

The collection is registered here from files in a temporary folder (docs, queries, qrels, a scoreddocs run and a
TREC run file), so every first-stage kind runs without network or built collections.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import yaml

from pyterrier_kdcl.experiment import ExperimentRunner, run_experiment
from pyterrier_kdcl.experiment import runner as experiment_module
from pyterrier_kdcl.experiment.config import ConfigError, load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TOPICS = "read write open close list copy move print change install remove link".split()
PREFIX = "kdcl-test-experiment"


# the functional form keeps real types in __annotations__ (pt.text.get_text reads them), despite the
# `from __future__ import annotations` above
TitledDoc = NamedTuple("TitledDoc", [("doc_id", str), ("title", str), ("text", str)])  # noqa: UP014


def _write_collection(root: Path) -> None:
    """Docs about 12 topics; queries ask for one topic; the relevant doc says the topic word twice."""
    rng = random.Random(0)
    filler = "system file user data command option value page text manual".split()
    docs, queries, qrels, scored = [], {}, [], []
    for t, word in enumerate(TOPICS):
        for k in range(3):
            body = " ".join(rng.choice(filler) for _ in range(12))
            text = f"how to {word} {word} things {body}" if k == 0 else f"{body} {word} {rng.choice(TOPICS)}"
            docs.append((f"d{t}-{k}", text))
    for split, count in (("train", 16), ("dev", 6), ("test", 8), ("ood", 6)):
        queries[split] = []
        for i in range(count):
            t = (i * 5 + len(split)) % len(TOPICS)
            qid = f"{split}{i}"
            queries[split].append((qid, f"{TOPICS[t]} a thing number {i}"))
            qrels.append((split, qid, f"d{t}-0"))
            others = rng.sample([d for d, _ in docs if not d.startswith(f"d{t}-")], 5)
            for r, docno in enumerate([f"d{t}-0", *others]):
                scored.append((split, qid, docno, r))
    root.mkdir(parents=True, exist_ok=True)
    (root / "docs.tsv").write_text("".join(f"{d}\t{d.split('-')[0]} page\t{t}\n" for d, t in docs))
    for split, rows in queries.items():
        (root / f"{split}.queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in rows))
        (root / f"{split}.qrels").write_text("".join(f"{q} 0 {d} 1\n" for s, q, d in qrels if s == split))
        # the positive is not always first: rotate it to rank 2 for half the queries
        lines = []
        for s, q, d, r in scored:
            if s == split:
                rank = (r + 2) % 6 if int(q[len(split):]) % 2 else r
                lines.append(f"{q} Q0 {d} {rank + 1} {10 - rank} fixture\n")
        (root / f"{split}.run").write_text("".join(lines))


@pytest.fixture(scope="session")
def collection(tmp_path_factory):
    """Registers irds:kdcl-test-experiment/{train,dev,test,ood}; returns the folder with its files."""
    import ir_datasets
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import TrecQrels, TrecScoredDocs, TsvDocs, TsvQueries
    from ir_datasets.util import LocalDownload

    root = tmp_path_factory.mktemp("collection")
    _write_collection(root)
    docs = TsvDocs(LocalDownload(root / "docs.tsv"), doc_cls=TitledDoc, namespace=PREFIX, lang="en")
    for split in ("train", "dev", "test", "ood"):
        name = f"{PREFIX}/{split}"
        if name not in ir_datasets.registry:
            ir_datasets.registry.register(name, Dataset(
                docs, TsvQueries(LocalDownload(root / f"{split}.queries.tsv"), namespace=PREFIX, lang="en"),
                TrecQrels(LocalDownload(root / f"{split}.qrels"), {1: "relevant"}),
                TrecScoredDocs(LocalDownload(root / f"{split}.run"))))
    return root


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    # Tiny models gain nothing from a second thread, and on a busy machine OpenMP's waiting for it costs 100×.
    # statsmodels' Holm correction calls gc.collect() (~0.5 s with torch loaded): freezing what exists makes it cheap.
    import gc

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _data_dir(tmp_path_factory, monkeypatch):
    # BM25 indexes of non-kdcl datasets go under KDCL_DATA/indexes: keep them out of the user's data
    monkeypatch.setenv("KDCL_DATA", str(tmp_path_factory.getbasetemp() / "kdcl-data"))


def tiny_config(tiny_model, collection: Path) -> dict:
    bert, bert2 = str(tiny_model("bert")), str(tiny_model("bert", seed=1))
    qwen = str(tiny_model("qwen2"))
    return {
        "name": "tiny",
        "description": "tiny models on a tiny collection",
        "seeds": [1, 2],
        "train": {"dataset": f"irds:{PREFIX}/train", "depth": 6},
        "validation": {"dataset": f"irds:{PREFIX}/dev", "depth": 5},
        "training": {"group_size": 4, "batch_size": 4, "learning_rate": 1e-3, "validate_every": 2},
        "teacher": {"model": bert, "max_length": 32, "training": {"epochs": 2}},
        "students": [
            {"name": "bert-small", "model": bert2, "max_length": 32},
            {"name": "qwen-lora", "model": qwen, "lora": {"r": 4, "lora_alpha": 8}, "max_length": 32,
             "objectives": ["CL", "KD"]},
        ],
        "evaluation": {
            "in_domain": [{"dataset": f"irds:{PREFIX}/test", "depth": 5, "name": "tiny-test"}],
            "out_of_domain": [
                {"dataset": f"irds:{PREFIX}/ood", "depth": 5, "name": "ood-scored",
                 "first_stage": {"kind": "scoreddocs"}},
                {"dataset": f"irds:{PREFIX}/ood", "depth": 4, "name": "ood-run", "queries": 5,
                 "first_stage": {"kind": "run", "path": str(collection / "ood.run")}},
            ],
            "measures": ["nDCG@10", "RR@10", "R@3"],
        },
    }


class Counter:
    """Counts trainer constructions by wrapping the trainer classes the runner uses."""

    def __init__(self, monkeypatch):
        self.made: list[str] = []
        for name in ("ContrastiveTrainer", "DistillationTrainer"):
            original = getattr(experiment_module, name)

            def make(*args, _original=original, _name=name, **kwargs):
                self.made.append(f"{_name}:{kwargs['output_dir']}")
                return _original(*args, **kwargs)

            monkeypatch.setattr(experiment_module, name, make)


@pytest.fixture(scope="module")
def finished_run(tiny_model, collection, tmp_path_factory):
    """One complete run of the tiny config (shared: it is the expensive part)."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tiny_model, collection)
    result = run_experiment(copy.deepcopy(cfg), out, verbose=False)
    return cfg, out, result


def test_end_to_end_writes_models_runs_tables_plots_and_verdict(finished_run):
    cfg, out, result = finished_run
    assert (out / "teacher" / "model" / "kdcl.json").exists() and (out / "teacher" / "done.json").exists()
    for student in ("bert-small", "qwen-lora"):
        for objective in ("CL", "KD"):
            for seed in (1, 2):
                stage = out / "students" / student / objective / f"seed-{seed}"
                assert (stage / "done.json").exists() and (stage / "model" / "kdcl.json").exists()
                assert not (stage / "checkpoints").exists()  # removed once the model is saved
                assert len(pd.read_csv(stage / "log.csv")) > 0
    assert any((out / "teacher-scores").iterdir())  # the KD students' teacher score cache
    systems = ["BM25", "teacher"] + [f"{s}-{o}-s{seed}" for s in ("bert-small", "qwen-lora") for o in ("CL", "KD")
                                     for seed in (1, 2)]
    for label in ("tiny-test", "ood-scored", "ood-run"):
        runs = out / "runs" / label
        assert {f"{n}.res.gz" for n in systems} <= {p.name for p in runs.iterdir()}
        assert (runs / "perquery.csv").exists()
        table = pd.read_csv(out / "tables" / f"{label}.csv")
        assert list(table["name"]) == systems
        for m in ("nDCG@10", "RR@10", "R@3"):
            for column in (m, f"{m} +", f"{m} -", f"{m} p-value", f"{m} p-value corrected", f"{m} reject"):
                assert column in table.columns, column
        assert table.loc[table["name"] == "BM25", "nDCG@10 p-value"].isna().all()  # the baseline
        assert table.loc[table["name"] != "BM25", "nDCG@10 p-value"].notna().any()
        means = pd.read_csv(out / "tables" / f"{label}.mean.csv")
        assert list(means["system"]) == ["BM25", "teacher", "bert-small CL", "bert-small KD", "qwen-lora CL",
                                         "qwen-lora KD"]
        assert means.loc[2:, "nDCG@10 std"].notna().all()  # two seeds
        assert (out / "tables" / f"{label}.md").read_text().startswith("| name |")
    # a reranked run holds exactly the first stage's candidates
    bm25 = pd.read_csv(out / "runs" / "ood-run" / "BM25.res.gz", sep=r"\s+", header=None)
    student = pd.read_csv(out / "runs" / "ood-run" / "qwen-lora-KD-s1.res.gz", sep=r"\s+", header=None)
    assert len(bm25) == len(student) == 5 * 4

    summary = pd.read_csv(out / "tables" / "summary.csv")
    assert list(summary["system"]) == ["BM25", "teacher", "bert-small CL", "bert-small KD", "qwen-lora CL",
                                       "qwen-lora KD"]
    ood_label = "out of domain (pooled queries)"
    for column in ("tiny-test", "ood-scored", "ood-run", ood_label, f"{ood_label} std"):
        assert column in summary.columns
    summary_md = (out / "tables" / "summary.md").read_text()
    assert "tiny-test (in domain)" in summary_md and " ± " in summary_md

    kd = pd.read_csv(out / "tables" / "kd_vs_cl.csv")
    assert set(kd["student"]) == {"bert-small", "qwen-lora"}
    pooled = kd[kd["scope"] == "pooled"]
    assert set(pooled["collection"]) == {"in domain (tiny-test)", ood_label}
    for column in ("CL", "KD", "KD-CL", "seeds", "per seed KD-CL", "95% CI low (seed-aware t, uncorrected)",
                   "95% CI high (seed-aware t, uncorrected)", "p (seed-aware t)", "p (holm)", "significant", "winner",
                   "seed sd", "se", "df", "MDE (80% power)", "MDE α"):
        assert column in kd.columns
    assert (kd["seeds"] == 2).all()
    from pyterrier_kdcl.experiment import evidence  # the run's evidence reproduces its report

    assert (out / evidence.FILE).exists() and evidence.verify(out) == []
    by_system = summary.set_index("system")[ood_label]  # one definition: the summary's pooled mean is the table's
    kd_ood = pooled[(pooled["student"] == "bert-small") & ~pooled["in_domain"]]["KD-CL"].item()
    assert abs(by_system["bert-small KD"] - by_system["bert-small CL"] - kd_ood) < 1e-9
    assert f"{ood_label}: {kd_ood:+.3f}" in result.report.verdict
    assert set(pd.read_csv(out / "tables" / "teacher_vs_cl.csv")["student"]) == {"bert-small", "qwen-lora"}
    row = kd[(kd["scope"] == "collection") & (kd["collection"] == "tiny-test")].iloc[0]
    assert row["queries"] == 8 and abs(row["KD"] - row["CL"] - row["KD-CL"]) < 1e-9
    ood_rows = kd[(kd["student"] == "bert-small") & (kd["scope"] == "collection") & ~kd["in_domain"]]
    assert pooled[(pooled["student"] == "bert-small") & ~pooled["in_domain"]]["queries"].item() == \
        ood_rows["queries"].sum()

    for plot in ("kd_minus_cl.png", "training_curves.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Verdict" in report and "bert-small" in report and "plots/kd_minus_cl.png" in report
    assert "Verdict" in result.report.verdict
    assert json.loads((out / "timings.json").read_text())["total_seconds"] > 0


def test_rerun_reuses_every_stage_and_run(finished_run, monkeypatch):
    cfg, out, first = finished_run
    counter = Counter(monkeypatch)

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished model was loaded again")

    monkeypatch.setattr(experiment_module.CrossEncoder, "load", no_loading)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.res.gz")}
    result = run_experiment(copy.deepcopy(cfg), out, verbose=False)
    assert counter.made == []
    assert all(m.reused for m in result.models)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.res.gz")} == before
    pd.testing.assert_frame_equal(result.report.summary, first.report.summary)


def test_changed_setting_retrains_only_what_depends_on_it(finished_run, tmp_path, monkeypatch):
    cfg, out, _ = finished_run
    shutil.copytree(out, tmp_path / "out")
    cfg = copy.deepcopy(cfg)
    cfg["students"][0]["training"] = {"teacher_temperature": 4.0}  # a KD setting of one student
    counter = Counter(monkeypatch)
    result = run_experiment(cfg, tmp_path / "out", verbose=False)
    students = tmp_path / "out" / "students" / "bert-small" / "KD"
    assert sorted(counter.made) == [f"DistillationTrainer:{students / 'seed-1'}",
                                    f"DistillationTrainer:{students / 'seed-2'}"]
    assert sorted(m.name for m in result.models if not m.reused) == ["bert-small-KD-s1", "bert-small-KD-s2"]
    changed = json.loads((tmp_path / "out" / "runs" / "tiny-test" / "systems.json").read_text())
    unchanged = json.loads((out / "runs" / "tiny-test" / "systems.json").read_text())
    assert {n for n in changed if changed[n] != unchanged[n]} == {"bert-small-KD-s1", "bert-small-KD-s2"}


def test_a_teacher_cache_of_another_run_lends_its_scores_and_changes_no_fingerprint(finished_run, tmp_path,
                                                                                     monkeypatch):
    """``teacher_cache``: a second experiment distils from the first one's cached scores without scoring a pair,
    writes no cache of its own, and its stage has the fingerprint it has without the option."""
    from pyterrier_kdcl.training import teachers

    cfg, out, _ = finished_run
    shutil.copytree(out / "teacher", tmp_path / "out" / "teacher")  # the same trained teacher, reused
    scored = []
    prepare = teachers.TeacherScores.prepare

    def counting(self, *args, **kwargs):
        prepare(self, *args, **kwargs)
        scored.append(self.scored)

    monkeypatch.setattr(teachers.TeacherScores, "prepare", counting)
    shared = out / "teacher-scores"
    runner = ExperimentRunner(load_config({**copy.deepcopy(cfg), "teacher_cache": str(shared)}), tmp_path / "out",
                              verbose=False)
    assert runner.teacher_cache == shared
    spec = runner.config.students[1]
    model = runner.student(spec, "KD", 1, runner.teacher())
    assert not model.reused and scored == [0]  # every pair came from the other run's cache
    assert not (tmp_path / "out" / "teacher-scores").exists()
    as_first_run = json.loads((out / "students" / spec.name / "KD" / "seed-1" / "done.json").read_text())
    assert model.fingerprint == as_first_run["fingerprint"]


def test_a_crashed_stage_resumes_from_its_checkpoint(tiny_model, collection, tmp_path, monkeypatch):
    from pyterrier_kdcl.training import RerankerTrainer

    cfg = tiny_config(tiny_model, collection)
    cfg.update(seeds=[1], students=cfg["students"][:1])
    cfg["students"][0]["objectives"] = ["CL"]
    cfg["evaluation"] = {"in_domain": cfg["evaluation"]["in_domain"], "baseline": "teacher"}
    cfg["training"].update(checkpoint_every=1, validate_every=None)
    original = RerankerTrainer._step
    calls = {"n": 0}

    def crash_at_the_fourth_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RerankerTrainer, "_step", crash_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    teacher = tmp_path / "teacher"
    assert not (teacher / "done.json").exists() and any((teacher / "checkpoints").iterdir())
    fits = []
    original_fit = RerankerTrainer.fit

    def recording_fit(self, *args, **kwargs):
        fits.append(kwargs.get("resume"))
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(RerankerTrainer, "fit", recording_fit)
    result = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert fits == [True, True]
    log = result.models[0].log
    assert list(log["step"]) == list(range(1, len(log) + 1))  # resumed: the steps before the crash are kept
    assert calls["n"] == 4 + (len(log) - 3) + len(result.models[1].log)


def test_a_given_teacher_a_recurrent_student_and_other_data_settings(finished_run, tiny_model, collection, tmp_path,
                                                                     monkeypatch):
    """The remaining stage kinds of paper.yaml: a teacher used as given, a Mamba student trained fully, a BM25
    index shared through first_stage.index, documents from several fields, an explicit query field."""
    _, out, _ = finished_run
    cfg = tiny_config(tiny_model, collection)
    cfg.update(seeds=[1], students=[{"name": "mamba", "model": str(tiny_model("mamba")), "max_length": 32}])
    cfg["teacher"] = {"model": str(out / "teacher" / "model"), "train": "none", "batch_size": 8}
    cfg["evaluation"] = {"in_domain": [{"dataset": f"irds:{PREFIX}/test", "depth": 5, "text": ["title", "text"],
                                        "query_field": "text", "first_stage": {"index": f"{PREFIX}/train"}}]}
    counter = Counter(monkeypatch)
    import pyterrier_kdcl.offline.datasets as kdcl_datasets

    indexed, bm25 = [], kdcl_datasets.bm25
    monkeypatch.setattr(kdcl_datasets, "bm25", lambda name, **kw: indexed.append(name) or bm25(name, **kw))
    result = run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    assert not (tmp_path / "teacher").exists()
    assert f"{PREFIX}/test" not in indexed and f"{PREFIX}/train" in indexed  # test reranks the train index's BM25
    assert sorted(m.split(":")[0] for m in counter.made) == ["ContrastiveTrainer", "DistillationTrainer"]
    assert result.models[0].objective == "given"
    assert [c.label for c in result.collections] == [PREFIX]  # from the id, without the split name "test"
    table = pd.read_csv(tmp_path / "tables" / f"{PREFIX}.csv")
    assert list(table["name"]) == ["BM25", "teacher", "mamba-CL-s1", "mamba-KD-s1"]
    runner = ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path, verbose=False)
    _, _, res = runner.frames(runner.config.evaluation.in_domain[0])
    assert res["text"].str.match(r"^d\d+ page (how to|\w+ )").all()  # title, then text


# -- configs -----------------------------------------------------------------------------------------------------
def _problems(cfg: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(cfg, **kwargs)
    return err.value.problems


def test_config_errors_name_the_key_path(tiny_model, collection):
    good = tiny_config(tiny_model, collection)
    load_config(copy.deepcopy(good))  # valid as it is

    bad = copy.deepcopy(good)
    bad["students"][1]["objectivs"] = ["KD"]
    bad["students"][0]["training"] = {"learning_rate": "fast", "epoch": 2}
    bad["teacher"]["max_length"] = "long"
    bad["evaluation"]["measures"] = ["nDCG@10", "NotAMeasure"]
    bad["evaluation"]["baseline"] = "nobody"
    bad["evaluation"]["out_of_domain"][0]["first_stage"]["kind"] = "dense"
    bad["seeds"] = [1, "two"]
    del bad["train"]
    problems = "\n".join(_problems(bad))
    for expected in (
        "students[1].objectivs: unknown key; did you mean 'objectives'?",
        "students[0].training.learning_rate: expected a number, got 'fast'",
        "students[0].training.epoch: unknown training setting; did you mean 'epochs'?",
        "teacher.max_length: expected an integer, got 'long'",
        "evaluation.measures[1]: 'NotAMeasure' is not an ir_measures measure",
        "evaluation.baseline: 'nobody' is not a system",
        "evaluation.out_of_domain[0].first_stage.kind: expected one of 'bm25', 'scoreddocs', 'run', got 'dense'",
        "seeds[1]: expected an integer, got 'two'",
        "train: required key is missing",
    ):
        assert expected in problems, f"{expected!r} not in:\n{problems}"


def test_config_errors_for_things_outside_the_file(tiny_model, collection, tmp_path):
    bad = tiny_config(tiny_model, collection)
    bad["teacher"]["model"] = "./no/such/model"
    bad["evaluation"]["out_of_domain"][1]["first_stage"]["path"] = str(tmp_path / "missing.run")
    bad["evaluation"]["in_domain"][0]["dataset"] = f"irds:{PREFIX}/tset"
    problems = "\n".join(_problems(bad))
    assert "teacher.model: local model" in problems and "does not exist" in problems
    assert "evaluation.out_of_domain[1].first_stage.path: run file" in problems
    assert f"evaluation.in_domain[0].dataset: ir_datasets does not know 'irds:{PREFIX}/tset'; did you mean " \
           f"'irds:{PREFIX}/test'?" in problems
    assert load_config(bad, check_environment=False)  # the schema alone is fine


def test_config_errors_come_in_one_round(tiny_model, collection, tmp_path):
    """A dataset typo or a missing file is listed with the schema's problems, not after they are fixed (issue 23,
    item 17); so are problems of a config whose parts have the wrong type."""
    bad = tiny_config(tiny_model, collection)
    bad["students"][0]["training"] = {"learning_rate": "fast"}
    bad["evaluation"]["in_domain"][0]["dataset"] = f"irds:{PREFIX}/tset"
    bad["teacher"]["model"] = "./no/such/model"
    bad["evaluation"]["out_of_domain"][1]["first_stage"]["path"] = str(tmp_path / "missing.run")
    bad["validation"] = "dev"  # not a mapping: its checks are skipped, the others still run
    problems = "\n".join(_problems(bad))
    for expected in ("students[0].training.learning_rate: expected a number, got 'fast'",
                     "validation: expected a mapping, got 'dev'",
                     f"evaluation.in_domain[0].dataset: ir_datasets does not know 'irds:{PREFIX}/tset'",
                     "teacher.model: local model", "evaluation.out_of_domain[1].first_stage.path: run file"):
        assert expected in problems, f"{expected!r} not in:\n{problems}"
    path = tmp_path / "exp.yaml"  # a relative model path is still resolved against the config's folder
    bad["teacher"]["model"] = "./model-here"
    (tmp_path / "model-here").mkdir()
    path.write_text(yaml.safe_dump(bad))
    assert "teacher.model" not in "\n".join(_problems(path))


def test_a_misspelled_model_fails_the_check_not_the_run(tiny_model, collection, tmp_path, capsys):
    """``minilm-l4`` passed --check and failed after the run started (issue 23, item 16)."""
    from pyterrier_kdcl.experiment.cli import main

    bad = tiny_config(tiny_model, collection)
    bad["students"][1]["model"] = "minilm-l4"
    problems = "\n".join(_problems(bad))
    assert "students[1].model: 'minilm-l4' is not a packaged model; did you mean 'minilm-l6' or 'minilm-l3'?" \
        in problems and "minilm-l6, mpnet-base, minilm-l3, e5-small, gemma3-270m" in problems
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["experiment", str(path), "--check"]) == 2
    assert "students[1].model: 'minilm-l4' is not a packaged model" in capsys.readouterr().err


def test_a_saved_reranker_with_settings_of_its_own_is_refused(tiny_model, collection, tmp_path):
    """A saved CrossEncoder carries its adapter, pooling and template: given beside it, lora, pooling and template
    were silently dropped (issue 23 item 3). The check refuses them, and so does the runner for a model saved after
    the check."""
    from pyterrier_kdcl.reranker import CrossEncoder

    saved = tmp_path / "saved"
    CrossEncoder(str(tiny_model("bert")), max_length=32, verbose=False).save(saved)
    cfg = tiny_config(tiny_model, collection)
    cfg["students"][1].update(model=str(saved), template="q: {query} d: {text}")  # lora: {r: 4, ...} already
    problems = "\n".join(_problems(copy.deepcopy(cfg)))
    assert "students[1].lora, students[1].template: " in problems and "is a saved kdcl CrossEncoder" in problems
    assert "drop them to continue from the saved model as it is, or set students[1].model to its base model" \
        in problems
    cfg["teacher"].update(model=str(saved), train="none", pooling="mean")
    assert any(p.startswith("teacher.pooling: ") for p in _problems(copy.deepcopy(cfg)))
    cfg["students"][1].pop("lora"), cfg["students"][1].pop("template"), cfg["teacher"].pop("pooling")
    checked = load_config(copy.deepcopy(cfg))  # the saved model as it is: fine
    checked.students[1].lora = {"r": 4}  # as if saved after the check
    with pytest.raises(ValueError, match="qwen-lora.lora: .* is a saved kdcl CrossEncoder"):
        ExperimentRunner(checked, tmp_path / "out", verbose=False).new_reranker(checked.students[1], seed=1)


def test_config_file_paths_are_relative_to_the_file(tiny_model, collection, tmp_path):
    cfg = tiny_config(tiny_model, collection)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ood.run").write_text((collection / "ood.run").read_text())
    cfg["evaluation"]["out_of_domain"][1]["first_stage"]["path"] = "runs/ood.run"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert loaded.evaluation.out_of_domain[1].first_stage.path == str(tmp_path / "runs" / "ood.run")
    assert loaded.source == str(path)
    path.write_text(yaml.safe_dump({**cfg, "teacher_cache": "../other/teacher-scores"}))
    assert load_config(path).teacher_cache == str(tmp_path.parent / "other" / "teacher-scores")
    path.write_text("name: x\n  bad: [indent")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path)


def test_toml_configs_load_too(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(f"""
name = "toml"
seeds = [1, 2]
[train]
dataset = "irds:{PREFIX}/train"
[teacher]
model = "minilm-l6"
[[students]]
name = "small"
model = "minilm-l3"
[students.training]
learning_rate = 5e-5
[evaluation]
in_domain = [{{dataset = "irds:{PREFIX}/test", depth = 5}}]
""")
    cfg = load_config(path, check_environment=False)
    assert cfg.seeds == [1, 2] and cfg.training_args(cfg.students[0])["learning_rate"] == 5e-5


def test_yaml_numbers_with_an_exponent_are_numbers(tmp_path):
    """YAML 1.1 reads ``1e-4`` as text; a config means the number (issue 23, item 15)."""
    path = tmp_path / "exp.yaml"
    path.write_text(f"""
name: exponents
train: {{dataset: "irds:{PREFIX}/train"}}
training: {{learning_rate: 1e-4, teacher_temperature: 2e0, student_temperature: 1.0e0}}
teacher: {{model: minilm-l6}}
students:
  - {{name: small, model: minilm-l3, training: {{learning_rate: "3e-5", head_learning_rate: 1E-2}}}}
evaluation: {{in_domain: [{{dataset: "irds:{PREFIX}/test", depth: 5}}], alpha: 5e-2}}
""")
    cfg = load_config(path, check_environment=False)
    args = cfg.training_args(cfg.students[0])
    assert args["learning_rate"] == 3e-5 and isinstance(args["learning_rate"], float)  # quoted: a float field
    assert args["head_learning_rate"] == 1e-2 and args["teacher_temperature"] == 2.0
    assert cfg.training.learning_rate == 1e-4 and cfg.training.student_temperature == 1.0
    assert cfg.evaluation.alpha == 0.05 and cfg.name == "exponents" and cfg.seeds == [42]
    path.write_text(path.read_text().replace('"3e-5"', '"fast"'))
    assert "students[0].training.learning_rate: expected a number, got 'fast'" in _problems(
        path, check_environment=False)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
def test_shipped_configs_parse_and_validate(name):
    path = EXPERIMENTS / f"{name}.yaml"
    cfg = load_config(path, check_environment=False)
    assert cfg.students and (cfg.evaluation.in_domain or cfg.evaluation.out_of_domain)
    # every student is trained both ways, or extends one that is (an unjudged-queries student: KD only); or the
    # config compares training recipes (cpu-recipes: contrastive only, every student)
    both_ways = all({"CL", "KD"} <= set(s.objectives) or (s.base and s.unjudged) for s in cfg.students)
    assert both_ways or all(s.objectives == ["CL"] for s in cfg.students)
    try:
        load_config(path)
    except ConfigError as err:  # only collections not built on this machine may be missing
        assert all("is not built" in p for p in err.problems), err.problems


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "paper"))
def test_every_shipped_cpu_config_has_its_run_in_the_repository(name):
    """A shipped config that has never run is not done: its report, tables and the config as run are committed."""
    results = EXPERIMENTS.parent / "docs" / "results" / name
    assert (results / "report.md").is_file() and (results / "config.json").is_file(), f"run {name} and commit it"
    assert any((results / "tables").glob("*.csv")), name


@pytest.mark.parametrize("run", sorted(p.name for p in (EXPERIMENTS.parent / "docs" / "results").iterdir()
                                       if (p / "report.md").is_file()))
def test_every_committed_report_has_its_evidence_or_is_withdrawn(run):
    """A report whose per-query values are not committed cannot be rechecked: it is listed as withdrawn in the
    results index, carries the banner, and the README quotes no number of it (its findings section is gone)."""
    results = EXPERIMENTS.parent / "docs" / "results"
    if (results / run / "perquery.csv.gz").is_file():
        return  # make test's `kdcl verify` checks it reproduces
    index = (results / "README.md").read_text(encoding="utf-8")
    withdrawn = index[index.index("## Withdrawn until rerun"):]
    assert f"[{run}]({run}/README.md)" in withdrawn, f"{run}: commit its perquery.csv.gz or list it as withdrawn"
    assert "Withdrawn on" in (results / run / "README.md").read_text(encoding="utf-8")
    readme = (EXPERIMENTS.parent / "README.md").read_text(encoding="utf-8")
    assert f"experiments/{run}.yaml`)" not in readme, f"the README still has a results section for {run}"


def test_check_prints_the_plan_and_trains_nothing(tiny_model, collection, tmp_path, capsys):
    from pyterrier_kdcl.experiment.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model, collection)))
    assert main(["experiment", str(path), "--check", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "train teacher" in text and "evaluate on ood-run" in text and "5 queries × 4 candidates" in text
    assert not (tmp_path / "out").exists()
    path.write_text(yaml.safe_dump({**tiny_config(tiny_model, collection), "sedes": [1]}))
    assert main(["experiment", str(path)]) == 2
    assert "sedes: unknown key; did you mean 'seeds'?" in capsys.readouterr().err


def test_plan_of_the_quick_config_fits_its_budget():
    from pyterrier_kdcl.experiment.plan import plan

    text = plan(load_config(EXPERIMENTS / "quick.yaml", check_environment=False))
    minutes = float(text.rsplit("about ", 1)[1].split(" CPU minutes")[0])
    assert minutes <= 17, text  # 20 minutes on the 2-core CPU, with room for loading and first stages


def test_plan_counts_bf16_speeds_only_where_the_cpu_has_native_bf16(monkeypatch):
    import pyterrier_kdcl.fast
    from pyterrier_kdcl.experiment.plan import plan

    config = load_config(EXPERIMENTS / "cpu-architectures.yaml", check_environment=False)  # precision: bf16

    def minutes(native: bool) -> tuple[float, str]:
        monkeypatch.setattr(pyterrier_kdcl.fast, "native_bfloat16", lambda: native)
        text = plan(config)
        return float(text.rsplit("about ", 1)[1].split(" CPU minutes")[0]), text

    native, text = minutes(True)
    emulated, other = minutes(False)
    assert native < 0.6 * emulated  # MPNet trains 2.6x and scores 2.9x faster in bf16 (docs/results/cpu-architectures)
    assert "bf16 where a config asks for it, and for training at precision auto;" in text
    assert "no native bf16 here" in other
    mpnet = next(line for line in text.splitlines() if "mpnet-lora (mpnet-base, CL)" in line)
    # per seed: 1,600 training pairs at 4.9 pairs/s + 2 validations of 400 pairs at 20 pairs/s, in minutes
    seeds = len(config.seeds)
    assert float(mpnet.split()[1]) == pytest.approx(seeds * (1600 / 4.9 + 800 / 20.0) / 60, abs=0.05)


@pytest.mark.parametrize("name", sorted(p.stem for p in (EXPERIMENTS / "planned").glob("*.yaml")))
def test_planned_configs_parse_and_validate(name):
    cfg = load_config(EXPERIMENTS / "planned" / f"{name}.yaml", check_environment=False)
    assert cfg.students and (cfg.evaluation.in_domain or cfg.evaluation.out_of_domain)


def test_plan_of_the_decoder_study_counts_the_shared_teacher_scores():
    from pyterrier_kdcl.experiment.plan import plan

    config = load_config(EXPERIMENTS / "cpu-decoder.yaml", check_environment=False)
    assert config.teacher_cache == str(EXPERIMENTS.parent / "runs" / "cpu-architectures" / "teacher-scores")
    text = plan(config)
    scores = next(line for line in text.splitlines() if line.split()[2:4] == ["teacher", "scores"])
    assert f"read first from teacher_cache {config.teacher_cache}" in scores
    assert f"of which {float(scores.split()[1]):.1f} score teacher pairs" in text
    assert "in domain" in text and "MDE" in text  # the seed-aware MDE of the smaller evaluation sample
    config.teacher_cache = None  # the default: <out>/teacher-scores, nothing to say
    assert "teacher_cache" not in plan(config)


def test_plan_says_early_stopping_makes_it_an_upper_bound():
    from pyterrier_kdcl.experiment.plan import plan

    config = load_config(EXPERIMENTS / "cpu-recipes.yaml", check_environment=False)  # patience: 3
    text = plan(config)
    assert text.count("at most: patience 3") == len(config.students)  # the students' rows; the total says so too
    assert "at most" not in plan(load_config(EXPERIMENTS / "quick.yaml", check_environment=False))


def test_runner_steps_can_run_alone(finished_run, tiny_model, collection):
    cfg, out, _ = finished_run
    runner = ExperimentRunner(load_config(copy.deepcopy(cfg)), out, verbose=False)
    teacher = runner.teacher()
    assert teacher.reused and teacher.log is not None and {"step", "loss", "metric"} <= set(teacher.log.columns)


def test_python_dash_m_runs_the_cli(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pyterrier_kdcl", "experiment", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr


# -- one writer per output directory ---------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from pyterrier_kdcl.directory_lock import directory_lock
with directory_lock(sys.argv[1]):
    print("ACQUIRED", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def other_run():
    """``other_run(path)``: another process holding ``path``'s lock (killed at the end of the test)."""
    import subprocess
    import sys

    started = []

    def hold(path: Path, seconds: float = 300.0):
        process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], text=True,
                                   stdout=subprocess.PIPE, cwd=EXPERIMENTS.parent)
        started.append(process)
        assert process.stdout.readline().startswith("ACQUIRED")
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait(timeout=30)


def test_a_second_run_refuses_before_touching_the_first_runs_files(tiny_model, collection, tmp_path, other_run):
    """The case of issue 16: the second run cleaned the first one's in-progress checkpoint as a killed run's."""
    from pyterrier_kdcl.directory_lock import DirectoryLocked

    in_progress = tmp_path / "teacher" / "checkpoints" / ".tmp-abc" / "weights.safetensors"
    in_progress.parent.mkdir(parents=True)
    in_progress.write_bytes(b"being written")
    (tmp_path / "teacher" / "stage.json").write_text(json.dumps({"fingerprint": "other settings"}))
    run_file = tmp_path / "runs" / "tiny-test" / "BM25.res.gz"
    run_file.parent.mkdir(parents=True)
    run_file.write_bytes(b"half a run file")
    first = other_run(tmp_path)
    cfg = tiny_config(tiny_model, collection)
    with pytest.raises(DirectoryLocked, match=rf"pid {first.pid} on host .* --out DIR.*wait_for_lock: true"):
        run_experiment(copy.deepcopy(cfg), tmp_path, verbose=False)
    runner = ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path, verbose=False)
    with pytest.raises(DirectoryLocked):
        runner.teacher()  # a step run alone takes the lock too
    with pytest.raises(DirectoryLocked):
        runner.evaluate_collection("tiny-test", runner.config.evaluation.in_domain[0], True, [])
    assert in_progress.read_bytes() == b"being written" and run_file.read_bytes() == b"half a run file"
    assert not (tmp_path / "config.json").exists()


def test_wait_comes_from_the_cli_or_the_config(tiny_model, collection, tmp_path, monkeypatch):
    from pyterrier_kdcl.experiment import cli

    cfg = tiny_config(tiny_model, collection)
    assert ExperimentRunner(load_config(copy.deepcopy(cfg)), tmp_path).wait is False
    assert ExperimentRunner(load_config({**copy.deepcopy(cfg), "wait_for_lock": True}), tmp_path).wait is True
    assert ExperimentRunner(load_config({**copy.deepcopy(cfg), "wait_for_lock": True}), tmp_path, wait=False).wait \
        is False
    seen = []

    class Runner:
        def __init__(self, config, out, *, verbose, wait):
            seen.append(wait)

        def run(self):
            return None

    monkeypatch.setattr(experiment_module, "ExperimentRunner", Runner)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["experiment", str(path), "--quiet", "--wait"]) == 0
    assert cli.main(["experiment", str(path), "--quiet"]) == 0
    assert seen == [True, None]  # None: the config's wait_for_lock decides

