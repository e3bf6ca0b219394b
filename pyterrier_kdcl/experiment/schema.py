"""The experiment config as typed models (pydantic v2): every key, its type, its default and its allowed range.

Types and ranges are declared on the fields, so that pydantic checks them all at once with key paths; what no type
can say (a baseline that names a student, weights that name the fused teacher's members) is checked in
:mod:`.config`, which also reads files and turns pydantic's errors into ``key.path: what is wrong`` lines.

Fields that change nothing a run computes are declared here, with :func:`.identity.not_affecting`, and settings read
by one training objective only with :func:`.identity.only_for`: the stage fingerprints (:mod:`.stages`) hash every
other field. See ``docs/experiment.md`` for every key.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

from pyterrier_kdcl.experiment.identity import not_affecting, only_for

OBJECTIVES = ("CL", "KD")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")  # names become file names and table labels
RESERVED_NAMES = {"BM25", "teacher"}

# YAML 1.1 (PyYAML) reads an exponent without a dot or without a sign (``1e-4``) as text; a config means the number.
_NUMBER_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _number_from_text(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):  # "1e-4" from a dict or a quoted value
        return float(value)
    return value


Number = Annotated[float, BeforeValidator(_number_from_text)]  # a float; an int or numeric text is taken too
Positive = Annotated[Number, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[Number, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
Tracker = Literal["tensorboard", "wandb", "mlflow"]
DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16",
               "fp16": "fp16"}


def _dtype_name(value: Any) -> Any:
    """One spelling per dtype (``float32`` is ``fp32``): one setting, one fingerprint."""
    return DTYPE_NAMES.get(value, value) if isinstance(value, str) else value


_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def _device(value: Any) -> Any:
    """A device torch knows by name; whether this machine has it is checked with the environment."""
    if isinstance(value, str) and not _DEVICE.match(value):
        raise ValueError(f"expected cpu, cuda, cuda:N, mps or xpu, got {value!r}")
    return value


def _lora(value: Any) -> Any:
    """``true`` or ``peft.LoraConfig`` arguments, those with ranges checked (peft itself checks them only when the
    model is built, after the teacher has trained)."""
    if not isinstance(value, dict):
        return value
    import dataclasses
    import difflib

    from peft import LoraConfig

    known = [f.name for f in dataclasses.fields(LoraConfig)]
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise ValueError(f"{key!r} is not a LoRA argument (peft.LoraConfig)" +
                             (f"; did you mean {close[0]!r}?" if close else "; e.g. r, lora_alpha, lora_dropout, "
                              "target_modules"))
    checks = {"r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
              "lora_alpha": (lambda v: _real(v) and v > 0, "a number > 0"),
              "lora_dropout": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)")}
    for key, (ok, what) in checks.items():
        if key in value and not ok(value[key]):
            raise ValueError(f"{key} must be {what}, got {value[key]!r}")
    return value


def _real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Section(BaseModel):
    """A part of the config: unknown keys are errors; values are not converted between types (except numbers)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def hint(text: str) -> dict:
    """A field's hint, added to the message of a value out of its range (``json_schema_extra=hint(...)``)."""
    return {"hint": text}


class FirstStage(Section):
    """Where candidates come from: ``bm25`` (PISA over ``index``, default the dataset's own documents),
    ``scoreddocs`` (the dataset's own run, e.g. MS MARCO's BM25 top 1000) or ``run`` (a TREC run file)."""

    kind: Literal["bm25", "scoreddocs", "run"] = "bm25"
    index: str | None = None
    path: str | None = None


class Data(Section):
    """Topics, qrels and candidates of one collection (for training, validation or evaluation)."""

    dataset: str                                # "irds:<ir_datasets id>"
    name: str | None = not_affecting(None, "a label in tables and file names")
    queries: Count | None = Field(None, json_schema_extra=hint("or null for all"))  # a seeded sample; None = all
    depth: Count = 100                          # first-stage candidates per query
    first_stage: FirstStage = Field(default_factory=FirstStage)
    text: str | list[str] = "text"              # document field(s) the rerankers read (joined by a space)
    query_field: str | None = None              # topics variant for datasets with several query fields
    qrels_variant: str | None = None
    split: Literal["adaptation", "test"] | None = None  # one half of the queries by a stable hash
    # a student's unjudged adaptation half only: drop the evaluated test half's documents from its candidates
    exclude_test_documents: Literal["judged", "candidates"] | None = None


