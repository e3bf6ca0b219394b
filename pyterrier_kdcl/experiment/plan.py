"""What a config will run, and roughly what it costs, before anything runs (``kdcl experiment --check``).

On a CPU, evaluation costs as much as training: every reranker scores queries × depth pairs per collection.
The plan counts the (query, document) pairs each step scores or trains on, and for the packaged models
estimates CPU minutes from speeds measured on 2-core CPU VMs (fp32, and bf16 where the CPU has it natively) — a
guide for sizing a config, not a promise. Counts use the sampled query numbers (or ir_datasets' query counts when
a collection is used whole), so they are upper bounds: queries without a judged positive among the candidates
are skipped.
"""

from __future__ import annotations

import itertools
import math

from pyterrier_kdcl.experiment.config import ExperimentConfig, Model, evaluation_collections, fusion_members

# pairs per second at max_length 128 on the 2-core CPU: (inference, training incl. backward and AdamW);
# the MiniLM figures as measured after the document pre-cut and fused AdamW (2026-11-27; MiniLM-L3's training
# again on 2026-11-29: a median step of 32 pairs took 0.93-1.05 s in cpu-recipes), the others before
CPU_PAIRS_PER_SECOND = {
    "minilm-l3": (70.0, 32.0),
    "minilm-l6": (47.0, 15.0),
    "mpnet-base": (7.0, 1.9),
    "gemma3-270m": (6.8, 1.5),  # benchmarks/results/2026-12-04-bf16-*-gemma3-270m.txt (earlier estimates: 3.5, 1.2)
    # e5-small (multilingual-e5-small, 12 layers, 384 wide): benchmarks/bf16_scoring.py and bf16_training.py
    # (2026-12-04 20:36, quiet; benchmarks/results/2026-12-04-*-e5-small.txt): 200 pairs scored, 4 steps of 32 trained
    "e5-small": (31.1, 8.2),
}


# The same in bf16 on a CPU with native bfloat16 (AVX512-BF16 or AMX): training under ``precision: bf16`` (autocast
# over float32 master weights; mpnet-base with LoRA), inference for a model held in bf16 (``dtype: bf16``). Measured
# in docs/results/cpu-architectures (2026-12-04, a 2-core AMD EPYC with AVX512-BF16): the median step of its
# training logs, and its validations. Elsewhere bf16 is emulated and the float32 figures stand.
CPU_BF16_PAIRS_PER_SECOND = {
    "minilm-l6": (None, 26.0),
    "mpnet-base": (20.0, 4.9),
    # gemma-3-270m with LoRA, its frozen weights held in bf16: benchmarks/bf16_training.py (2026-12-04, 4 steps of
    # 32 pairs, seed 1, quiet CPU): 4.32 pairs/s against 1.53 in float32; scoring 200 man-page pairs in bf16 19.7
    # pairs/s against 6.6 in float32 (the same day)
    "gemma3-270m": (19.7, 4.3),
    "e5-small": (90.4, 16.5),  # measured as in CPU_PAIRS_PER_SECOND
}
_HALF = {"bf16", "bfloat16"}

_COUNT_CAP = 1_000_000

# The spread of KD − CL (nDCG@10) between training runs (seed), between queries and their interaction (residual),
# as docs/results/cpu-seeds estimated it for MiniLM-L6 + LoRA students of a fused teacher (pooled rows; the seed-aware
# test's variance components; tests/test_experiment.py checks them against that run's evidence). A plan for other
# students and data can only borrow them: a guide to how many seeds a comparison needs, not a promise.
PLANNING_SPREADS = {
    True: {"seed_sd": 0.0234, "query_sd": 0.0493, "residual_sd": 0.1874},    # in domain (man pages)
    False: {"seed_sd": 0.0777, "query_sd": 0.1200, "residual_sd": 0.2033},   # out of domain (FAQs, pooled)
}
TARGET_MDE = 0.03


def _queries(data) -> int | None:
    if data.queries is not None:
        return data.queries
    count = _all_queries(data)
    return count if count is None or data.split is None else count // 2  # a split is half of the queries


def _all_queries(data) -> int | None:
    try:
        import ir_datasets

        import pyterrier_kdcl.offline.datasets  # noqa: F401 — irds:kdcl/... resolve even without the entry point

        dataset = ir_datasets.load(data.dataset.removeprefix("irds:"))
        count = dataset.queries_count()
        if count is None:  # datasets registered from local files carry no counts: count (up to a cap)
            count = sum(1 for _ in itertools.islice(dataset.queries_iter(), _COUNT_CAP))
        return count
    except Exception:
        return None


def _unjudged_queries(cfg: ExperimentConfig, student) -> int | None:
    """How many unjudged training queries ``student`` adds (an estimate when a collection is used whole)."""
    total = 0
    for data in student.unjudged:
        n = data.queries
        if n is None:
            n = _queries(data)
            if n is None:
                return None
            if data.dataset == cfg.train.dataset:
                n -= _queries(cfg.train) or 0
        total += max(n, 0)
    return total


