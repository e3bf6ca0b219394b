"""The KD-vs-CL experiment's config file: its schema, defaults and validation.

A config is YAML (or TOML, or an already-parsed dict). :func:`load_config` checks it completely before anything
is trained: unknown keys, wrong types, impossible values, dataset ids that ir_datasets does not know, kdcl
collections that are not built, and local paths that do not exist. Every error names the key path, for example
``students[1].training.learning_rate: expected a number, got 'fast'``. All problems are reported at once.

Relative paths inside a config are relative to the config file. See ``docs/experiment.md`` for every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

OBJECTIVES = ("CL", "KD")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # names become file names and table labels
RESERVED_NAMES = {"BM25", "teacher"}

# Trainer settings: the defaults of every training run, overridden by the config's top-level ``training``
# section and then by a model's own ``training`` section. Types are checked like any other key.
TRAINING_DEFAULTS: dict[str, Any] = {
    "group_size": 8,               # 1 positive + 7 hard negatives (Tevatron's default)
    "epochs": 1,
    "batch_size": 4,               # queries (groups) per optimizer step
    "learning_rate": 1e-4,         # suits a fresh scoring head (OFFLINE.md: 3e-5 left the loss at ln 8)
    "head_learning_rate": None,    # the scoring head's own rate; None = learning_rate
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "gradient_accumulation_steps": 1,
    "validate_every": None,        # steps; None = once per epoch
    "metric": "nDCG@10",           # validation metric that picks the best checkpoint
    "patience": None,
    "min_label": 1,
    "negatives_window": None,      # [first, last) candidate ranks negatives are drawn from; None = all
    "insufficient": "skip",        # a query with too few negatives: "skip" it or "replace" (draw with replacement)
    "precision": "auto",
    "gradient_checkpointing": False,
    "checkpoint_every": None,      # steps between checkpoints; None = at each validation
    "temperature": 1.0,            # contrastive (InfoNCE) temperature
    "teacher_temperature": 2.0,    # distillation: Tevatron's reranker KD recipe
    "student_temperature": 1.0,
    "report_to": None,             # tracking: tensorboard, wandb, mlflow, a list of them, or none (NOT_FINGERPRINTED)
    "negative_filter": None,       # students: {margin, action}, negatives the teacher scores >= positive - margin
}
# Training settings that change nothing a run computes: no stage fingerprint holds them (runner.py), so switching
# them on or off reuses every finished stage.
NOT_FINGERPRINTED = frozenset({"report_to"})
_TRACKER = Literal["tensorboard", "wandb", "mlflow"]
_TRAINING_TYPES: dict[str, Any] = {
    "group_size": int, "epochs": int, "batch_size": int, "learning_rate": float,
    "head_learning_rate": float | None, "warmup_ratio": float,
    "weight_decay": float, "max_grad_norm": float | None, "gradient_accumulation_steps": int,
    "validate_every": int | None, "metric": str, "patience": int | None, "min_label": int,
    "negatives_window": list[int] | None, "insufficient": Literal["skip", "replace"],
    "precision": Literal["auto", "fp32", "bf16", "fp16"], "gradient_checkpointing": bool,
    "checkpoint_every": int | None, "temperature": float,
    "teacher_temperature": float | Literal["auto"], "student_temperature": float,
    "report_to": _TRACKER | Literal["none"] | list[_TRACKER] | None,
    "negative_filter": dict | None,
}
NEGATIVE_FILTER_KEYS = {"margin": 0.0, "action": "drop"}  # a negative_filter's keys, at their defaults


class ConfigError(ValueError):
    """The config is invalid; ``problems`` lists every ``key.path: what is wrong`` found."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(f"{len(problems)} problem(s){where}:\n" + "\n".join(f"  - {p}" for p in problems))


# -- the schema ------------------------------------------------------------------------------------------------
@dataclass
class FirstStage:
    """Where candidates come from: ``bm25`` (PISA over ``index``, default the dataset's own documents),
    ``scoreddocs`` (the dataset's own run, e.g. MS MARCO's BM25 top 1000) or ``run`` (a TREC run file)."""

    kind: Literal["bm25", "scoreddocs", "run"] = "bm25"
    index: str | None = None
    path: str | None = None


@dataclass
class Data:
    """Topics, qrels and candidates of one collection (for training, validation or evaluation)."""

    dataset: str                                # "irds:<ir_datasets id>"
    name: str | None = None                     # label in tables and file names (default: from the id)
    queries: int | None = None                  # sample this many judged queries (seeded); None = all
    depth: int = 100                            # first-stage candidates per query
    first_stage: FirstStage = field(default_factory=FirstStage)
    text: str | list[str] = "text"              # document field(s) the rerankers read (joined by a space)
    query_field: str | None = None              # topics variant for datasets with several query fields
    qrels_variant: str | None = None
    split: Literal["adaptation", "test"] | None = None  # one half of the queries by a stable hash (see below)
    # a student's unjudged adaptation half only: drop the evaluated test half's documents from its candidates
    exclude_test_documents: Literal["judged", "candidates"] | None = None


