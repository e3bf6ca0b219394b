"""A run's trained students interpolated with the first stage they rerank, and what that recovers, seed-aware.

A reranker that loses to BM25 out of domain may still hold what BM25 lacks: the usual remedy in deployment is to
keep the first stage's score in the final one. Each student of a finished run (every objective and seed) becomes
``ScoreFusion({"BM25": FirstStageScore(), "reranker": student})``, its standardisation and its weight fitted on the
run's own validation candidates (the in-domain dev queries, as the run's fused teacher was): nothing is fitted
on a test collection. Its test runs are built from the run files the experiment saved (``runs/<collection>/``),
so no test pair is scored again: only the dev candidates are.

Writes to ``--out`` (a directory beside the run's in docs/results):

* ``perquery.csv.gz``: the interpolated systems' per-query values (the evidence format, systems named
  ``"<student> <objective> + BM25"``), and ``config.json``: the run's, so the comparisons see its collections;
* ``fits.csv``: each model's fitted weights and statistics, and the dev measure of BM25, the student and the fusion;
* ``tables/vs_<run>.csv``: each interpolated system against BM25 and against its student alone, and
  ``tables/vs_itself.csv``: KD + BM25 against CL + BM25, all by experiments/compare_runs.py's seed-aware test
  (tests/test_committed_comparisons.py rebuilds them from the evidence).

    python experiments/interpolation.py experiments/cpu-architectures.yaml --run runs/cpu-architectures \\
        --results docs/results/cpu-architectures --out docs/results/cpu-architectures-interpolated
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import ir_measures
import numpy as np
import pandas as pd
import pyterrier as pt

from pyterrier_kdcl.experiment import evidence
from pyterrier_kdcl.experiment.config import evaluation_collections, load_config
from pyterrier_kdcl.experiment.runner import ExperimentRunner, Stage, _fast
from pyterrier_kdcl.fusion import FirstStageScore, ScoreFusion

FIRST_STAGE = "BM25"


def _compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).with_name("compare_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SavedScores(pt.Transformer):
    """Scores rows with what a run file holds for their (qid, docno): a reranker's saved test run, replayed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        res = pt.io.read_results(str(self.path))
        self.scores = res.assign(qid=res.qid.astype(str), docno=res.docno.astype(str))[["qid", "docno", "score"]]

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        out = inp.drop(columns=["score", "rank"], errors="ignore").assign(qid=inp.qid.astype(str),
                                                                          docno=inp.docno.astype(str))
        out = out.merge(self.scores, on=["qid", "docno"], how="left")
        if out.score.isna().any():
            raise SystemExit(f"{self.path} has no score for {int(out.score.isna().sum())} of the rows it must replay: "
                             "it is not the run of these candidates")
        return out


def students(runner: ExperimentRunner) -> list[dict]:
    """Every finished student of the run: name as in its run files, system as in its report, seed, loader."""
    out, cfg = [], runner.config
    for seed in cfg.seeds:
        for spec in cfg.students:
            for objective in spec.objectives:
                stage = Stage(runner.out / "students" / spec.name / objective / f"seed-{seed}", "", "")
                if not (stage.path / "done.json").exists():
                    raise SystemExit(f"{stage.path} is not finished: run the experiment first")
                loader = runner._load_saved(stage.model_dir, spec)
                out.append({"name": f"{spec.name}-{objective}-s{seed}", "system": f"{spec.name} {objective}",
                            "student": spec.name, "objective": objective, "seed": seed,
                            "loader": _fast(loader) if cfg.evaluation.fast else loader})
    return out


def fit(model: dict, runner: ExperimentRunner) -> tuple[ScoreFusion, dict]:
    """The interpolation of ``model`` with the first stage, fitted on the run's validation candidates."""
    cfg = runner.config
    _, qrels, res = runner.frames(cfg.validation)
    fusion = ScoreFusion({FIRST_STAGE: FirstStageScore(), "reranker": model["loader"]()},
                         metric=cfg.evaluation.main_measure)
    grid = fusion.fit(res, qrels)
    alone = {name: float(grid.loc[grid[name] == 1.0, fusion.metric].iloc[0]) for name in fusion.scorers}
    row = {"system": model["system"], "seed": model["seed"],
           **{f"weight {name}": w for name, w in fusion.weights.items()},
           **{f"{stat} {name}": v for name, s in fusion.stats.items() for stat, v in zip(("mean", "std"), s)},
           f"dev {fusion.metric} BM25": alone[FIRST_STAGE], f"dev {fusion.metric} reranker": alone["reranker"],
           f"dev {fusion.metric} fused": float(grid[fusion.metric].max())}
    return fusion, row