def _speed(model: Model, training: bool, precision: str = "fp32") -> float | None:
    """Pairs/s of ``model`` on the 2-core CPU: in bf16 where the model or its training asks for it and the CPU has
    native bfloat16 (``CPU_BF16_PAIRS_PER_SECOND``), else float32's."""
    which = 1 if training else 0
    speed = None
    if model.dtype in _HALF or (training and precision in _HALF | {"auto"}):  # "auto" is bf16 where native
        from pyterrier_kdcl.fast import native_bfloat16

        if native_bfloat16():
            speed = CPU_BF16_PAIRS_PER_SECOND.get(model.model, (None, None))[which]
    if speed is None:
        speed = CPU_PAIRS_PER_SECOND.get(model.model, (None, None))[which]
    if speed is None:
        return None
    # attention is a small share at these lengths: cost grows about linearly with the tokens per pair
    return speed * 128 / max(model.max_length, 64)


def _minutes(pairs: int | None, speed: float | None) -> float | None:
    return None if pairs is None or speed is None else pairs / speed / 60


def _scorers(teacher) -> list[Model]:
    """The models that score when the teacher scores: itself, or a fused teacher's members (the first stage's
    score costs nothing)."""
    if teacher.kind != "fusion":
        return [teacher]
    return [m for m in teacher.members if m.kind != "first-stage"]


def _scoring_minutes(models: list[Model], pairs: int | None) -> float | None:
    """Minutes for every model in ``models`` to score ``pairs`` pairs (a fused teacher: the sum of its members)."""
    minutes = [_minutes(pairs, _speed(m, False)) for m in models]
    return None if None in minutes else sum(minutes)


def plan(cfg: ExperimentConfig, target_mde: float = TARGET_MDE) -> str:
    """A table of steps with pair counts and rough CPU minutes."""
    rows: list[tuple[str, int | None, float | None]] = []
    n_val = _queries(cfg.validation) if cfg.validation else 0
    val_depth = cfg.validation.depth if cfg.validation else 0

    def training_rows(label: str, model: Model, data, objective: str, seeds: int, extra: int | None = 0) -> None:
        args = cfg.training_args(model)
        n = _queries(data)
        n = None if n is None or extra is None else n + extra
        pairs = None if n is None else n * args["group_size"] * args["epochs"]
        steps = None if n is None else math.ceil(n / args["batch_size"]) * args["epochs"]
        validations = 0
        if cfg.validation and steps:
            validations = args["epochs"] if not args["validate_every"] else math.ceil(steps / args["validate_every"])
        val_pairs = None if n_val is None else n_val * val_depth * validations
        train_min = _minutes(pairs, _speed(model, True, args["precision"]))
        val_min = _minutes(val_pairs, _speed(model, False))
        total = None if train_min is None or val_min is None else (train_min + val_min) * seeds
        count = None if pairs is None else (pairs + (val_pairs or 0)) * seeds
        times = f" × {seeds} seeds" if seeds > 1 else ""
        added = f" (with {extra} unjudged queries)" if extra else ""
        stops = f"; at most: patience {args['patience']} may stop it early" if args["patience"] is not None else ""
        rows.append((f"train {label} ({model.model}, {objective}{added}){times}: {pairs} pairs, {validations} "
                     f"validations of {val_pairs if validations else 0} pairs{stops}", count, total))

    teacher = cfg.teacher
    if teacher.kind == "fusion":
        trained = [m for m in fusion_members(teacher) if m.kind == "cross-encoder" and m.train != "none"]
        for member in trained:
            training_rows(f"teacher member {member.name}", member, member.data or cfg.train, "CL", 1)
        data = cfg.validation or cfg.train
        n = _queries(data) if cfg.validation or not teacher.weights else min(_queries(data) or 0, 200)
        pairs = None if n is None else n * data.depth
        scorers = _scorers(teacher)
        rows.append((f"fit the fused teacher on {'validation' if cfg.validation else 'training'} candidates "
                     f"({len(teacher.members)} members, {len(scorers)} scoring)",
                     None if pairs is None else pairs * len(scorers), _scoring_minutes(scorers, pairs)))
    elif teacher.train != "none":
        training_rows("teacher", teacher, teacher.data or cfg.train, "CL", 1)
    # scores another experiment's cache may hold already (``teacher_cache``): counted in full, an upper bound
    shared = f"; read first from teacher_cache {cfg.teacher_cache}" if cfg.teacher_cache else ""
    filtered = [s for s in cfg.students if cfg.training_args(s).get("negative_filter")]
    if filtered:  # the teacher scores every candidate once; the KD groups of these students are among them
        n = _queries(cfg.train)
        extra = [_unjudged_queries(cfg, s) for s in filtered if "KD" in s.objectives]
        n = None if n is None or None in extra else n + sum(extra)
        pairs = None if n is None else n * cfg.train.depth
        scorers = _scorers(teacher)
        rows.append((f"teacher scores of every training candidate for negative_filter (cached; shared by the CL and "
                     f"KD runs of {len(filtered)} students{shared})", pairs, _scoring_minutes(scorers, pairs)))
    kd_students = [s for s in cfg.students if "KD" in s.objectives and s not in filtered]
    if kd_students:
        args = cfg.training_args(kd_students[0])
        n = _queries(cfg.train)
        extra = [_unjudged_queries(cfg, s) for s in kd_students]
        n = None if n is None or None in extra else n + sum(extra)
        pairs = None if n is None else n * args["group_size"] * args["epochs"] * len(cfg.seeds)
        scorers = _scorers(teacher)
        rows.append((f"teacher scores for distillation (cached; shared by {len(kd_students)} students{shared})"
                     + (f"; {len(scorers)} fused members score each pair" if teacher.kind == "fusion" else ""),
                     pairs, _scoring_minutes(scorers, pairs)))
    for s in cfg.students:
        for objective in s.objectives:
            training_rows(s.name, s, cfg.train, objective, len(cfg.seeds), _unjudged_queries(cfg, s))
    rerankers = [teacher] + [s for s in cfg.students for _ in s.objectives for _ in cfg.seeds]
    scorers = _scorers(teacher) + rerankers[1:]  # a fused teacher reranks by running each member
    for label, data, in_domain in evaluation_collections(cfg):
        n = _queries(data)
        pairs = None if n is None else n * data.depth
        total = _scoring_minutes(scorers, pairs)
        where = "in domain" if in_domain else "out of domain"
        rows.append((f"evaluate on {label} ({where}): {n} queries × {data.depth} candidates × {len(rerankers)} "
                     "rerankers", None if pairs is None else pairs * len(rerankers), total))
    lines = [f"{'pairs':>10}  {'~CPU min':>8}  step"]
    for text, pairs, minutes in rows:
        shown = "?" if minutes is None else f"{minutes:.1f}"
        lines.append(f"{'?' if pairs is None else pairs:>10}  {shown:>8}  {text}")
    known = [m for _, _, m in rows if m is not None]
    if len(known) == len(rows):
        stopping = any("at most:" in text for text, _, _ in rows)
        at_most = "; at most, where early stopping ends a run sooner" if stopping else ""
        lines.append(f"\nabout {sum(known):.0f} CPU minutes in all (2-core CPU, {_precisions()}; plus model loading"
                     f"{at_most})")
        cached = sum(m for text, _, m in rows if shared and shared in text)
        if cached:
            lines.append(f"  of which {cached:.1f} score teacher pairs: none where teacher_cache holds them already")
    else:
        lines.append("\n'?': no CPU speed on record for that model (or no query count); run it to find out")
    lines += power_lines(cfg, target_mde)
    return "\n".join(lines)