@dataclass
class Model:
    """A reranker: a packaged short name (``minilm-l6``), a hub id, a local model dir or a saved CrossEncoder."""

    name: str
    model: str
    lora: bool | dict | None = None
    max_length: int = 256
    batch_size: int = 32                        # pairs per forward pass at inference
    template: str | None = None
    pooling: Literal["classifier", "last", "mean"] | None = None
    dtype: str | None = None
    training: dict = field(default_factory=dict)  # overrides of the top-level training settings


@dataclass
class Teacher(Model):
    name: str = "teacher"
    model: str = ""
    train: Literal["contrastive", "none"] = "contrastive"  # "none": use ``model`` as it is (already trained)
    # bi-encoder: sentence-transformers, as it is; fusion: a weighted sum of its members' standardised scores
    kind: Literal["cross-encoder", "bi-encoder", "fusion"] = "cross-encoder"
    disjoint: bool = False                      # train on ``data`` minus the students' training queries (a control)
    seed: int | None = None                     # default: the first of ``seeds``
    data: Data | None = None                    # its own training data (default: the experiment's ``train``)
    members: list[FusionMember] = field(default_factory=list)  # kind: fusion
    weights: dict | None = None                 # kind: fusion: member name -> weight (default: fitted on validation)
    grid_step: float = 0.1                      # kind: fusion: spacing of the weight grid that is searched


FUSION_KEYS = {"members": [], "weights": None, "grid_step": 0.1}  # a fused teacher's keys, at their defaults


@dataclass
class FusionMember(Teacher):
    """A member of a fused teacher: a teacher of its own (trained or given), or the first stage's own score."""

    name: str | None = None                     # required: keys the member's weight
    kind: Literal["cross-encoder", "bi-encoder", "first-stage"] = "cross-encoder"


@dataclass
class Student(Model):
    objectives: list[Literal["CL", "KD"]] = field(default_factory=lambda: list(OBJECTIVES))
    unjudged: list[Data] = field(default_factory=list)  # more training queries, used without their qrels (KD only)
    base: str | None = None                     # the student this one extends: reports compare with its CL and KD


def data_settings(data: Data | None) -> dict | None:
    """``data`` as the dict that fingerprints it; keys that came later are left out at their defaults, so the
    work of earlier configs keeps its fingerprint."""
    if data is None:
        return None
    settings = dataclasses.asdict(data)
    for key in ("split", "exclude_test_documents"):
        if settings.get(key) is None:
            settings.pop(key, None)
    return settings


@dataclass
class Evaluation:
    in_domain: list[Data]
    out_of_domain: list[Data] = field(default_factory=list)
    measures: list[str] = field(default_factory=lambda: ["nDCG@10", "RR@10", "R@10"])
    main_measure: str = "nDCG@10"               # the measure of the summary table, KD−CL tests and verdict
    baseline: str = "BM25"                      # "BM25", "teacher" or "<student>-<objective>"
    test: Literal["t", "wilcoxon"] = "t"
    correction: str | None = "holm"
    alpha: float = 0.05
    fast: bool = False                          # rerank with optimize_for_cpu (bf16); only models shown equivalent


@dataclass
class ExperimentConfig:
    name: str
    train: Data
    teacher: Teacher
    students: list[Student]
    evaluation: Evaluation
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [42])
    validation: Data | None = None
    training: dict = field(default_factory=dict)
    device: str | None = None
    sample_seed: int = 0                        # which queries are sampled: fixed across seeds and systems
    wait_for_lock: bool = False                 # another run writes to the output directory: wait (else refuse)
    teacher_cache: str | None = None            # teacher-score cache directory; None: <out>/teacher-scores. Not
                                                # fingerprinted: scores are keyed by teacher and pair, not by place
    source: str | None = None                   # the file it was read from (set by load_config)

    def training_args(self, model: Model) -> dict:
        """The trainer settings of ``model``: defaults < top-level ``training`` < the model's ``training``."""
        return {**TRAINING_DEFAULTS, **self.training, **model.training}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- reading ---------------------------------------------------------------------------------------------------
