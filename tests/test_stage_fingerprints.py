"""Stage identities are values (experiment/stages.py): a property test over every field of every stage spec.

Each field of each spec, nested config sections included, is changed in turn to another valid value; the
fingerprint must change exactly when the field is declared to matter (not ``not_affecting``, and for a training
stage not a setting ``only_for`` the other objective). A field added later changes identity unless declared.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

import pytest
from pydantic import BaseModel, create_model

from pyterrier_kdcl.experiment.identity import affects_results, not_affecting
from pyterrier_kdcl.experiment.schema import TRAINING_DEFAULTS, Data, FusionMember, Student, Teacher, Training
from pyterrier_kdcl.experiment.stages import (
    SPECS,
    EvaluationSpec,
    FirstStageMemberSpec,
    FusedTeacherSpec,
    FusionFitSpec,
    StudentSpec,
    TeacherSpec,
    TemperatureFitSpec,
)

TRAIN = Data(dataset="irds:kdcl/manpages/train", depth=20, queries=100)
VALIDATION = Data(dataset="irds:kdcl/manpages/dev", depth=20)
TEST_HALF = Data(dataset="irds:kdcl/faq/python", split="test")
TRAINING = Training.model_validate(TRAINING_DEFAULTS)
TEACHER = Teacher(model="minilm-l6", max_length=128)
STUDENT = Student(name="small", model="minilm-l3", objectives=["KD"], base="plain",
                  unjudged=[Data(dataset="irds:kdcl/faq/python", split="adaptation", exclude_test_documents="judged")])
FUSED = Teacher(kind="fusion", members=[FusionMember(name="bm25", kind="first-stage"),
                                        FusionMember(name="cross", model="minilm-l6")])
EXAMPLES = {
    "trained teacher": TeacherSpec(teacher=TEACHER, training=TRAINING, data=TRAIN, validation=VALIDATION,
                                   sample_seed=0, seed=42),
    "given teacher": TeacherSpec(teacher=Teacher(model="/models/teacher", train="none"),
                                 files=[("model.safetensors", 10, 20)]),
    "first-stage member": FirstStageMemberSpec(data=[TRAIN]),
    "fusion fit": FusionFitSpec(teacher=FUSED, members={"bm25": "a" * 16, "cross": "b" * 16}, metric="nDCG@10",
                                data=VALIDATION, on_validation=True, sample_seed=0),
    "fused teacher": FusedTeacherSpec(members={"bm25": "a" * 16}, weights={"bm25": 1.0}, stats={"bm25": [0.0, 1.0]}),
    "temperature fit": TemperatureFitSpec(teacher="c" * 16, validation=VALIDATION, sample_seed=0),
    "CL student": StudentSpec(student=STUDENT, objective="CL", training=TRAINING, train=TRAIN, validation=VALIDATION,
                              sample_seed=0, seed=1),
    "KD student": StudentSpec(student=STUDENT, objective="KD", training=TRAINING, train=TRAIN, validation=None,
                              sample_seed=0, seed=1, teacher="d" * 16, test_halves=[TEST_HALF]),
    "evaluation": EvaluationSpec(data=TEST_HALF, sample_seed=0, reranker="e" * 16, fast=False),
}

# another valid value for a field whose value is None or an empty list (by field name)
OTHERS: dict[str, Any] = {
    "name": "label", "queries": 10, "index": "other/index", "path": "/runs/other.run", "query_field": "title",
    "qrels_variant": "graded", "head_learning_rate": 1e-3, "validate_every": 5, "patience": 2, "checkpoint_every": 5,
    "negatives_window": [0, 10], "report_to": "tensorboard", "negative_filter": {"margin": 0.5}, "lora": True,
    "template": "q: {query} d: {text}", "seed": 3, "sample_seed": 1, "weights": {"bm25": 1.0}, "teacher": "f" * 16,
    "reranker": "f" * 16, "files": [("config.json", 1, 2)], "data": {"dataset": "irds:kdcl/manpages/train"},
    "validation": {"dataset": "irds:kdcl/manpages/dev"}, "training": TRAINING_DEFAULTS,
    "unjudged": [{"dataset": "irds:kdcl/faq/debian"}], "test_halves": [{"dataset": "irds:kdcl/faq/debian"}],
    "members": [{"name": "extra", "model": "minilm-l6"}],
}


def _literal_options(annotation) -> list:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return list(args)
    if origin in (Annotated, Union, types.UnionType):
        return [o for a in args for o in _literal_options(a)]
    return []


def other_value(name: str, value: Any, annotation) -> Any:
    """Another valid value for a field (a different one)."""
    options = [o for o in _literal_options(annotation) if o != value]
    if value is None or (isinstance(value, list) and not value):
        if options:
            return options[0]
        assert name in OTHERS, f"add another valid value for {name!r} to OTHERS"
        return OTHERS[name]
    if isinstance(value, bool):
        return not value
    if options and isinstance(value, str):
        return options[0]
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "extra": next(iter(value.values()))}
    if isinstance(value, (list, tuple)):
        return list(reversed(value)) if len(value) > 1 and value[0] != value[-1] else [*value, *value]
    raise AssertionError(f"no other value for {name!r} = {value!r}")


def leaves(model: BaseModel, path: tuple = (), infos: tuple = ()):
    """(path, value, annotation, the FieldInfos along the path) of every field, nested sections walked into (the
    first item of a list of sections)."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        here, along = (*path, name), (*infos, info)
        if isinstance(value, BaseModel):
            yield from leaves(value, here, along)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            yield from leaves(value[0], (*here, 0), along)
        else:
            yield here, name, value, info.annotation, along


