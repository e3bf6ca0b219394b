"""The stages of an experiment as frozen specs: what each one is computed from, and so what names it on disk.

Each stage the runner computes (a teacher, the fit of a fused teacher, the fit of its temperature, a student, a
system's run on an evaluation collection) is built from one spec. Its :meth:`~StageSpec.fingerprint` hashes the
spec's complete canonical form (:func:`.identity.canonical`): every field, defaults included, the config sections it
holds in full, the fingerprints of the stages it reads, and :data:`.identity.SCHEMA_VERSION`. A field leaves a
fingerprint only where the schema declares that it changes no result (:func:`.identity.not_affecting`), or that it
belongs to the other training objective (:func:`.identity.only_for`).

>>> spec = TemperatureFitSpec(teacher="3f2a9c0d1e2b4a5c", validation=Data(dataset="irds:kdcl/manpages/dev"),
...                           sample_seed=0)
>>> len(spec.fingerprint())
16
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from pyterrier_kdcl.experiment.identity import canonical, digest
from pyterrier_kdcl.experiment.schema import Data, Student, Teacher, Training


class StageSpec(BaseModel):
    """What one stage is computed from. Frozen: a spec is a value, built once, hashed once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def trained_with(self) -> str | None:
        """The training objective of the stage (settings of the other one leave its fingerprint), or None."""
        return None

    def canonical(self):
        """Every field that affects results, as plain data (what :meth:`fingerprint` hashes)."""
        return canonical(self, self.trained_with())

    def fingerprint(self) -> str:
        """16 hex digits naming the stage: equal exactly when the canonical forms are."""
        return digest(type(self).__name__, self.canonical())


class TeacherSpec(StageSpec):
    """A teacher, or a member of a fused teacher: trained with contrastive learning on ``data`` (``training`` is
    its resolved settings), or given as it is (``training`` and ``data`` None; ``files`` names a local model's
    files, so that a model replaced on disk is another teacher)."""

    teacher: Teacher
    training: Training | None = None
    data: Data | None = None
    validation: Data | None = None
    sample_seed: int | None = None
    seed: int | None = None
    files: list[tuple[str, int, int]] | None = None

    def trained_with(self) -> str | None:
        return None if self.training is None else "CL"


class FirstStageMemberSpec(StageSpec):
    """A fused teacher's first-stage member: it scores with the first stage of the data the students train on."""

    data: list[Data]


class FusionFitSpec(StageSpec):
    """The fit of a fused teacher's statistics and weights: its members (name → fingerprint), its settings, the
    metric it maximises and the candidates it is fitted on (the validation data, else the training data's)."""

    teacher: Teacher
    members: dict[str, str]
    metric: str
    data: Data
    on_validation: bool
    sample_seed: int


class FusedTeacherSpec(StageSpec):
    """A fused teacher: its members and the weights and statistics fitted (or given) for them."""

    members: dict[str, str]
    weights: dict[str, float]
    stats: dict[str, list[float]]


class TemperatureFitSpec(StageSpec):
    """``teacher_temperature: auto``: fitted for one teacher on the validation candidates."""

    teacher: str
    validation: Data
    sample_seed: int


class StudentSpec(StageSpec):
    """One student trained with one objective and seed. ``teacher``: the teacher's fingerprint, for a distilled
    student or one whose negatives the teacher filters; ``test_halves``: the evaluation collections whose
    documents its unjudged candidates leave out (``exclude_test_documents``)."""

    student: Student
    objective: Literal["CL", "KD"]
    training: Training
    train: Data
    validation: Data | None
    sample_seed: int
    seed: int
    teacher: str | None = None
    test_halves: list[Data] = []

    def trained_with(self) -> str | None:
        return self.objective


class EvaluationSpec(StageSpec):
    """One system's run on one evaluation collection: the first stage alone (``reranker`` None), or reranked by the
    stage of that fingerprint, through the fast CPU path or not."""

    data: Data
    sample_seed: int
    reranker: str | None = None
    fast: bool = False


SPECS = (TeacherSpec, FirstStageMemberSpec, FusionFitSpec, FusedTeacherSpec, TemperatureFitSpec, StudentSpec,
         EvaluationSpec)
