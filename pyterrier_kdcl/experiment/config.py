"""The KD-vs-CL experiment's config file: reading it, and checking it completely before anything is trained.

A config is YAML (or TOML, or an already-parsed dict). Its schema is typed (:mod:`.schema`, pydantic models with
the range of every number declared on its field); :func:`load_config` adds what types cannot say (names that must
refer to each other), dataset ids that ir_datasets does not know, kdcl collections that are not built, and local
paths that do not exist. Every error names the key path, for example
``students[1].training.learning_rate: expected a number, got 'fast'``. All problems are reported at once.

Relative paths inside a config are relative to the config file. See ``docs/experiment.md`` for every key.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

from pyterrier_kdcl.experiment.schema import (  # noqa: F401 (the public names other modules import from here)
    FUSION_KEYS,
    NAME_PATTERN,
    OBJECTIVES,
    RESERVED_NAMES,
    TRAINING_DEFAULTS,
    Data,
    Evaluation,
    ExperimentConfig,
    FirstStage,
    FusionMember,
    Model,
    NegativeFilter,
    Student,
    Teacher,
    Training,
)


class ConfigError(ValueError):
    """The config is invalid; ``problems`` lists every ``key.path: what is wrong`` found."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(f"{len(problems)} problem(s){where}:\n" + "\n".join(f"  - {p}" for p in problems))


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
    reported: list[str] = []  # key paths whose values were refused: the checks below skip what lies under them
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        for path, problem in schema_problems(err, data):
            problems.append(f"{path}: {problem}")
            reported.append(path)
        cfg = _partial(data, reported)
    cfg.source = source
    later: list[str] = []
    _check_semantics(cfg, later, partial=bool(reported))
    _resolve_paths(cfg, base)  # both also run on a config with problems: one run lists every problem
    if check_environment:
        _check_environment(cfg, later)
    problems += [p for p in later if not any(_under(p, path) for path in reported)]
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _under(problem: str, path: str) -> bool:
    """Whether ``problem`` (``key.path: ...``) is about ``path`` or what lies under it."""
    return problem.startswith(path) and problem[len(path):len(path) + 1] in (":", ".", "[", ",")


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


MAX_VALUES = 100_000  # a config's values once YAML aliases are expanded: a real config has a few hundred


def _yaml_load(text: str):
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # a key given twice is an error, not the last one winning
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); the first would be dropped silently: keep one",
                        key_node.start_mark)
                if isinstance(key, typing.Hashable):
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    data = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader: no Python objects are built)
    if _values(data) > MAX_VALUES:  # aliases nested in aliases ("billion laughs") share objects until expanded
        raise ValueError(f"the config holds more than {MAX_VALUES:,} values once its YAML aliases (*name) are "
                         "expanded; aliases repeated inside aliases multiply: write the values out")
    return data


def _values(data, limit: int = MAX_VALUES) -> int:
    """How many values ``data`` holds with shared (aliased) parts counted each time they appear; stops past
    ``limit``."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


# -- pydantic's errors as key paths ----------------------------------------------------------------------------
def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def schema_problems(err: ValidationError, data: Any) -> list[tuple[str, str]]:
    """pydantic's errors as ``(key.path, what is wrong)``, each once, in the order pydantic found them.

    A value that no option of a union takes (``teacher_temperature: hot``) is one problem naming every option.
    """
    out: list[tuple[str, str]] = []
    errors = err.errors()
    walked = [_walk(error["loc"]) for error in errors]
    for error, (path, tp, owner, union) in zip(errors, walked):
        value = _value_at(data, error["loc"][:len(_parts(path))], error.get("input"))
        problem = _message(error, tp, owner, value)
        if union is not None and error["type"] != "value_error":  # a number out of range says so; any other
            # value is told the options (a validator's own message is kept)
            in_range = [e for e, w in zip(errors, walked) if w[0] == path and e["type"] in _RANGES]
            problem = _message(in_range[0], tp, owner, value) if in_range else _describe_union(union, value)
        if (path or "config", problem) not in out:
            out.append((path or "config", problem))
    return out


def _parts(path: str) -> list:
    return re.findall(r"[^.\[\]]+", path)


def _unwrap(tp):
    """``tp`` without ``Annotated`` and without ``| None`` (the rest of a union is kept)."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) in (Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(options) == 1:
                tp = options[0]
                continue
        return tp