def _precisions() -> str:
    from pyterrier_kdcl.fast import native_bfloat16

    emulated = "" if native_bfloat16() else ", no native bf16 here: fp32's figures"
    return f"fp32; bf16 where a config asks for it, and for training at precision auto{emulated}"


def power_lines(cfg: ExperimentConfig, target_mde: float = TARGET_MDE) -> list[str]:
    """The KD − CL minimum detectable effect the seed-aware test is expected to have per pooled scope, and the
    seeds that would reach ``target_mde``, from :data:`PLANNING_SPREADS` (:func:`.seed_aware.planned_mde`)."""
    from pyterrier_kdcl.experiment import seed_aware, statistics

    if not any({"CL", "KD"} <= set(s.objectives) for s in cfg.students):
        return []
    ev = cfg.evaluation
    collections = evaluation_collections(cfg)
    scopes = [(in_domain, [_queries(d) for _, d, inside in collections if inside == in_domain])
              for in_domain in (True, False) if any(inside == in_domain for _, _, inside in collections)]
    level = statistics.family_alpha(ev.alpha, ev.correction, len(scopes))
    seeds = len(cfg.seeds)
    lines = [f"\nKD − CL power (seed-aware test at α {level:g}, 80% power; spreads as docs/results/cpu-seeds "
             "measured them):"]
    for in_domain, counts in scopes:
        where = "in domain" if in_domain else "out of domain"
        if None in counts:
            lines.append(f"  {where}: ? (no query count)")
            continue
        spreads, n = PLANNING_SPREADS[in_domain], sum(counts)
        if seeds == 1:
            mde = "none: one seed cannot tell the objective from the training run"
        else:
            mde = f"MDE {seed_aware.planned_mde(seeds, n, alpha=level, **spreads):.3f}"
        needed = seed_aware.seeds_for_mde(target_mde, n, alpha=level, **spreads)
        reach = f"{needed} seeds reach {target_mde:g}" if needed else f"more than 50 seeds to reach {target_mde:g}"
        lines.append(f"  {where} ({n} queries, {seeds} seed{'s' if seeds > 1 else ''}): {mde}; {reach}")
    return lines