class NegativeFilter(Section):
    """Negatives the teacher scores at or above the positive minus ``margin`` (teacher score units): ``drop`` them
    from the groups or ``relabel`` them as positives."""

    margin: NonNegative = Field(0.0, json_schema_extra=hint("0 flags the negatives the teacher scores at or above "
                                                            "the positive; a larger margin flags those within it"))
    action: Literal["drop", "relabel"] = "drop"


class Training(Section):
    """Trainer settings. In a config, a partial section: the top-level ``training`` overrides these defaults, a
    model's own ``training`` overrides that (:meth:`ExperimentConfig.training_args`); only the keys given are
    written back (:meth:`given`)."""

    group_size: Annotated[int, Field(ge=2)] = Field(8, json_schema_extra=hint(
        "a group needs a positive and at least one negative"))  # 1 positive + 7 hard negatives (Tevatron)
    epochs: Count = 1
    batch_size: Count = 4                       # queries (groups) per optimizer step
    learning_rate: Positive = 1e-4              # suits a fresh scoring head (OFFLINE.md: 3e-5 left the loss at ln 8)
    head_learning_rate: Positive | None = None  # the scoring head's own rate; None = learning_rate
    warmup_ratio: Annotated[Number, Field(ge=0, le=1, allow_inf_nan=False)] = 0.1
    weight_decay: NonNegative = 0.01
    max_grad_norm: Positive | None = 1.0
    gradient_accumulation_steps: Count = 1
    validate_every: Count | None = None         # steps; None = once per epoch
    metric: str = "nDCG@10"                     # validation metric that picks the best checkpoint
    patience: Count | None = None
    min_label: Annotated[int, Field(ge=1)] = Field(1, json_schema_extra=hint(
        "qrels labels at or above it are positives; 0 would make non-relevant documents positives"))
    # [first, last) candidate ranks negatives are drawn from; None = all
    negatives_window: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)] | None = None
    insufficient: Literal["skip", "replace"] = "skip"  # a query with too few negatives: skip it or draw again
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: Count | None = None       # steps between checkpoints; None = at each validation
    temperature: Positive = only_for(("CL",), 1.0)  # contrastive (InfoNCE) temperature
    teacher_temperature: Positive | Literal["auto"] = only_for(("KD",), 2.0)  # Tevatron's reranker KD recipe
    student_temperature: Positive = only_for(("KD",), 1.0)
    report_to: Tracker | Literal["none"] | list[Tracker] | None = not_affecting(
        None, "a tracker records the run; it computes nothing")
    negative_filter: NegativeFilter | None = None  # students only (a teacher trains on the negatives as given)

    def given(self) -> dict:
        """The keys given in the config (or set since), as plain values."""
        return {k: v.model_dump() if isinstance(v, BaseModel) else v
                for k, v in ((k, getattr(self, k)) for k in type(self).model_fields if k in self.model_fields_set)}

    @model_serializer(mode="wrap")
    def _only_given(self, handler):
        """Written back (``config.json``) as given: a default written out would override the top-level section."""
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


TRAINING_DEFAULTS: dict[str, Any] = {name: info.default for name, info in Training.model_fields.items()}


class Model(Section):
    """A reranker: a packaged short name (``minilm-l6``), a hub id, a local model dir or a saved CrossEncoder."""

    name: str = not_affecting(..., "a label: it names directories and table rows, not what is computed")
    model: str
    lora: Annotated[bool | dict | None, AfterValidator(_lora)] = None
    max_length: Annotated[int, Field(ge=16, le=131072)] = 256
    batch_size: Count = not_affecting(32, "pairs per forward pass at inference: the scores are the same")
    template: str | None = None
    pooling: Literal["classifier", "last", "mean"] | None = None
    dtype: Annotated[Literal["fp32", "bf16", "fp16"] | None, BeforeValidator(_dtype_name)] = None
    training: Training = not_affecting(reason="overrides, resolved into each stage's own training settings",
                                       default_factory=Training)