def _walk(loc: tuple) -> tuple[str, Any, Any, Any]:
    """Follows an error's location through the schema: (key path, type there, the model owning the last key, the
    union type the error is in, or None)."""
    tp, owner, path = ExperimentConfig, None, ""
    for key in loc:
        tp = _unwrap(tp)
        if typing.get_origin(tp) in (Union, types.UnionType):
            return path, tp, owner, tp  # the rest of the location names a union option: one problem for the union
        if isinstance(key, int):
            tp = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            owner, tp = tp, (tp.model_fields[key].annotation if key in tp.model_fields else None)
        else:
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else Any
        path = _join(path, key)
    tp = _unwrap(tp)
    union = tp if typing.get_origin(tp) in (Union, types.UnionType) else None
    return path, tp, owner, union


def _value_at(data: Any, loc: tuple, fallback: Any) -> Any:
    for key in loc:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return fallback
    return data


_RANGES = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "list": "a list", "dict": "a mapping", "model": "a mapping", "model_attributes": "a mapping",
               "literal": None}


def _message(error: dict, tp, owner, value) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    field = owner.model_fields.get(str(error["loc"][-1])) if owner is not None and error["loc"] else None
    extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
    hint = f" ({extra['hint']})" if "hint" in extra else ""
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        known = [k for k in owner.model_fields if k != "source"] if owner is not None else []
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        what = "unknown training setting" if owner is Training else "unknown key"
        return f"{what}; did you mean {close[0]!r}?" if close else f"{what}; known keys: {', '.join(known)}"
    if kind == "literal_error" or (kind.endswith("_type") and typing.get_origin(tp) is Literal):
        return f"expected {_describe(tp)}, got {_show(value)}"
    base = kind.removesuffix("_type").removesuffix("_parsing").removesuffix("_from_float")
    if base in _TYPE_WORDS and _TYPE_WORDS[base]:
        return f"expected {_TYPE_WORDS[base]}, got {_show(value)}"
    number = "a number " if _is_float(tp) else ""
    ranges = {"greater_than": f"must be {number}> {ctx.get('gt')}",
              "greater_than_equal": (f"must be {number}>= {ctx.get('ge')}" if number
                                     else f"must be at least {ctx.get('ge')}"),
              "less_than": f"must be < {ctx.get('lt')}", "less_than_equal": f"must be at most {ctx.get('le')}",
              "finite_number": "must be a finite number",
              "too_short": f"needs at least {ctx.get('min_length')} item(s)",
              "too_long": f"takes at most {ctx.get('max_length')} item(s)"}
    if kind in ranges:
        return f"{ranges[kind]}, got {_show(value)}{hint}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return f"{error['msg']}, got {_show(value)}"


def _is_float(tp) -> bool:
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_float(a) for a in typing.get_args(tp))
    return tp is float


def _describe_union(tp, value) -> str:
    return f"expected {_describe(tp)}, got {_show(value)}"


def _describe(tp) -> str:
    tp = tp if typing.get_origin(tp) in (Union, types.UnionType) else _unwrap(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) < 60 else text[:57] + "..."


# -- a config with problems, checked on -------------------------------------------------------------------------
def _partial(data: dict, reported: list[str]) -> ExperimentConfig:
    """The config without the values refused (those keys fall back to their defaults; a part that still cannot be
    built is None), so that the checks of what types cannot say run on the rest in the same round."""
    pruned = copy.deepcopy(data) if isinstance(data, dict) else {}
    for path in reported:
        _drop(pruned, _parts(path))
    values, holder = {}, ExperimentConfig.model_construct()
    for name in ExperimentConfig.model_fields:
        if name not in pruned:
            continue
        try:  # one key at a time, as the schema checks it
            ExperimentConfig.__pydantic_validator__.validate_assignment(holder, name, pruned[name])
            values[name] = holder.__dict__[name]
        except ValidationError:
            values[name] = None
    for name, info in ExperimentConfig.model_fields.items():
        if name not in values:
            values[name] = None if info.is_required() else info.get_default(call_default_factory=True)
    return ExperimentConfig.model_construct(**values)


