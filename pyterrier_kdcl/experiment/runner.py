"""Runs the KD-vs-CL experiment of a config: train the teacher, train every student both ways, evaluate, report.

Everything goes to one output directory::

    config.json                     the validated config as run
    teacher/                        model/ (CrossEncoder.save), log.csv, stage.json; done.json is written last
    teacher-<member>/               a fused teacher's second and later trained members, laid out like teacher/
    teacher-fusion.json             a fused teacher's fitted statistics and weights (teacher-temperature.json: its
                                    fitted temperature, for ``teacher_temperature: auto``)
    teacher-scores/                 the teacher score cache, shared by every distilled student (``teacher_cache``
                                    in the config puts it elsewhere: one cache for several experiments)
    students/<name>/<CL|KD>/seed-<s>/   one training run each, laid out like teacher/
    runs/<collection>/              pt.Experiment's save_dir: a run file per system, aggregated.csv, perquery.csv
    perquery.csv.gz                 the evidence: every per-query value the report was built from (.evidence)
    tables/  plots/  report.md  timings.json
    .kdcl.lock  .kdcl.lock.json     held while a run writes here (pyterrier_kdcl.directory_lock)

One run writes to a directory at a time: a run holds the directory's lock from its first write to its last, so
the cleaning of what killed runs left behind (stages of other settings, broken run files, checkpoint leftovers)
never touches the files of a run still going. A second run refuses at once, naming the holder, or waits
(``wait=True``, ``kdcl experiment --wait``, ``wait_for_lock: true``); a killed run's lock is taken over.

A rerun reuses what is finished: a stage whose ``done.json`` carries the fingerprint of its current settings is
not trained again, and run files of unchanged systems are read back instead of recomputed. A stage whose
settings changed is trained afresh; a crashed stage resumes from its last checkpoint.

Example::

    from pyterrier_kdcl.experiment import run_experiment
    result = run_experiment("experiments/quick.yaml", out="runs/quick")
    print(result.summary_markdown)
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import pyterrier as pt
import torch

from pyterrier_kdcl import paths
from pyterrier_kdcl.directory_lock import directory_lock
from pyterrier_kdcl.experiment import data as experiment_data
from pyterrier_kdcl.experiment import evidence
from pyterrier_kdcl.experiment import report as reporting
from pyterrier_kdcl.experiment.config import (
    ExperimentConfig,
    Model,
    Student,
    Teacher,
    Training,
    data_label,
    evaluated_test_halves,
    evaluation_collections,
    is_saved_reranker,
    load_config,
    saved_model_problem,
)
from pyterrier_kdcl.experiment.identity import canonical, digest
from pyterrier_kdcl.experiment.stages import (
    EvaluationSpec,
    FirstStageMemberSpec,
    FusedTeacherSpec,
    FusionFitSpec,
    StudentSpec,
    TeacherSpec,
    TemperatureFitSpec,
)
from pyterrier_kdcl.experiment.teachers import bi_encoder_teacher, fitted_fusion, fitted_temperature
from pyterrier_kdcl.fusion import FirstStageScore, ScoreFusion
from pyterrier_kdcl.reranker import CrossEncoder, resolve_device, resolve_dtype
from pyterrier_kdcl.training import checkpoints
from pyterrier_kdcl.training.precision import resolve as resolve_precision
from pyterrier_kdcl.training.teachers import can_fingerprint
from pyterrier_kdcl.training.trainer import ContrastiveTrainer, DistillationTrainer

DONE, STAGE = "done.json", "stage.json"
_CL_ONLY, _KD_ONLY = {"temperature"}, {"teacher_temperature", "student_temperature"}
_NOT_TRAINER_ARGS = _CL_ONLY | _KD_ONLY
LOCK_HINT = ("give this run another output directory (kdcl experiment --out DIR, run_experiment(out=...)), or let "
             "it wait until the other run finishes (--wait, wait=True, or wait_for_lock: true in the config)")


# -- processes -------------------------------------------------------------------------------------------------
class Processes:
    """One process, or several under ``accelerate launch`` / ``torchrun``: all of them train (DDP, through the
    trainer's Accelerator); only the main one writes stage markers, evaluates and reports."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState()

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def device(self):
        return None if self.state is None else self.state.device

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


# -- stages ----------------------------------------------------------------------------------------------------
def memory_key(*parts) -> str:
    """A short hash of values (config sections included) that keys what one run keeps in memory. A stage's identity
    on disk is its spec's fingerprint (:mod:`.stages`), not this."""
    return digest("in memory", canonical(list(parts)))


def _write_json(path: Path, obj) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    paths.write_text_atomically(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def _read_json(path: Path, log=None):
    """A JSON file the run wrote, or None when it is missing or unreadable (then it is computed again, and ``log``
    says so)."""
    return paths.read_written(path, log=log)


class ForeignFiles(FileExistsError):
    """``--out`` holds files at a place the run writes to that the run did not write: they are never deleted."""


@dataclass
class Stage:
    """One training run in its own directory. ``done.json`` is written last and names the settings' fingerprint."""

    path: Path
    fingerprint: str
    description: str

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def is_done(self, log=None) -> bool:
        done = _read_json(self.path / DONE, log)
        return bool(done) and done.get("fingerprint") == self.fingerprint and self.model_dir.is_dir()

    def begin(self, log, processes: Processes | None = None) -> None:
        """Clears what other settings left here; keeps this setting's checkpoints so training resumes."""
        processes = processes or Processes()
        if processes.is_main:
            self._begin(log)
        processes.wait()

    def _begin(self, log) -> None:
        aside = self.path.with_name(f".old-{self.path.name}")
        if aside.exists():  # a deletion below that a kill interrupted
            shutil.rmtree(aside)
        marked = (self.path / STAGE).exists()
        started = _read_json(self.path / STAGE, log) if marked else None
        foreign = [] if marked else self._foreign()
        if foreign:
            raise ForeignFiles(
                f"{self.path} holds files this experiment did not write (it has no {STAGE}): "
                f"{', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}. They are left as they are: move them "
                "away, or give the run another output directory (--out DIR)")
        if marked and (not started or started.get("fingerprint") != self.fingerprint):
            log(f"{self.description}: settings changed since {self.path} was written; training afresh")
            os.replace(self.path, aside)  # one step: a kill during the deletion leaves no half stage here
            shutil.rmtree(aside)
        elif started:
            log(f"{self.description}: resuming from {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / DONE).unlink(missing_ok=True)
        _write_json(self.path / STAGE, {"fingerprint": self.fingerprint, "description": self.description})

    def _foreign(self) -> list[str]:
        """What is at the stage's place although no stage.json says a run put it there (a run killed before it
        wrote stage.json leaves an empty folder)."""
        if not self.path.is_dir():
            return [self.path.name] if self.path.exists() else []
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith((f".{STAGE}.", ".kdcl.lock")))

    def finish(self, info: dict, processes: Processes | None = None) -> None:
        """Marks the stage done, then removes its checkpoints (the trainer keeps them: a kill before ``done.json``
        resumes from the last one, with nothing left to train, instead of training again)."""
        processes = processes or Processes()
        if processes.is_main:
            _write_json(self.path / DONE, {"fingerprint": self.fingerprint, **info})
            checkpoints.remove_all(self.path)  # renamed away first: a kill here leaves a leftover, not a half
        processes.wait()

    def tidy(self) -> None:
        """Removes what a kill after ``done.json`` left: the checkpoints of a finished stage."""
        if (self.path / "checkpoints").exists() or (self.path / ".old-checkpoints").exists():
            checkpoints.remove_all(self.path)

    def info(self) -> dict:
        return _read_json(self.path / DONE) or {}

    def log_frame(self) -> pd.DataFrame | None:
        return paths.read_written(self.path / "log.csv", pd.read_csv,
                                  remedy=f"delete {self.path / DONE} to train this stage again")


class LazyReranker(pt.Transformer):
    """A reranker loaded (by ``loader()``) only while it reranks, so reused runs never load a model at all."""

    schematic = {"label": "LazyReranker", "help_url": "docs/experiment.md"}

    def __init__(self, name: str, loader):
        self.name, self.loader = name, loader

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        if len(inp) == 0:  # pt.inspect and pt.Experiment's validation ask with an empty frame
            return pt.model.add_ranks(inp.assign(score=pd.Series(dtype="float64")))
        model = self.loader()
        large = _is_large(model)
        try:
            return model(inp)
        finally:
            del model
            _free(large)

    def __repr__(self) -> str:
        return f"LazyReranker({self.name!r})"


def _fast(loader):
    """``loader`` with the fast CPU path applied to what it loads, when that is a ``CrossEncoder`` (a bi-encoder
    teacher is evaluated as it is): bfloat16, the method ``fast_equivalence.json`` shows to rank as float32."""
    from pyterrier_kdcl.fast import optimize_for_cpu

    def load():
        model = loader()
        return optimize_for_cpu(model, "bf16") if isinstance(model, CrossEncoder) else model

    return load


def _files_of(path: str) -> list | None:
    """Names, sizes and modification times of a local model's files: a given teacher replaced on disk is a new
    teacher (its students are distilled again). None for hub ids and short names."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in folder.rglob("*") if f.is_file())


def _is_large(model) -> bool:
    ranker = getattr(model, "ranker", None)
    return ranker is None or sum(p.numel() for p in ranker.parameters()) > 50_000_000


def _free(large: bool) -> None:
    """Returns a dropped model's memory; only after a large one (a full garbage collection costs ~0.3 s)."""
    if large:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _nonempty_results(path: Path) -> pd.DataFrame:
    """A run file's results; an emptied one (a kill just after it was opened) reads as no rows: refused."""
    res = pt.io.read_results(str(path))
    if len(res) == 0:
        raise ValueError("no results")
    return res


# -- results ---------------------------------------------------------------------------------------------------
@dataclass
class TrainedModel:
    """A model the experiment trained or was given: where it is, and its training log."""

    name: str              # "teacher" or "<student>-<objective>-s<seed>"
    role: str              # "teacher" or "student"
    objective: str         # "CL", "KD" or "given"
    seed: int | None
    fingerprint: str
    student: str | None = None
    loader: object = field(default=None, repr=False)
    log: pd.DataFrame | None = field(default=None, repr=False)
    seconds: float = 0.0
    groups: dict | None = None   # the trainer's group statistics (queries used, skipped, unjudged), as recorded
    reused: bool = False


@dataclass
class CollectionResult:
    """The evaluation of every system on one collection."""

    label: str
    in_domain: bool
    table: pd.DataFrame          # pt.Experiment's output: means and significance against the baseline
    perquery: pd.DataFrame       # name, qid, measure, value
    queries: int
    depth: int
    seconds: float


@dataclass
class ExperimentResult:
    config: ExperimentConfig
    out: Path
    models: list[TrainedModel]
    collections: list[CollectionResult]
    report: reporting.Report
    seconds: float

    @property
    def summary_markdown(self) -> str:
        return self.report.summary_markdown


# -- the runner ------------------------------------------------------------------------------------------------
class ExperimentRunner:
    """Runs one config into one output directory. ``run()`` does everything; each step can run alone."""

    def __init__(self, config: ExperimentConfig, out: str | Path, *, verbose: bool = True, wait: bool | None = None):
        self.config = config
        self.out = Path(out)
        self.verbose = verbose
        self.wait = config.wait_for_lock if wait is None else wait  # another run holds ``out``: wait, or refuse
        self.timings: dict[str, float] = {}
        self._frames: dict[str, tuple] = {}
        self._excluded: dict[str, dict] = {}  # unjudged frames' key -> the test documents taken out of them
        self.processes = Processes()
        self.device = config.device or self.processes.device  # under DDP, each process its own GPU

    def log(self, message: str) -> None:
        if self.verbose and self.processes.is_main:
            print(f"[kdcl] {message}", flush=True)

    @contextmanager
    def locked(self):
        """Holds the output directory's lock (re-entrant: ``run()`` holds it, each step run alone takes it).
        Under several processes the main one holds it for all. Raises DirectoryLocked if another run holds it."""
        if not self.processes.is_main:
            yield
            return
        with directory_lock(self.out, wait=self.wait, hint=LOCK_HINT):
            yield

    # -- data ------------------------------------------------------------------------------------------------
    def frames(self, data, min_label: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """(topics, qrels, candidates with text) of ``data``, built once per run."""
        key = memory_key(data, self.config.sample_seed, min_label)
        if key not in self._frames:
            started = time.perf_counter()
            topics, qrels = experiment_data.topics_and_qrels(data, self.config.sample_seed, min_label)
            res = experiment_data.candidates(data, topics)
            self._frames[key] = (topics, qrels, res)
            self.log(f"{data.dataset}: {len(topics)} queries, {len(res)} candidates "
                     f"({time.perf_counter() - started:.1f}s)")
        return self._frames[key]

    # -- models ----------------------------------------------------------------------------------------------
    def new_reranker(self, spec: Model, seed: int | None = None) -> CrossEncoder:
        """``spec`` as a CrossEncoder; ``seed`` fixes what the global RNG draws (a LoRA adapter's initial weights),
        so the CL and the KD run of one seed start from identical weights."""
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = {"batch_size": spec.batch_size, "max_length": spec.max_length, "device": self.device,
                  "verbose": self.verbose}
        if is_saved_reranker(spec.model):  # a saved CrossEncoder: continue from it, with its own settings
            problem = saved_model_problem(spec.name, spec)  # a model saved after the config was checked
            if problem is not None:
                raise ValueError(problem)
            return CrossEncoder.load(spec.model, dtype=spec.dtype, **kwargs)
        return CrossEncoder(spec.model, lora=spec.lora, template=spec.template, pooling=spec.pooling,
                            dtype=spec.dtype, **kwargs)

    def _load_saved(self, path: Path, spec: Model):
        # a finished model only scores from here on: a LoRA adapter folded into its base scores the same (within
        # float tolerance) without the adapter's extra matmuls
        return lambda: CrossEncoder.load(path, merge_lora=True, device=self.device, batch_size=spec.batch_size,
                                         verbose=self.verbose)

    def _trainer_kwargs(self, spec: Model, seed: int, stage: Stage, data) -> dict:
        # the settings its stage's spec names (precision resolved, a teacher's negatives unfiltered)
        args = {k: v for k, v in self.training(spec).given().items() if k not in _NOT_TRAINER_ARGS}
        if args.get("negatives_window") is not None:
            args["negatives_window"] = tuple(args["negatives_window"])
        # positives the first stage missed still make groups: their text comes from the collection
        # checkpoints are kept until done.json is written (Stage.finish removes them)
        return {**args, "seed": seed, "output_dir": stage.path, "verbose": self.verbose, "keep_checkpoints": True,
                "text_source": experiment_data.text_stage(data)}

    def negative_filter(self, spec: Model) -> dict | None:
        """The student's teacher-filtered negatives (``training.negative_filter``); None for a teacher, which trains on
        the negatives as given (there is no teacher to judge them)."""
        return None if isinstance(spec, Teacher) else self.config.training_args(spec).get("negative_filter")

    def training(self, spec: Model) -> Training:
        """The complete training settings ``spec`` trains with (what its stage's spec holds), ``precision: auto``
        resolved to what the fit computes in on this machine (bf16 where native): another precision is another
        stage."""
        args = self.config.training_args(spec)
        return Training.model_validate({**args, "precision": self.precision(spec, args["precision"]),
                                        "negative_filter": self.negative_filter(spec)})

    def precision(self, spec: Model, precision: str) -> str:
        """``training.precision`` of ``spec`` as its fit resolves it here (``training.precision.resolve``)."""
        device = resolve_device(self.device)
        return resolve_precision(precision, device, resolve_dtype(spec.dtype, device))

    def teacher_spec(self, spec: Teacher) -> TeacherSpec:
        """The spec of a teacher (or fused teacher's member): given as it is, or trained with contrastive learning."""
        cfg = self.config
        if spec.train == "none":
            return TeacherSpec(teacher=spec, files=_files_of(spec.model))
        return TeacherSpec(teacher=spec, training=self.training(spec), data=spec.data or cfg.train,
                           validation=cfg.validation, sample_seed=cfg.sample_seed,
                           seed=spec.seed if spec.seed is not None else cfg.seeds[0])

    def student_spec(self, spec: Student, objective: str, seed: int, teacher: str | None) -> StudentSpec:
        """The spec of one student run; ``teacher`` (a fingerprint) names it where the teacher's scores are read:
        distillation, and negatives the teacher filters (for CL too)."""
        cfg = self.config
        reads_teacher = objective == "KD" or self.negative_filter(spec) is not None
        halves = [h for d in spec.unjudged if d.exclude_test_documents is not None
                  for h in evaluated_test_halves(cfg, d)]
        return StudentSpec(student=spec, objective=objective, training=self.training(spec), train=cfg.train,
                           validation=cfg.validation, sample_seed=cfg.sample_seed, seed=seed,
                           teacher=teacher if reads_teacher else None, test_halves=halves)

    def excluded_documents(self, data) -> set[str]:
        """The documents ``data.exclude_test_documents`` keeps out of its candidates, taken from the very frames
        evaluation reranks on the test halves of its dataset (``config.evaluated_test_halves``)."""
        evaluated = [self.frames(d)[1:] for d in evaluated_test_halves(self.config, data)]
        return experiment_data.excluded_documents(data.exclude_test_documents, evaluated)

    def unjudged_candidates(self, unjudged: list, min_label: int = 1) -> pd.DataFrame | None:
        """First-stage candidates of a student's unjudged training queries (their qrels are never read), with qids
        prefixed by their dataset id so that no two collections' queries merge into one group."""
        if not unjudged:
            return None
        judged = self.frames(self.config.train, min_label)[0]
        frames = []
        for data in unjudged:
            key = self._unjudged_key(data, min_label)
            if key not in self._frames:
                started = time.perf_counter()
                exclude = judged["qid"] if data.dataset == self.config.train.dataset else ()
                topics = experiment_data.unjudged_topics(data, self.config.sample_seed, exclude)
                res = experiment_data.candidates(data, topics)
                if data.exclude_test_documents is not None:  # inductive: no test document among its candidates
                    res = self._without_test_documents(data, res, key)
                self._frames[key] = (topics, None, res.assign(qid=data.dataset + "#" + res["qid"].astype(str)))
                self.log(f"{data.dataset}: {len(topics)} unjudged training queries"
                         f"{f' ({data.split} half)' if data.split else ''}, {len(res)} candidates "
                         f"({time.perf_counter() - started:.1f}s)")
            frames.append(self._frames[key][2])
        return pd.concat(frames, ignore_index=True)

    def _unjudged_key(self, data, min_label: int) -> str:
        halves = evaluated_test_halves(self.config, data) if data.exclude_test_documents is not None else []
        return memory_key("unjudged", data, halves, self.config.sample_seed, min_label)

    def _without_test_documents(self, data, res: pd.DataFrame, key: str) -> pd.DataFrame:
        documents = self.excluded_documents(data)
        res, removed = experiment_data.without_documents(res, documents)
        self._excluded[key] = {"kind": data.exclude_test_documents, "test_documents": len(documents), **removed}
        which = "judged for" if data.exclude_test_documents == "judged" else "first-stage candidates of"
        self.log(f"{data.dataset} ({data.split} half, inductive): {removed['candidates']} candidates "
                 f"({removed['documents']} documents) left out, of the {len(documents)} documents {which} its "
                 f"evaluated test queries; {removed['queries_emptied']} queries left without candidates")
        return res

    def excluded_test_documents(self, unjudged: list, min_label: int = 1) -> dict:
        """Per unjudged dataset with ``exclude_test_documents``: what its candidates lost (recorded with the
        stage's group statistics, as ``groups.excluded_test_documents`` in done.json)."""
        return {data.dataset: self._excluded[key] for data in unjudged
                if (key := self._unjudged_key(data, min_label)) in self._excluded}

    def _fit(self, trainer, stage: Stage, data, min_label: int, exclude_train: bool = False,
             unjudged: list | None = None) -> dict:
        _, qrels, res = self.frames(data, min_label)
        if exclude_train:  # the data-decoupled control: none of the students' training queries
            students = set(self.frames(self.config.train, min_label)[0]["qid"].astype(str))
            res = res[~res["qid"].astype(str).isin(students)]
            qrels = qrels[~qrels["qid"].astype(str).isin(students)]
            self.log(f"teacher data without the students' {len(students)} queries: {res['qid'].nunique()} queries")
        extra = self.unjudged_candidates(unjudged or [], min_label)
        if extra is not None:  # the trainer makes groups of candidates alone for queries without qrels
            res = pd.concat([res, extra], ignore_index=True)
        va_res = va_qrels = None
        if self.config.validation is not None:
            _, va_qrels, va_res = self.frames(self.config.validation, min_label)
        started = time.perf_counter()
        log = trainer.fit(res, qrels, va_res, va_qrels, resume=True)
        seconds = time.perf_counter() - started
        if "seconds" in log and len(log):  # the trainer's clock carries over a resumed run's earlier steps
            seconds = max(seconds, float(log["seconds"].max()))
        if not stage.model_dir.is_dir() and self.processes.is_main:  # a trainer that does not save by itself
            trainer.reranker.save(stage.model_dir)
            paths.write_atomically(stage.path / "log.csv", lambda tmp: log.to_csv(tmp, index=False))
        stats = getattr(trainer, "group_stats", None)
        groups = asdict(stats) if stats is not None else None
        excluded = self.excluded_test_documents(unjudged or [], min_label)
        if excluded:  # absent otherwise: earlier stages' records keep their shape
            groups = {**(groups or {}), "excluded_test_documents": excluded}
        return {"seconds": seconds, "steps": len(log), "groups": groups,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def teacher(self) -> TrainedModel:
        """Trains the teacher with contrastive learning (or takes it as given); reuses a finished one. A fused
        teacher trains (or takes) each member so, then fits its statistics and weights."""
        if self.config.teacher.kind == "fusion":
            return self.fused_teacher()
        return self._teacher(self.config.teacher, self.out / "teacher")

    def _teacher(self, spec: Teacher, path: Path) -> TrainedModel:
        """One teacher (or member of a fused teacher); a trained one lives in ``path``."""
        cfg = self.config
        identity = self.teacher_spec(spec)
        if spec.train == "none" and spec.kind == "bi-encoder":
            return TrainedModel("teacher", "teacher", "given", None, identity.fingerprint(),
                                loader=lambda: bi_encoder_teacher(spec.model, max_length=spec.max_length,
                                                                  batch_size=spec.batch_size, dtype=spec.dtype))
        if spec.train == "none":
            return TrainedModel("teacher", "teacher", "given", None, identity.fingerprint(),
                                loader=lambda: self.new_reranker(spec))
        data, seed = identity.data, identity.seed
        stage = Stage(path, identity.fingerprint(), f"teacher {spec.name} ({spec.model}, CL)")
        model = TrainedModel("teacher", "teacher", "CL", seed, stage.fingerprint,
                             loader=self._load_saved(stage.model_dir, spec))
        return self._run_stage(model, stage, spec, data, lambda: ContrastiveTrainer(
            self.new_reranker(spec, seed), temperature=cfg.training_args(spec)["temperature"],
            **self._trainer_kwargs(spec, seed, stage, data)), exclude_train=spec.disjoint)

    def fused_teacher(self) -> TrainedModel:
        """``kind: fusion``: each member as a teacher of its own (a trained cross-encoder member has the stage, and
        fingerprint, it would have as the sole teacher: the first in ``teacher/``, later ones in
        ``teacher-<name>/``), then statistics and weights fitted once (:meth:`fusion_fit`). The fused fingerprint
        holds the members' and the fitted numbers: change a member, and every KD student is distilled again."""
        spec = self.config.teacher
        members, trained = {}, []
        for member in spec.members:
            if member.kind == "first-stage":
                scored = [self.config.train, *(d for s in self.config.students for d in s.unjudged)]
                members[member.name] = TrainedModel(member.name, "teacher", "given", None,
                                                    FirstStageMemberSpec(data=scored).fingerprint(),
                                                    loader=FirstStageScore)
                continue
            path = self.out / ("teacher" if not trained and member.train != "none" else f"teacher-{member.name}")
            members[member.name] = model = self._teacher(member, path)
            if model.objective == "CL":
                trained.append(model)
        fit = self.fusion_fit(members)
        fp = FusedTeacherSpec(members={name: m.fingerprint for name, m in members.items()}, weights=fit["weights"],
                              stats={name: list(v) for name, v in fit["stats"].items()}).fingerprint()

        def load() -> ScoreFusion:
            return ScoreFusion({name: m.loader() for name, m in members.items()}, weights=fit["weights"],
                               stats={name: tuple(v) for name, v in fit["stats"].items()})

        # a fused teacher is fitted even when no member trains: the fit is its work, reused or not
        model = TrainedModel("teacher", "teacher", "fused", None, fp, loader=load,
                             log=trained[0].log if trained else None,
                             seconds=sum(m.seconds for m in trained) + fit.get("seconds", 0.0),
                             reused=all(m.reused for m in trained) and fit.get("reused", False))
        self.timings["train teacher"] = model.seconds
        return model

    def fusion_fit(self, members: dict[str, TrainedModel]) -> dict:
        """A fused teacher's member statistics (mean, sd) and weights: fitted once per set of members on the
        validation candidates (the weights on a grid over the simplex, maximising the teacher's validation metric),
        or, with ``weights`` given, only the statistics (on the validation candidates, else on the first 200
        training queries'). Kept in ``teacher-fusion.json``; a rerun with the same members reads them back."""
        cfg, spec = self.config, self.config.teacher
        metric = cfg.training_args(spec)["metric"]
        source = cfg.validation if cfg.validation is not None else cfg.train
        key = FusionFitSpec(teacher=spec, members={name: m.fingerprint for name, m in members.items()}, metric=metric,
                            data=source, on_validation=cfg.validation is not None,
                            sample_seed=cfg.sample_seed).fingerprint()
        path = self.out / "teacher-fusion.json"
        fitted = _read_json(path, self.log)
        if fitted and fitted.get("key") == key:
            return {**fitted, "reused": True}
        _, qrels, res = self.frames(source)
        if cfg.validation is None:  # statistics only (the weights are given): a deterministic few queries suffice
            res = res[res["qid"].astype(str).isin(sorted(res["qid"].astype(str).unique())[:200])]
        fusion = ScoreFusion({name: m.loader() for name, m in members.items()}, metric=metric,
                             grid_step=spec.grid_step)
        started = time.perf_counter()
        fitted = {"key": key, **fitted_fusion(fusion, res, qrels, spec.weights), "fitted_on": data_label(source)}
        del fusion
        _free(True)
        fitted["seconds"] = time.perf_counter() - started
        if self.processes.is_main:
            _write_json(path, fitted)
        weights = ", ".join(f"{name} {w:g}" for name, w in fitted["weights"].items())
        alone = "; ".join(f"{name} alone {v:.3f}" for name, v in fitted.get("alone", {}).items())
        self.log(f"fused teacher: weights {weights} ({'given' if spec.weights else 'fitted'}; statistics from "
                 f"{fitted['queries']} {data_label(source)} queries)"
                 + (f"; {metric} {fitted['value']:.3f} on them, {alone}" if "value" in fitted else ""))
        return fitted

    def student(self, spec: Student, objective: str, seed: int, teacher: TrainedModel) -> TrainedModel:
        """Trains one student with one objective and seed; reuses a finished one."""
        cfg = self.config
        filtered = self.negative_filter(spec) is not None  # then the teacher judges the negatives, for CL too
        identity = self.student_spec(spec, objective, seed, teacher.fingerprint)
        stage = Stage(self.out / "students" / spec.name / objective / f"seed-{seed}", identity.fingerprint(),
                      f"student {spec.name} ({spec.model}, {objective}, seed {seed})")
        model = TrainedModel(f"{spec.name}-{objective}-s{seed}", "student", objective, seed, stage.fingerprint,
                             student=spec.name, loader=self._load_saved(stage.model_dir, spec))
        args = cfg.training_args(spec)

        def trainer():
            kwargs = self._trainer_kwargs(spec, seed, stage, cfg.train)
            if spec.unjudged:  # queries without qrels: groups of candidates, the teacher's scores their target
                kwargs["unjudged"] = "distil"
            if objective == "CL" and not filtered:
                return ContrastiveTrainer(self.new_reranker(spec, seed), temperature=args["temperature"], **kwargs)
            teacher_model = teacher.loader()  # loaded before the student: the seed fixes the student's head
            # a teacher without an identity of its own (a bi-encoder's scorer) is named by the stage's fingerprint
            key = None if can_fingerprint(teacher_model) else teacher.fingerprint
            kwargs.update(teacher_cache=self.teacher_cache, teacher_cache_key=key)  # shared by CL and KD
            if objective == "CL":  # the teacher judges the negatives only; InfoNCE reads the labels
                return ContrastiveTrainer(self.new_reranker(spec, seed), temperature=args["temperature"],
                                          teacher=teacher_model, **kwargs)
            temperature = args["teacher_temperature"]
            if temperature == "auto":
                temperature = self.teacher_temperature(teacher, teacher_model)["temperature"]
            return DistillationTrainer(self.new_reranker(spec, seed), teacher_model,
                                       teacher_temperature=temperature,
                                       student_temperature=args["student_temperature"], **kwargs)

        return self._run_stage(model, stage, spec, cfg.train, trainer)

    @property
    def teacher_cache(self) -> Path:
        """The teacher-score cache: ``<out>/teacher-scores``, or the config's ``teacher_cache`` (another experiment's
        ``teacher-scores/``: its scores of the same teacher and the same pairs are read, the rest scored there)."""
        return Path(self.config.teacher_cache) if self.config.teacher_cache else self.out / "teacher-scores"

    def teacher_temperature(self, teacher: TrainedModel, teacher_model) -> dict:
        """``teacher_temperature: auto``: fitted once per teacher and validation data on the validation candidates,
        kept on disk (written atomically; a file that cannot be read, or was fitted for another teacher or other
        validation data, is fitted again)."""
        path = self.out / "teacher-temperature.json"
        key = TemperatureFitSpec(teacher=teacher.fingerprint, validation=self.config.validation,
                                 sample_seed=self.config.sample_seed).fingerprint()
        fitted = _read_json(path, self.log)
        if isinstance(fitted, dict) and fitted.get("key") == key:
            return fitted
        _, va_qrels, va_res = self.frames(self.config.validation)
        fitted = {"key": key, "teacher": teacher.fingerprint, **fitted_temperature(teacher_model, va_res, va_qrels)}
        if self.processes.is_main:
            _write_json(path, fitted)
        self.log(f"teacher temperature fitted on {fitted['queries']} validation queries: {fitted['temperature']:.3g} "
                 f"(teacher scores spread {fitted['score_sd_within_query']:.3g} sd within a query)")
        return fitted

    def _run_stage(self, model: TrainedModel, stage: Stage, spec: Model, data, make_trainer,
                   exclude_train: bool = False) -> TrainedModel:
        with self.locked():  # Stage.begin deletes what other settings left; the trainer cleans killed writes
            return self._run_stage_locked(model, stage, spec, data, make_trainer, exclude_train)

    def _run_stage_locked(self, model: TrainedModel, stage: Stage, spec: Model, data, make_trainer,
                          exclude_train: bool = False) -> TrainedModel:
        unjudged = getattr(spec, "unjudged", None)
        if stage.is_done(self.log):
            self.log(f"{stage.description}: done already, reusing {stage.model_dir}")
            if self.processes.is_main:
                stage.tidy()
            model.reused = True
        else:
            stage.begin(self.log, self.processes)
            self.log(f"{stage.description}: training")
            min_label = self.config.training_args(spec)["min_label"]
            trainer = make_trainer()
            info = self._fit(trainer, stage, data, min_label, exclude_train, unjudged)
            large = _is_large(trainer.reranker)
            del trainer
            _free(large)
            stage.finish(info, self.processes)
            self.log(f"{stage.description}: trained in {info['seconds']:.1f}s")
        info = stage.info()
        model.seconds, model.groups = float(info.get("seconds", 0.0)), info.get("groups")
        model.log = stage.log_frame()
        self.timings[f"train {model.name}"] = model.seconds
        return model

    def models(self) -> list[TrainedModel]:
        """The teacher, then every student × objective × seed (trained in that order, teacher first)."""
        teacher = self.teacher()
        out = [teacher]
        for seed in self.config.seeds:
            for spec in self.config.students:
                for objective in spec.objectives:
                    out.append(self.student(spec, objective, seed, teacher))
        return out

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, models: list[TrainedModel]) -> list[CollectionResult]:
        return [self.evaluate_collection(label, data, in_domain, models)
                for label, data, in_domain in evaluation_collections(self.config)]

    def evaluate_collection(self, label: str, data, in_domain: bool, models: list[TrainedModel]) -> CollectionResult:
        """One ``pt.Experiment`` over BM25, the teacher and every student, with significance tests."""
        with self.locked():  # stale run files are deleted, new ones written
            return self._evaluate_collection(label, data, in_domain, models)

    def _evaluate_collection(self, label: str, data, in_domain: bool, models: list[TrainedModel]) -> CollectionResult:
        import ir_measures

        ev = self.config.evaluation
        started = time.perf_counter()
        topics, qrels, res = self.frames(data)
        first = pt.Transformer.from_df(res)
        systems = {"BM25": first}
        systems.update({m.name: first >> LazyReranker(m.name, _fast(m.loader) if ev.fast else m.loader)
                        for m in self._table_order(models)})
        prints = {"BM25": EvaluationSpec(data=data, sample_seed=self.config.sample_seed).fingerprint(),
                  **{m.name: EvaluationSpec(data=data, sample_seed=self.config.sample_seed, reranker=m.fingerprint,
                                            fast=ev.fast).fingerprint() for m in models}}
        save_dir = self.out / "runs" / label
        self._drop_stale_runs(save_dir, prints)
        names = list(systems)
        measures = [ir_measures.parse_measure(m) for m in ev.measures]
        self.log(f"evaluating {len(names)} systems on {label}: {len(topics)} queries × {data.depth} candidates")
        table = pt.Experiment(list(systems.values()), topics, qrels, measures, names=names,
                              baseline=names.index(self._baseline_name()), test=ev.test,
                              correction=ev.correction, correction_alpha=ev.alpha, save_dir=str(save_dir),
                              save_mode="reuse", verbose=self.verbose)
        perquery = pd.read_csv(save_dir / "perquery.csv", dtype={"qid": str})
        perquery = perquery[perquery["name"].isin(names)].reset_index(drop=True)
        seconds = time.perf_counter() - started
        self.timings[f"evaluate {label}"] = seconds
        return CollectionResult(label, in_domain, table, perquery, len(topics), data.depth, seconds)

    def evidence(self, collections: list[CollectionResult]) -> list[CollectionResult]:
        """Writes ``perquery.csv.gz`` (:mod:`.evidence`) and returns ``collections`` with the per-query values read
        back from it, so that the report is built from exactly what is committed beside it."""
        path = self.out / evidence.FILE
        evidence.write(self.config, collections, path)
        back = evidence.collections_from(self.config, evidence.read(path), {c.label: c.table for c in collections})
        return [replace(c, perquery=b.perquery) for c, b in zip(collections, back)]

    def _table_order(self, models: list[TrainedModel]) -> list[TrainedModel]:
        """The teacher, then students in config order, CL before KD, seeds in order."""
        students = [s.name for s in self.config.students]

        def key(m: TrainedModel):
            if m.role == "teacher":
                return (-1, 0, 0)
            return (students.index(m.student), ("CL", "KD").index(m.objective), self.config.seeds.index(m.seed))

        return sorted(models, key=key)

    def _baseline_name(self) -> str:
        baseline = self.config.evaluation.baseline
        if baseline in ("BM25", "teacher"):
            return baseline
        return f"{baseline}-s{self.config.seeds[0]}"  # a student's baseline: its run with the first seed

    def _drop_stale_runs(self, save_dir: Path, prints: dict[str, str]) -> None:
        """Deletes run files written under other settings, and what a kill or a full disk left unreadable (a run file
        cut short or emptied, PyTerrier's ``aggregated.csv``/``perquery.csv``, which it reads back and rewrites in
        place), then records the current settings. A run file that ``systems.json`` does not list was not written
        by a run (it lists a system before pt.Experiment writes its file): it is never deleted, nor reused."""
        save_dir.mkdir(parents=True, exist_ok=True)
        recorded = (save_dir / "systems.json").exists()
        known = _read_json(save_dir / "systems.json", self.log)  # None when unreadable: every file recomputed
        for name, fp in prints.items():
            run = save_dir / f"{name}.res.gz"
            if not run.exists():
                continue
            if not recorded or (known is not None and name not in known):
                raise ForeignFiles(f"{run} was not written by this experiment ({save_dir / 'systems.json'} does not "
                                   "list it), and it would be read as the results of its system: move it away, or "
                                   "give the run another output directory (--out DIR)")
            stale = (known is None or known[name] != fp
                     or paths.read_written(run, _nonempty_results, log=self.log) is None)
            if stale:
                self.log(f"{save_dir.name}: recomputing {name} (its settings changed or its run file is broken)")
                run.unlink()
        for table in ("aggregated.csv", "perquery.csv"):  # pt.Experiment keeps other systems' rows from them
            if paths.read_written(save_dir / table, pd.read_csv, log=self.log) is None:
                (save_dir / table).unlink(missing_ok=True)
        _write_json(save_dir / "systems.json", {**(known or {}), **prints})

    # -- everything ------------------------------------------------------------------------------------------
    def run(self) -> ExperimentResult | None:
        """Trains what is not trained yet, evaluates and reports. Under several processes all of them train
        and the main one evaluates and reports; the others return None."""
        started = time.perf_counter()
        with self.locked():
            return self._run(started)

    def _run(self, started: float) -> ExperimentResult | None:
        if self.processes.is_main:
            _write_json(self.out / "config.json", self.config.to_dict())
        self.log(f"experiment {self.config.name!r} → {self.out}")
        models = self.models()
        if not self.processes.is_main:
            return None
        collections = self.evidence(self.evaluate(models))
        report = reporting.write_report(self.config, models, collections, self.out)
        seconds = time.perf_counter() - started
        _write_json(self.out / "timings.json", {
            "total_seconds": seconds, "stages": self.timings,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "python": platform.python_version()},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return ExperimentResult(self.config, self.out, models, collections, report, seconds)


def default_out(config: str | Path | ExperimentConfig) -> Path:
    """``runs/<config name>`` under the working directory."""
    name = config.name if isinstance(config, ExperimentConfig) else load_config(config, check_environment=False).name
    return Path("runs") / name


def run_experiment(config: str | Path | dict | ExperimentConfig, out: str | Path | None = None, *,
                   verbose: bool = True, wait: bool | None = None) -> ExperimentResult | None:
    """Validates ``config`` (a file, dict or :class:`ExperimentConfig`), runs it into ``out``; returns the result.

    ``out`` defaults to ``runs/<config name>``. A rerun into the same directory reuses every finished stage. While
    another run writes to ``out`` this raises :class:`~pyterrier_kdcl.directory_lock.DirectoryLocked`, or waits
    for it with ``wait=True`` (default: the config's ``wait_for_lock``).
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    return ExperimentRunner(cfg, out or default_out(cfg), verbose=verbose, wait=wait).run()


__all__ = ["ExperimentResult", "ExperimentRunner", "LazyReranker", "Stage", "data_label", "default_out",
           "run_experiment"]
