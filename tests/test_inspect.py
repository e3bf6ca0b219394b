"""pt.inspect and pt.schematic on every transformer of the package: settings read back under their __init__ names,
reconstruction with changed settings, and drawings that never look a help page up online."""

import importlib
import inspect
import pkgutil

import pyterrier as pt
import pytest

import pyterrier_kdcl as kdcl
from pyterrier_kdcl.experiment.runner import LazyReranker
from pyterrier_kdcl.fusion import FirstStageScore, ScoreFusion
from pyterrier_kdcl.training.teachers import CheckedTeacher


@pytest.fixture(scope="module")
def reranker(tiny_model):
    return kdcl.CrossEncoder(tiny_model("bert"), verbose=False, device="cpu", max_length=32)


@pytest.fixture(scope="module")
def transformers(reranker, tiny_model):
    teacher = kdcl.CrossEncoder(tiny_model("bert", seed=1), verbose=False, device="cpu")
    int8 = kdcl.optimize_for_cpu(kdcl.CrossEncoder(tiny_model("bert"), verbose=False, device="cpu"), "int8")
    sharded = kdcl.ShardedScorer(reranker, workers=1, batch_size=8)  # workers start at the first non-empty frame
    made = {
        "CrossEncoder": reranker,
        "CrossEncoder (int8)": int8,
        "RerankerTrainer": kdcl.RerankerTrainer(reranker, kdcl.losses.ListNet(), group_size=4, verbose=False),
        "ContrastiveTrainer": kdcl.ContrastiveTrainer(reranker, temperature=0.5, group_size=4, verbose=False),
        "DistillationTrainer": kdcl.DistillationTrainer(reranker, teacher, teacher_temperature=3.0, verbose=False),
        "ShardedScorer": sharded,
        "CheckedTeacher": CheckedTeacher(teacher),
        "LazyReranker": LazyReranker("teacher", lambda: teacher),
        "ScoreFusion": ScoreFusion({"a": reranker, "b": teacher}),
        "FirstStageScore": FirstStageScore(),
    }
    yield made
    sharded.close()


def test_every_transformer_of_the_package_is_covered(transformers):
    defined = set()
    for info in pkgutil.walk_packages(kdcl.__path__, "pyterrier_kdcl."):
        if info.name.endswith("__main__"):
            continue  # running it is its import
        module = importlib.import_module(info.name)
        defined |= {obj for _, obj in inspect.getmembers(module, inspect.isclass)
                    if issubclass(obj, pt.Transformer) and obj.__module__ == info.name}
    assert defined == {type(t) for t in transformers.values()}


@pytest.mark.parametrize("name", ["CrossEncoder", "CrossEncoder (int8)", "RerankerTrainer", "ContrastiveTrainer",
                                  "DistillationTrainer", "ShardedScorer", "CheckedTeacher", "LazyReranker",
                                  "ScoreFusion", "FirstStageScore"])
def test_attributes_read_back_under_their_init_names_and_schematics_stay_offline(name, transformers, monkeypatch):
    transformer = transformers[name]
    attributes = pt.inspect.transformer_attributes(transformer)  # strict: raises on an argument it cannot find
    parameters = [p for p in inspect.signature(type(transformer).__init__).parameters if not p.startswith("_")][1:]
    assert [a.name for a in attributes] == parameters

    def online(*args):
        raise AssertionError("the schematic looked its help page up online")

    monkeypatch.setattr(pt.documentation, "url_for_class", online)
    schematic = pt.schematic.transformer_schematic(transformer)
    assert schematic["label"] == name and schematic["help_url"]
    assert schematic["settings"] or pt.inspect.subtransformers(transformer) or not parameters  # FirstStageScore
    assert "<div" in pt.schematic.draw(transformer)


def test_attributes_rebuild_rerankers_and_trainers(transformers, reranker):
    rebuilt = pt.inspect.transformer_apply_attributes(reranker, batch_size=8)
    assert isinstance(rebuilt, kdcl.CrossEncoder) and rebuilt is not reranker
    assert (rebuilt.batch_size, rebuilt.max_length, rebuilt.pooling) == (8, 32, reranker.pooling)

    cl = pt.inspect.transformer_apply_attributes(transformers["ContrastiveTrainer"], temperature=2.0)
    assert (cl.loss.temperature, cl.group_size, cl.reranker) == (2.0, 4, reranker)
    kd = transformers["DistillationTrainer"]
    assert set(pt.inspect.subtransformers(kd)) == {"reranker", "teacher"}
    kd2 = pt.inspect.transformer_apply_attributes(kd, student_temperature=2.0)
    assert (kd2.loss.teacher_temperature, kd2.loss.student_temperature, kd2.teacher) == (3.0, 2.0, kd.teacher)
    base = pt.inspect.transformer_apply_attributes(transformers["RerankerTrainer"], epochs=2)
    assert (base.epochs, base.group_size, base.sampler_options["group_size"]) == (2, 4, 4)