def changed(spec, path: tuple, value):
    data = spec.model_dump()
    inner = data
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return type(spec).model_validate(data)


def value_at(model, path: tuple):
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def test_every_spec_has_examples():
    assert {type(spec) for spec in EXAMPLES.values()} == set(SPECS)


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_the_fingerprint_changes_exactly_when_a_field_that_matters_changes(example):
    spec = EXAMPLES[example]
    before = spec.fingerprint()
    assert type(spec).model_validate(spec.model_dump()).fingerprint() == before  # a value: rebuilt, the same
    objective = spec.trained_with()
    checked = 0
    for path, name, value, annotation, infos in leaves(spec):
        new = changed(spec, path, other_value(name, value, annotation))
        assert value_at(new, path) != value, path  # the change took
        matters = all(affects_results(info, objective) for info in infos)
        assert (new.fingerprint() != before) == matters, \
            f"{example}: {'.'.join(map(str, path))} {'is' if matters else 'is not'} declared to matter"
        checked += 1
    assert checked >= len(type(spec).model_fields)


def test_the_declarations_are_where_they_should_be():
    """Spot checks of what the property test relies on: these fields are declared, the rest matter."""
    declared = {(cls.__name__, name) for cls in (Data, Teacher, Student, Training)
                for name, info in cls.model_fields.items() if not affects_results(info)}
    assert {("Data", "name"), ("Student", "batch_size"), ("Student", "objectives"), ("Student", "base"),
            ("Training", "report_to")} <= declared
    assert ("Training", "learning_rate") not in declared and ("Data", "queries") not in declared
    assert not affects_results(Training.model_fields["teacher_temperature"], "CL")
    assert not affects_results(Training.model_fields["temperature"], "KD")


@pytest.mark.parametrize("example", ["KD student", "trained teacher", "evaluation"])
def test_a_new_field_changes_identity_unless_it_is_declared(example):
    spec = EXAMPLES[example]
    cls = type(spec)
    added = create_model(cls.__name__, __base__=cls, new_setting=(int, 0))
    declared = create_model(cls.__name__, __base__=cls, new_setting=(int, not_affecting(0, "a test's field")))
    assert added(**dict(spec)).fingerprint() != spec.fingerprint()
    assert declared(**dict(spec)).fingerprint() == spec.fingerprint()
    # a field added to a config section the spec holds (the data a stage reads) is caught the same way
    data_plus = create_model("Data", __base__=Data, shards=(int, 1))
    data_declared = create_model("Data", __base__=Data, shards=(int, not_affecting(1, "a test's field")))
    key = next(name for name in ("train", "data") if name in cls.model_fields)
    base = getattr(spec, key)
    assert cls(**{**dict(spec), key: data_plus(**dict(base))}).fingerprint() != spec.fingerprint()
    assert cls(**{**dict(spec), key: data_declared(**dict(base))}).fingerprint() == spec.fingerprint()


def test_not_affecting_asks_why():
    with pytest.raises(ValueError, match="say why"):
        not_affecting(0)