class Teacher(Model):
    """The teacher: trained with contrastive learning, given as it is, a bi-encoder, or a fusion of members."""

    name: str = not_affecting("teacher", "a label: it names directories and table rows, not what is computed")
    model: str = ""
    train: Literal["contrastive", "none"] = "contrastive"  # "none": use ``model`` as it is (already trained)
    # bi-encoder: sentence-transformers, as it is; fusion: a weighted sum of its members' standardised scores
    kind: Literal["cross-encoder", "bi-encoder", "fusion"] = "cross-encoder"
    disjoint: bool = False                      # train on ``data`` minus the students' training queries (a control)
    seed: Seed | None = not_affecting(None, "resolved into the stage's seed (default: the first of seeds)")
    data: Data | None = not_affecting(None, "resolved into the stage's training data (default: the experiment's "
                                      "train)")
    members: list[FusionMember] = Field(default_factory=list)  # kind: fusion
    weights: dict[str, NonNegative] | None = None  # kind: fusion: member name -> weight (default: fitted)
    grid_step: Annotated[Number, Field(gt=0, le=1)] = Field(0.1, json_schema_extra=hint(
        "the spacing of the weight grid: in (0, 1] and dividing 1, e.g. 0.1, 0.05, 0.25"))  # kind: fusion


FUSION_KEYS = {"members": [], "weights": None, "grid_step": 0.1}  # a fused teacher's keys, at their defaults


class FusionMember(Teacher):
    """A member of a fused teacher: a teacher of its own (trained or given), or the first stage's own score."""

    name: str | None = not_affecting(None, "keys the member's weight (the fusion fit holds it)")  # required
    kind: Literal["cross-encoder", "bi-encoder", "first-stage"] = "cross-encoder"


Teacher.model_rebuild()


class Student(Model):
    """A student, trained with each of its objectives under each seed."""

    objectives: list[Literal["CL", "KD"]] = not_affecting(
        reason="each stage trains one objective: the stage's own objective names it",
        default_factory=lambda: list(OBJECTIVES))
    unjudged: list[Data] = Field(default_factory=list)  # more training queries, used without their qrels (KD only)
    base: str | None = not_affecting(None, "the student that reports compare this one with")


class Evaluation(Section):
    in_domain: list[Data]
    out_of_domain: list[Data] = Field(default_factory=list)
    measures: list[str] = Field(default_factory=lambda: ["nDCG@10", "RR@10", "R@10"], min_length=1,
                                json_schema_extra=hint("e.g. [nDCG@10, RR@10]"))
    main_measure: str = "nDCG@10"               # the measure of the summary table, KD−CL tests and verdict
    baseline: str = "BM25"                      # "BM25", "teacher" or "<student>-<objective>"
    test: Literal["t", "wilcoxon"] = "t"
    correction: str | None = "holm"
    alpha: Annotated[Number, Field(gt=0, lt=1)] = 0.05
    fast: bool = False                          # rerank with optimize_for_cpu (bf16); only models shown equivalent


class ExperimentConfig(Section):
    """A whole experiment. ``source``: the file it was read from (set by ``load_config``)."""

    name: str
    train: Data
    teacher: Teacher
    students: list[Student]
    evaluation: Evaluation
    description: str = ""
    seeds: list[Seed] = Field(default_factory=lambda: [42])
    validation: Data | None = None
    training: Training = Field(default_factory=Training)
    device: Annotated[str | None, AfterValidator(_device)] = None
    sample_seed: Seed = 0                       # which queries are sampled: fixed across seeds and systems
    wait_for_lock: bool = False                 # another run writes to the output directory: wait (else refuse)
    teacher_cache: str | None = None            # teacher-score cache directory; None: <out>/teacher-scores. In no
                                                # stage's fingerprint: scores are keyed by teacher and pair, not place
    source: str | None = None

    def training_args(self, model: Model) -> dict:
        """The trainer settings of ``model``: defaults < top-level ``training`` < the model's ``training``."""
        return {**TRAINING_DEFAULTS, **self.training.given(), **model.training.given()}

    def training_of(self, model: Model) -> Training:
        """:meth:`training_args` as a complete :class:`Training` (every key set)."""
        return Training.model_validate(self.training_args(model))

    def to_dict(self) -> dict:
        """The config as JSON-able data; :func:`~.config.load_config` reads it back as the same config."""
        return self.model_dump(mode="json")