def _drop(data: Any, parts: list[str]) -> None:
    """Removes the value at ``parts`` (a whole list, where an item of it was refused)."""
    if not parts:
        return
    *parents, last = parts
    for i, key in enumerate(parents):
        inner = data[int(key)] if isinstance(data, list) and key.isdigit() and int(key) < len(data) \
            else data.get(key) if isinstance(data, dict) else None
        if isinstance(inner, list) and i + 1 == len(parents) and last.isdigit():
            if isinstance(data, dict):
                data.pop(key, None)  # an item of a list was refused: the list's default stands
            return
        if inner is None:
            return
        data = inner
    if isinstance(data, dict):
        data.pop(last, None)




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


def _check_semantics(cfg: ExperimentConfig, problems: list[str], partial: bool = False) -> None:
    """Checks what types cannot say, part by part.

    A part whose types were wrong can trip a check (None where a list was due): its problem is reported
    already, so the trip is ignored and the other parts are still checked.
    """
    for check in (_check_top, _check_datas, _check_models, _check_evaluation):
        before = len(problems)
        try:
            check(cfg, problems)
        except (TypeError, AttributeError, ValueError):
            if not partial:
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
    if teacher.training.negative_filter is not None:
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
    if model.template is not None and ("{query}" not in model.template or "{text}" not in model.template):
        problems.append(f"{path}.template: must contain {{query}} and {{text}}")
    _check_training(f"{path}.training", model.training, problems)


def _check_training(path: str, training: Training, problems: list[str]) -> None:
    """What the types of :class:`Training` cannot say (its ranges are declared on its fields)."""
    window = training.negatives_window
    if window is not None and not window[0] < window[1]:
        problems.append(f"{_join(path, 'negatives_window')}: expected [first, last] ranks with first < last, "
                        f"got {window}")
    if "metric" in training.model_fields_set:
        _parse_measure(training.metric, _join(path, "metric"), problems)


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
        report_to = training.report_to if isinstance(training, Training) else None
        for name in [report_to] if isinstance(report_to, str) else report_to or []:
            if isinstance(name, str) and missing_package(name) is not None:
                problems.append(f"{key}.report_to: {missing_package(name)}")
    _check_device(cfg.device, problems)
    for key, model in _named_models(cfg):
        if isinstance(model.max_length, int) and (limit := _position_limit(model)) is not None \
                and model.max_length > limit:
            problems.append(f"{key.removesuffix('.model')}.max_length: {model.max_length} is longer than the {limit} "
                            f"positions {model.model!r} can read; use {limit} or less (longer documents are "
                            "truncated)")
        if model.model and _looks_like_path(model.model) and not Path(model.model).exists():
            problems.append(f"{key}: local model {model.model!r} does not exist")
        elif model.model and misspelled_model(model.model) is not None:
            problems.append(f"{key}: {misspelled_model(model.model)}")
        elif (problem := saved_model_problem(key.removesuffix(".model"), model)) is not None:
            problems.append(problem)


def _check_device(device, problems: list[str]) -> None:
    """A CUDA device this machine has (the name itself is checked by the schema)."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        problems.append(f"device: {device!r}, but this machine has {count} CUDA device(s); use "
                        f"{'cpu' if not count else f'cuda:0 … cuda:{count - 1}'} (or no device: the best one there is)")


def _position_limit(model: Model) -> int | None:
    """The tokens ``model`` can read where its positions run out (an encoder's learned absolute positions), from its
    config alone (a model of that shape on the meta device, no weights); None where unknown or unlimited."""
    if getattr(model, "kind", "cross-encoder") == "bi-encoder" or not model.model:
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModel

        from pyterrier_kdcl.models import max_positions

        config = AutoConfig.from_pretrained(model.model, local_files_only=True)  # cached or local: never the Hub
        with torch.device("meta"):
            backbone = AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 — not a local or cached transformers model: the run will say what it is
        return None
    return max_positions(types.SimpleNamespace(backbone=backbone))