def load_config(config: str | os.PathLike | dict, *, check_environment: bool = True) -> ExperimentConfig:
    """Reads and validates a config file (``.yaml``/``.yml``/``.toml``) or dict; raises :class:`ConfigError`.

    ``check_environment`` also checks what lies outside the file: dataset ids, built collections, local paths.

    >>> cfg = load_config("experiments/quick.yaml")  # doctest: +SKIP
    >>> cfg.students[0].objectives
    ['CL', 'KD']
    """
    base, source = Path.cwd(), None
    if isinstance(config, dict):
        data = config
    else:
        path = Path(config)
        if not path.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist"])
        source, base = str(path), path.resolve().parent
        data = _parse(path)
    problems: list[str] = []
    cfg = _build(ExperimentConfig, data, "", problems)
    if cfg is not None:
        cfg.source = source
        _check_semantics(cfg, problems)
        _resolve_paths(cfg, base)  # both also run on a config with problems: one run lists every problem
        if check_environment:
            _check_environment(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _parse(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = _yaml_load(text)
    except Exception as e:  # a parser's own message says where the syntax is wrong
        raise ConfigError([f"cannot parse: {e}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of keys to values"], str(path))
    return data


# YAML 1.1 (PyYAML) reads an exponent without a dot or without a sign (``1e-4``, ``1.0e4``) as text; YAML 1.2 and
# TOML read it as the number a user means. Added for plain (unquoted) scalars only, after YAML 1.1's own rules.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_NUMBER_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _yaml_load(text: str):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader: no Python objects are built)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _build(cls, data, path: str, problems: list[str]):
    """``data`` (a dict) → an instance of dataclass ``cls``, appending ``key.path: problem`` strings."""
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {_show(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{_join(path, key)}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name in data:
            values[name] = _check(hints[name], data[name], key_path, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key_path}: required key is missing")
            values[name] = None  # reported; the rest is still checked, so one run lists every problem
    return cls(**values)


def _check(tp, value, path: str, problems: list[str]):
    """``value`` checked against type ``tp`` (and converted where harmless: int → float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # the first option that accepts the value without a problem
            trial: list[str] = []
            result = _check(option, value, path, trial)
            if not trial:
                return result
        if len(options) == 1:
            return _check(options[0], value, path, problems)
        problems.append(f"{path}: expected {_describe(tp)}, got {_show(value)}")
        return None
    if origin is Literal:
        if value not in args:
            problems.append(f"{path}: expected one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_show(value)}")
            return []
        return [_check(args[0], v, _join(path, i), problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_show(value)}")
            return {}
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):  # "1e-4" from a dict or a quoted value
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_show(value)}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_show(value)}")
        return value
    if tp in (str, bool) and not isinstance(value, tp):
        problems.append(f"{path}: expected {_describe(tp)}, got {_show(value)}")
    return value


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) < 60 else text[:57] + "..."


# -- meaning ---------------------------------------------------------------------------------------------------
def data_label(data: Data) -> str:
    """The table label of a collection: its ``name``, else the id's meaningful part (``faq/python`` → ``python``)."""
    if data.name:
        return data.name
    parts = data.dataset.removeprefix("irds:").split("/")
    parts = [p for p in parts if p not in ("kdcl", "faq", "beir", "test", "judged", "small")] or parts
    return "-".join(parts)


def evaluation_collections(cfg: ExperimentConfig) -> list[tuple[str, Data, bool]]:
    """(label, data, in_domain) of every evaluation collection, in config order."""
    return ([(data_label(d), d, True) for d in cfg.evaluation.in_domain]
            + [(data_label(d), d, False) for d in cfg.evaluation.out_of_domain])


def evaluated_test_halves(cfg: ExperimentConfig, data: Data) -> list[Data]:
    """The evaluation collections whose documents ``data.exclude_test_documents`` keeps out of a student's unjudged
    candidates: those of the same dataset in the ``test`` half (an adaptation half's complement).

    >>> [d.name for d in evaluated_test_halves(cfg, cfg.students[2].unjudged[0])]  # doctest: +SKIP
    ['python-faq']
    """
    ev = cfg.evaluation
    return [d for d in _list(ev.in_domain) + _list(ev.out_of_domain)
            if isinstance(d, Data) and d.dataset == data.dataset and d.split == "test"]


def system_names(cfg: ExperimentConfig) -> list[str]:
    """Names a baseline may take: BM25, teacher and ``<student>-<objective>``."""
    return ["BM25", "teacher"] + [f"{s.name}-{o}" for s in cfg.students for o in s.objectives]


def _check_semantics(cfg: ExperimentConfig, problems: list[str]) -> None:
    """Checks what types cannot say, part by part.

    A part whose types were wrong can trip a check (None where a list was due): its problem is reported
    already, so the trip is ignored and the other parts are still checked.
    """
    for check in (_check_top, _check_datas, _check_models, _check_evaluation):
        before = len(problems)
        try:
            check(cfg, problems)
        except (TypeError, AttributeError, ValueError):
            if not problems:
                raise
            del problems[before:]


def _check_top(cfg: ExperimentConfig, problems: list[str]) -> None:
    _check_name("name", cfg.name, problems)
    if cfg.seeds is not None and not cfg.seeds:
        problems.append("seeds: give at least one seed")
    if cfg.seeds and len(set(map(str, cfg.seeds))) != len(cfg.seeds):
        problems.append(f"seeds: seeds repeat: {cfg.seeds}")
    _check_training("training", cfg.training, problems)


def _check_datas(cfg: ExperimentConfig, problems: list[str]) -> None:
    ev = cfg.evaluation
    datas = [("train", cfg.train), ("validation", cfg.validation)]
    datas += [("teacher.data", cfg.teacher.data)] if cfg.teacher else []
    datas += [(f"teacher.members[{i}].data", m.data) for i, m in enumerate(cfg.teacher.members or [])
              if m is not None] if cfg.teacher else []
    datas += [(f"evaluation.in_domain[{i}]", d) for i, d in enumerate(ev.in_domain or [])] if ev else []
    datas += [(f"evaluation.out_of_domain[{i}]", d) for i, d in enumerate(ev.out_of_domain or [])] if ev else []
    datas += [(f"students[{i}].unjudged[{j}]", d) for i, s in enumerate(cfg.students or []) if s is not None
              for j, d in enumerate(s.unjudged or [])]
    for path, data in datas:
        if data is not None:
            _check_data(path, data, problems)
    if ev is not None:
        if not ev.in_domain and not ev.out_of_domain:
            problems.append("evaluation: give at least one collection in in_domain or out_of_domain")
        labels = [label for label, _, _ in evaluation_collections(cfg)]
        for label in sorted({x for x in labels if labels.count(x) > 1}):
            problems.append(f"evaluation: two collections are labelled {label!r}; give them distinct 'name's")
    _check_unjudged_apart(cfg, problems)
    _check_exclude_test_documents(cfg, problems)


def _check_unjudged_apart(cfg: ExperimentConfig, problems: list[str]) -> None:
    """A student's unjudged queries are never the queries it is evaluated on: unjudged data of an evaluated dataset
    must take the other ``split`` half than its evaluation."""
    named = _named_datas(cfg)
    evaluated = [(path, d) for path, d in named if path.startswith("evaluation.")]
    for path, data in named:
        if ".unjudged[" not in path:
            continue
        for eval_path, ev in evaluated:
            if ev.dataset == data.dataset and not (data.split and ev.split and data.split != ev.split):
                problems.append(
                    f"{path}: {data.dataset!r} is evaluated too ({eval_path}), and training on its queries, even "
                    "without their qrels, adapts the student to the very queries it is tested on; give them "
                    f"complementary halves (split: adaptation in {path}, split: test in {eval_path}), or train on "
                    "another dataset")


def _check_exclude_test_documents(cfg: ExperimentConfig, problems: list[str]) -> None:
    """``exclude_test_documents`` (the inductive adaptation) belongs to a student's unjudged adaptation half whose
    dataset is evaluated on its test half: elsewhere there is no test document to keep out."""
    for path, data in _named_datas(cfg):
        if data.exclude_test_documents is None:
            continue
        key = f"{path}.exclude_test_documents"
        if ".unjudged[" not in path:
            problems.append(f"{key}: keeps the evaluated test half's documents out of a student's unjudged "
                            "adaptation queries' candidates; it belongs under students[i].unjudged, drop it here")
        elif data.split != "adaptation":
            problems.append(f"{key}: needs `split: adaptation` in {path} (and `split: test` on the evaluation of "
                            f"{data.dataset!r}): it removes the test half's documents from the adaptation half's "
                            "candidates")
        elif isinstance(cfg.evaluation, Evaluation) and not evaluated_test_halves(cfg, data):
            problems.append(f"{key}: no evaluation collection takes {data.dataset!r} with `split: test`, so there "
                            "are no test documents to exclude; evaluate its test half, or drop the key")


def _check_teacher(path: str, teacher: Teacher, problems: list[str]) -> None:
    """A teacher, or one member of a fused teacher (``path`` says which)."""
    _check_model(path, teacher, problems)
    if (teacher.training or {}).get("negative_filter") is not None:
        problems.append(f"{path}.training.negative_filter: the teacher's negatives are filtered by no one (the teacher "
                        "is what judges the students' negatives); set negative_filter in the top-level training or a "
                        "student's training: teachers train on the negatives as given")
    if teacher.kind == "first-stage":
        for key in ("model", "data", "lora", "template", "pooling"):
            if getattr(teacher, key):
                problems.append(f"{path}.{key}: a first-stage member scores with the candidates' own first-stage "
                                "score; it takes no model or training settings: drop it")
        return
    if not teacher.model:
        problems.append(f"{path}.model: required key is missing (a model to train, or with train: none a "
                        "trained reranker)")
    if teacher.disjoint and (teacher.data is None or teacher.train != "contrastive"):
        problems.append(f"{path}.disjoint: trains the teacher on {path}.data minus the students' queries; give "
                        f"{path}.data (e.g. the whole training split) and train: contrastive")
    if teacher.kind == "bi-encoder":
        if teacher.train != "none":
            problems.append(f"{path}.train: a bi-encoder teacher scores as it is (zero-shot); add `train: none`")
        for key in ("lora", "template", "pooling"):
            if getattr(teacher, key) is not None:
                problems.append(f"{path}.{key}: applies to cross-encoders only, not to a bi-encoder teacher")


def _check_fusion(cfg: ExperimentConfig, problems: list[str]) -> None:
    """``teacher.kind: fusion``: named members, weights naming them, something to fit the weights on."""
    teacher = cfg.teacher
    if teacher.kind != "fusion":
        for key, default in FUSION_KEYS.items():
            if getattr(teacher, key) != default:
                problems.append(f"teacher.{key}: only a fused teacher has {key}; add `kind: fusion` (and list the "
                                "teachers to fuse under members:), or drop it")
        return
    example = "e.g. [{name: bm25, kind: first-stage}, {name: cross, model: minilm-l6}]"
    if not teacher.members:
        problems.append(f"teacher.members: a fused teacher needs at least one member to fuse ({example})")
    for key in ("model", "data", "disjoint", "lora", "template", "pooling", "seed"):
        if getattr(teacher, key) not in (None, False, ""):
            problems.append(f"teacher.{key}: a fused teacher's models are its members': set {key} on the member "
                            "it belongs to")
    if teacher.grid_step is not None:
        from pyterrier_kdcl.fusion import grid_step_problem

        problem = grid_step_problem(teacher.grid_step)
        if problem is not None:
            problems.append(f"teacher.grid_step: {problem}")
    names = []
    for i, member in enumerate(teacher.members):
        path = f"teacher.members[{i}]"
        if member is None:
            continue
        if member.name is None:
            problems.append(f"{path}.name: required key is missing: each member needs a name, which keys its "
                            "weight (e.g. name: bm25)")
        elif member.name in names:
            problems.append(f"teacher.members: two members are named {member.name!r}; names must be unique")
        names.append(member.name)
        for key, default in FUSION_KEYS.items():
            if getattr(member, key) != default:
                problems.append(f"{path}.{key}: belongs to the fused teacher, not to a member; move it up to "
                                f"teacher.{key}")
        _check_teacher(path, member, problems)
    if teacher.weights is not None:
        unknown = [k for k in teacher.weights if k not in names]
        if unknown:
            problems.append(f"teacher.weights: {', '.join(map(repr, unknown))} not a member; the members are "
                            f"{names}")
        missing = [n for n in names if n is not None and n not in teacher.weights]
        if missing:
            problems.append(f"teacher.weights: give a weight to every member (missing: {', '.join(missing)}), or "
                            "drop weights to fit them on the validation candidates")
        values = list(teacher.weights.values())
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values) \
                or not any(v > 0 for v in values):
            problems.append(f"teacher.weights: expected non-negative numbers, at least one above 0, got "
                            f"{_show(teacher.weights)}")
    elif cfg.validation is None:
        problems.append("teacher.weights: a fused teacher's weights are fitted on the validation candidates; add a "
                        "`validation:` section, or give the weights (e.g. weights: {bm25: 0.2, cross: 0.8})")


def fusion_members(teacher: Teacher) -> list[FusionMember]:
    """The members of a fused teacher; none for any other teacher."""
    return list(teacher.members) if teacher.kind == "fusion" else []


def _check_models(cfg: ExperimentConfig, problems: list[str]) -> None:
    if cfg.teacher is not None:
        if cfg.teacher.kind == "fusion":
            _check_model("teacher", cfg.teacher, problems)
        else:
            _check_teacher("teacher", cfg.teacher, problems)
        _check_fusion(cfg, problems)
    if cfg.students is None:
        return
    if cfg.validation is None and any(cfg.training_args(s).get("teacher_temperature") == "auto"
                                      for s in cfg.students if s is not None and "KD" in s.objectives):
        problems.append("training.teacher_temperature: 'auto' is fitted on the validation candidates; add a "
                        "`validation:` section or give a number")
    if not cfg.students:
        problems.append("students: give at least one student")
    students = [(i, s) for i, s in enumerate(cfg.students) if s is not None]
    names = [s.name for _, s in students]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"students: two students are named {name!r}; names must be unique")
    for i, s in students:
        _check_model(f"students[{i}]", s, problems)
        if s.name in RESERVED_NAMES:
            problems.append(f"students[{i}].name: {s.name!r} is reserved for a baseline system")
        if not s.objectives:
            problems.append(f"students[{i}].objectives: give at least one of {', '.join(OBJECTIVES)}")
        if len(set(s.objectives)) != len(s.objectives):
            problems.append(f"students[{i}].objectives: objectives repeat: {s.objectives}")
        if s.unjudged and "CL" in s.objectives:
            problems.append(f"students[{i}].unjudged: contrastive learning needs a judged positive in every group, "
                            "so unjudged queries train KD only: give this student `objectives: [KD]` and keep its "
                            "CL run in another student (name that one as `base:`)")
        if s.base is not None:
            base = next((b for _, b in students if b.name == s.base), None)
            if base is None or base is s:
                problems.append(f"students[{i}].base: {s.base!r} is not another student; name one of "
                                f"{[b.name for _, b in students if b is not s]}")
            elif base.unjudged:
                problems.append(f"students[{i}].base: {s.base!r} trains on unjudged queries itself; the base is the "
                                "student trained on the judged queries alone")


def _check_evaluation(cfg: ExperimentConfig, problems: list[str]) -> None:
    ev = cfg.evaluation
    if ev is None:
        return
    measures = []
    for i, m in enumerate(ev.measures):
        parsed = _parse_measure(m, f"evaluation.measures[{i}]", problems)
        if parsed is not None:
            measures.append(parsed)
    main = _parse_measure(ev.main_measure, "evaluation.main_measure", problems)
    if main is not None and measures and main not in measures:
        problems.append(f"evaluation.main_measure: {ev.main_measure!r} must be one of evaluation.measures")
    if cfg.students is not None and all(s is not None for s in cfg.students) \
            and ev.baseline not in system_names(cfg):
        problems.append(f"evaluation.baseline: {ev.baseline!r} is not a system; choose one of "
                        f"{', '.join(system_names(cfg))}")
    if ev.correction is not None:
        _check_correction(ev.correction, problems)
    if not 0 < ev.alpha < 1:
        problems.append(f"evaluation.alpha: must lie between 0 and 1, got {ev.alpha}")
    if ev.fast:
        _check_fast(cfg, problems)


def _check_fast(cfg: ExperimentConfig, problems: list[str]) -> None:
    """``evaluation.fast`` only for cross-encoders whose fast scores were shown to rank as float32 (docs/serving.md)."""
    from pyterrier_kdcl.fast import EQUIVALENCE_FILE, equivalence_shown

    if cfg.device not in (None, "cpu"):
        problems.append(f"evaluation.fast: the fast path is for CPU, but device is {cfg.device!r}; drop one of them")
    rerankers = [("teacher", cfg.teacher)] if cfg.teacher is not None and cfg.teacher.kind == "cross-encoder" else []
    rerankers += [(f"students[{i}]", s) for i, s in enumerate(cfg.students or []) if s is not None]
    for path, model in rerankers:
        if equivalence_shown(model.model) is None:
            problems.append(f"{path}.model: evaluation.fast needs the fast path shown to rank as float32 for "
                            f"{model.model!r}, and {EQUIVALENCE_FILE.name} lists no such result for it; evaluate "
                            "without fast, or run benchmarks/fast_inference.py --record on a checkpoint of it")
        elif model.dtype not in (None, "fp32", "float32") or model.lora:
            problems.append(f"{path}: evaluation.fast was shown for full float32 fine-tuning; this model has "
                            f"dtype {model.dtype!r} and lora {model.lora!r}: evaluate it without fast")


def _check_name(path: str, name: str, problems: list[str]) -> None:
    if isinstance(name, str) and not NAME_PATTERN.match(name):
        problems.append(f"{path}: {name!r} must start with a letter or digit and hold only letters, digits and "
                        "._+- (it names files)")


def _check_data(path: str, data: Data, problems: list[str]) -> None:
    if not isinstance(data.dataset, str) or not data.dataset.startswith("irds:"):
        problems.append(f"{path}.dataset: expected an ir_datasets id starting with 'irds:', got {_show(data.dataset)}")
    if data.name is not None:
        _check_name(f"{path}.name", data.name, problems)
    if isinstance(data.queries, int) and data.queries < 1:
        problems.append(f"{path}.queries: must be at least 1 (or null for all), got {data.queries}")
    if isinstance(data.depth, int) and data.depth < 1:
        problems.append(f"{path}.depth: must be at least 1, got {data.depth}")
    fs = data.first_stage
    if fs.kind == "run" and not fs.path:
        problems.append(f"{path}.first_stage.path: required when kind is 'run' (a TREC run file)")
    if fs.kind != "run" and fs.path:
        problems.append(f"{path}.first_stage.path: only used when kind is 'run'")
    if fs.kind != "bm25" and fs.index:
        problems.append(f"{path}.first_stage.index: only used when kind is 'bm25'")
    if isinstance(data.text, list) and not data.text:
        problems.append(f"{path}.text: give at least one document field")


def _check_model(path: str, model: Model, problems: list[str]) -> None:
    _check_name(f"{path}.name", model.name, problems)
    if isinstance(model.max_length, int) and model.max_length < 16:
        problems.append(f"{path}.max_length: must be at least 16, got {model.max_length}")
    if isinstance(model.batch_size, int) and model.batch_size < 1:
        problems.append(f"{path}.batch_size: must be at least 1, got {model.batch_size}")
    if model.dtype is not None and model.dtype not in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
        problems.append(f"{path}.dtype: expected float32, bfloat16 or float16, got {_show(model.dtype)}")
    if model.template is not None and ("{query}" not in model.template or "{text}" not in model.template):
        problems.append(f"{path}.template: must contain {{query}} and {{text}}")
    _check_training(f"{path}.training", model.training, problems)


def _check_training(path: str, training: dict, problems: list[str]) -> None:
    for key, value in training.items():
        if key not in _TRAINING_TYPES:
            close = difflib.get_close_matches(str(key), _TRAINING_TYPES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(_TRAINING_TYPES)}"
            problems.append(f"{_join(path, key)}: unknown training setting{hint}")
            continue
        trial: list[str] = []
        checked = _check(_TRAINING_TYPES[key], value, _join(path, key), trial)
        problems.extend(trial)
        if not trial:
            training[key] = checked
    positive = ("group_size", "epochs", "batch_size", "gradient_accumulation_steps", "validate_every", "patience",
                "checkpoint_every",
                "learning_rate", "head_learning_rate", "temperature", "teacher_temperature", "student_temperature")
    for key in positive:
        value = training.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            problems.append(f"{_join(path, key)}: must be positive, got {value}")
    window = training.get("negatives_window")
    if isinstance(window, list) and (len(window) != 2 or not 0 <= window[0] < window[1]):
        problems.append(f"{_join(path, 'negatives_window')}: expected [first, last] ranks with first < last, "
                        f"got {window}")
    if isinstance(training.get("group_size"), int) and training["group_size"] < 2:
        problems.append(f"{_join(path, 'group_size')}: needs a positive and at least one negative (>= 2)")
    if "metric" in training and isinstance(training["metric"], str):
        _parse_measure(training["metric"], _join(path, "metric"), problems)
    if isinstance(training.get("negative_filter"), dict):
        training["negative_filter"] = _negative_filter(_join(path, "negative_filter"), training["negative_filter"],
                                                       problems)


def _negative_filter(path: str, value: dict, problems: list[str]) -> dict:
    """``negative_filter`` checked, with every key present (its canonical form: ``{margin: 0}`` and
    ``{margin: 0.0, action: drop}`` are one setting, with one fingerprint)."""
    for key in value:
        if key not in NEGATIVE_FILTER_KEYS:
            problems.append(f"{_join(path, key)}: unknown key; a negative_filter takes margin (a number >= 0, in the "
                            "teacher's score units) and action (drop or relabel)")
    margin = _check(float, value.get("margin", 0.0), _join(path, "margin"), problems)
    if isinstance(margin, float) and not (math.isfinite(margin) and margin >= 0):
        problems.append(f"{_join(path, 'margin')}: must be a number >= 0 (0 flags the negatives the teacher scores at "
                        f"or above the positive; a larger margin flags those within it too), got {margin}")
    action = _check(Literal["drop", "relabel"], value.get("action", "drop"), _join(path, "action"), problems)
    return {"margin": margin, "action": action}


def _parse_measure(name: str, path: str, problems: list[str]):
    import ir_measures

    try:
        return ir_measures.parse_measure(name)
    except Exception:
        problems.append(f"{path}: {name!r} is not an ir_measures measure (e.g. nDCG@10, RR@10, R@100)")
        return None


def _check_correction(method: str, problems: list[str]) -> None:
    try:
        from statsmodels.stats.multitest import multipletests

        multipletests([0.01, 0.02], method=method)
    except ImportError:
        problems.append("evaluation.correction: needs statsmodels (pip install statsmodels)")
    except Exception:
        problems.append(f"evaluation.correction: {method!r} is not a statsmodels multipletests method "
                        "(e.g. holm, bonferroni, fdr_bh)")


# -- paths and the world outside the file ----------------------------------------------------------------------
def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value.startswith(".\\")


def _resolve(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> None:
    for _, model in _named_models(cfg):
        if not model.model:  # a first-stage member (or a fused teacher)
            continue
        if _looks_like_path(model.model) or (base / model.model).exists():
            model.model = _resolve(model.model, base)
    for data in _all_data(cfg):
        if isinstance(data.first_stage, FirstStage) and isinstance(data.first_stage.path, str):
            data.first_stage.path = _resolve(data.first_stage.path, base)
    if isinstance(cfg.teacher_cache, str):
        cfg.teacher_cache = _resolve(cfg.teacher_cache, base)


# The parts below also run on a config with problems (so that one run lists every problem): a part whose type was
# wrong is None or of another type, reported already, and skipped here.
def _named_datas(cfg: ExperimentConfig) -> list[tuple[str, Data]]:
    """Every collection of the config with its key path."""
    teacher, ev = cfg.teacher, cfg.evaluation
    named = [("train", cfg.train), ("validation", cfg.validation)]
    if isinstance(teacher, Teacher):
        named.append(("teacher.data", teacher.data))
        named += [(f"teacher.members[{i}].data", m.data) for i, m in enumerate(_members(teacher))]
    if isinstance(ev, Evaluation):
        named += [(f"evaluation.in_domain[{i}]", d) for i, d in enumerate(_list(ev.in_domain))]
        named += [(f"evaluation.out_of_domain[{i}]", d) for i, d in enumerate(_list(ev.out_of_domain))]
    named += [(f"students[{i}].unjudged[{j}]", d) for i, s in enumerate(_list(cfg.students))
              if isinstance(s, Student) for j, d in enumerate(_list(s.unjudged))]
    return [(path, d) for path, d in named if isinstance(d, Data)]


def _named_models(cfg: ExperimentConfig) -> list[tuple[str, Model]]:
    """Every model of the config that names a model (a string) with the key path of that name."""
    named = [("teacher.model", cfg.teacher)] if isinstance(cfg.teacher, Teacher) else []
    named += [(f"students[{i}].model", s) for i, s in enumerate(_list(cfg.students))]
    if isinstance(cfg.teacher, Teacher):
        named += [(f"teacher.members[{i}].model", m) for i, m in enumerate(_members(cfg.teacher))]
    return [(path, m) for path, m in named if isinstance(m, Model) and isinstance(m.model, str)]


def is_saved_reranker(model: str) -> bool:
    """Whether ``model`` is a directory written by ``CrossEncoder.save`` (the runner continues from it)."""
    if not isinstance(model, str) or not model or not Path(model).is_dir():
        return False
    from pyterrier_kdcl.models import KDCL_CONFIG

    return (Path(model) / KDCL_CONFIG).is_file()


def saved_model_problem(path: str, model: Model) -> str | None:
    """What is wrong with a model (at key ``path``) that names a saved CrossEncoder *and* settings it would ignore:
    the saved reranker carries its own adapter, pooling and template, so ``lora``, ``pooling`` and ``template``
    given beside it would be dropped silently. None when nothing is wrong."""
    given = [key for key in ("lora", "pooling", "template") if getattr(model, key, None) not in (None, False)]
    if not given or getattr(model, "kind", "cross-encoder") != "cross-encoder" or not is_saved_reranker(model.model):
        return None
    keys = ", ".join(f"{path}.{key}" for key in given)
    return (f"{keys}: {model.model!r} is a saved kdcl CrossEncoder, which carries its own LoRA adapter, pooling "
            "and template (its kdcl.json and weights), so these keys would be ignored; drop them to continue from "
            f"the saved model as it is, or set {path}.model to its base model to build a new reranker with them")


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _members(teacher: Teacher) -> list[FusionMember]:
    return [m for m in _list(teacher.members) if isinstance(m, FusionMember)] if teacher.kind == "fusion" else []


def _all_data(cfg: ExperimentConfig) -> list[Data]:
    return [d for _, d in _named_datas(cfg)]


def _check_environment(cfg: ExperimentConfig, problems: list[str]) -> None:
    import ir_datasets

    from pyterrier_kdcl.offline import datasets as kdcl_datasets
    from pyterrier_kdcl.offline.datasets import registry

    kdcl_datasets.register()  # lists the kdcl ids in ir_datasets.registry, which is searched below

    for path, data in _named_datas(cfg):
        first_stage = data.first_stage if isinstance(data.first_stage, FirstStage) else FirstStage()
        ids = [(f"{path}.dataset", data.dataset)]
        if isinstance(first_stage.index, str) and first_stage.index:
            ids.append((f"{path}.first_stage.index", "irds:" + first_stage.index.removeprefix("irds:")))
        for key, dataset_id in ids:
            if not isinstance(dataset_id, str) or not dataset_id.startswith("irds:"):
                continue  # reported by the schema check
            bare = dataset_id.removeprefix("irds:")
            if bare not in ir_datasets.registry:
                close = difflib.get_close_matches(bare, list(ir_datasets.registry), n=1)
                hint = f"; did you mean 'irds:{close[0]}'?" if close else ""
                problems.append(f"{key}: ir_datasets does not know {dataset_id!r}{hint}")
                continue
            folder = registry.collection_of(bare)
            if folder is not None and not kdcl_datasets.is_built(folder.name):
                problems.append(f"{key}: the kdcl collection {folder.name!r} is not built; build it once with "
                                "`python -m pyterrier_kdcl.offline.datasets build`")
        if isinstance(first_stage.path, str) and first_stage.path and not Path(first_stage.path).is_file():
            problems.append(f"{path}.first_stage.path: run file {first_stage.path!r} does not exist")
    from pyterrier_kdcl.offline.packaged_models import misspelled_model
    from pyterrier_kdcl.training.tracking import missing_package

    for key, training in [("training", cfg.training), *((f"{k.removesuffix('.model')}.training", m.training)
                                                        for k, m in _named_models(cfg))]:
        report_to = training.get("report_to") if isinstance(training, dict) else None
        for name in [report_to] if isinstance(report_to, str) else report_to or []:
            if isinstance(name, str) and missing_package(name) is not None:
                problems.append(f"{key}.report_to: {missing_package(name)}")
    for key, model in _named_models(cfg):
        if model.model and _looks_like_path(model.model) and not Path(model.model).exists():
            problems.append(f"{key}: local model {model.model!r} does not exist")
        elif model.model and misspelled_model(model.model) is not None:
            problems.append(f"{key}: {misspelled_model(model.model)}")
        elif (problem := saved_model_problem(key.removesuffix(".model"), model)) is not None:
            problems.append(problem)