def replayed(fusion: ScoreFusion, saved: Path, first_stage: pd.DataFrame) -> pd.DataFrame:
    """The fitted interpolation's test run, from the reranker's saved run over the same candidates."""
    offline = ScoreFusion({FIRST_STAGE: FirstStageScore(), "reranker": SavedScores(saved)}, fusion.weights,
                          fusion.stats, metric=fusion.metric)
    return offline(first_stage)


def per_query(run: pd.DataFrame, qrels: pd.DataFrame, measures: list[str]) -> pd.DataFrame:
    qrels = pd.DataFrame({"query_id": qrels.qid.astype(str), "doc_id": qrels.docno.astype(str),
                          "relevance": qrels.label.astype(int)})
    run = pd.DataFrame({"query_id": run.qid.astype(str), "doc_id": run.docno.astype(str), "score": run.score})
    parsed = [ir_measures.parse_measure(m) for m in measures]
    rows = [{"qid": m.query_id, "measure": str(m.measure), "value": m.value}
            for m in ir_measures.iter_calc(parsed, qrels, run)]
    return pd.DataFrame(rows)


def interpolate(config: Path, run_dir: Path, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    cfg = load_config(config, check_environment=False)
    runner = ExperimentRunner(cfg, run_dir, verbose=True)
    collections = {}  # label -> (topics, their qrels, the first stage's saved run with the query text)
    for label, data, _ in evaluation_collections(cfg):
        topics, qrels, _ = runner.frames(data)
        first_stage = pt.io.read_results(str(run_dir / "runs" / label / f"{FIRST_STAGE}.res.gz"))
        collections[label] = (topics, qrels[qrels.qid.isin(topics.qid)],
                              first_stage.merge(topics[["qid", "query"]], on="qid"))
    fits, values = [], []
    for model in students(runner):
        fusion, row = fit(model, runner)
        fits.append(row)
        print(f"[interpolation] {model['name']}: weights {fusion.weights}, dev {row}", flush=True)
        for label, (topics, qrels, first_stage) in collections.items():
            run = replayed(fusion, run_dir / "runs" / label / f"{model['name']}.res.gz", first_stage)
            pq = per_query(run, qrels, cfg.evaluation.measures)
            if set(pq.qid) != set(topics.qid.astype(str)):  # a query without judged answers among its candidates
                missing = sorted(set(topics.qid.astype(str)) - set(pq.qid))
                pq = pd.concat([pq, pd.DataFrame([{"qid": q, "measure": m, "value": 0.0} for q in missing
                                                  for m in cfg.evaluation.measures])])
            values.append(pq.assign(collection=label, system=f"{model['system']} + {FIRST_STAGE}",
                                    seed=model["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "config.json", out / "config.json")
    frame = pd.concat(values)[evidence.COLUMNS]
    frame["value"] = frame["value"].round(evidence.DECIMALS)
    frame.to_csv(out / evidence.FILE, index=False)
    pd.DataFrame(fits).to_csv(out / "fits.csv", index=False)
    return frame, pd.DataFrame(fits)


def tables(cfg, results: Path, out: Path) -> None:
    """The seed-aware comparisons: each interpolated system against BM25 and its student alone (from the run's
    committed evidence), and KD + BM25 against CL + BM25 for each student trained with both."""
    compare, measure = _compare_runs().compare, cfg.evaluation.main_measure
    (out / "tables").mkdir(parents=True, exist_ok=True)
    systems = [f"{s.name} {o}" for s in cfg.students for o in s.objectives]
    pairs = [(FIRST_STAGE, f"{s} + {FIRST_STAGE}") for s in systems] + [(s, f"{s} + {FIRST_STAGE}") for s in systems]
    written = {f"vs_{results.name}": compare(results, out, pairs, measure)}
    both = [s.name for s in cfg.students if {"CL", "KD"} <= set(s.objectives)]
    if both:
        written["vs_itself"] = compare(out, out, [(f"{s} CL + {FIRST_STAGE}", f"{s} KD + {FIRST_STAGE}")
                                                  for s in both], measure)
    for stem, table in written.items():
        table.to_csv(out / "tables" / f"{stem}.csv", index=False)
        shown = table.drop(columns=["se", "df"]).round(4)
        (out / "tables" / f"{stem}.md").write_text(shown.to_markdown(index=False) + "\n")
        print(shown[shown.scope == "pooled"].to_string(index=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the run's experiment config")
    parser.add_argument("--run", type=Path, required=True, help="the run's output directory (students, run files)")
    parser.add_argument("--results", type=Path, required=True, help="the run's committed report directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from --out's evidence")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, check_environment=False)
    if not args.tables_only:
        interpolate(args.config, args.run, args.out)
    tables(cfg, args.results, args.out)
    (args.out / "command.json").write_text(json.dumps({"config": str(args.config), "run": str(args.run),
                                                       "results": str(args.results)}, indent=1) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
