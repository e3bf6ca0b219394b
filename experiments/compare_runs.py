"""One system of one run against one system of another, seed-aware, from their committed per-query evidence.

A run's report compares its own systems (KD with CL, KD with BM25). A variant run that repeats another's design
with one change (cpu-negative-filter repeats cpu-architectures' MiniLM-L6 student with filtered negatives) is
compared with it here: the same collections, queries and seeds are required (runs of the same seed are paired),
and each pair is tested by the report's seed-aware test (crossed query and seed effects; a system run once, such as
BM25 or a given teacher, meets every seed of the other), on every collection and on the pooled queries of each scope,
Holm-corrected within the per-collection rows and within the pooled rows.

    python experiments/compare_runs.py docs/results/cpu-architectures docs/results/cpu-negative-filter \\
        --pair "minilm-l6-mean CL=minilm-l6-filtered CL" --pair "minilm-l6-mean KD=minilm-l6-filtered KD" \\
        --out docs/results/cpu-negative-filter/tables/vs_cpu-architectures.csv

tests/test_committed_comparisons.py rebuilds every committed table of this script from the evidence.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pyterrier_kdcl.experiment import evidence, seed_aware
from pyterrier_kdcl.experiment.statistics import correct, family_alpha, mde_from_se

ALPHA = 0.05
RUN_ONCE = -1  # the seed row of a system run once


def scopes(run: Path) -> dict[str, list[str]]:
    """The run's collections by scope, as its config names them."""
    evaluation = json.loads((run / "config.json").read_text())["evaluation"]
    return {"in domain": [c["name"] for c in evaluation["in_domain"]],
            "out of domain": [c["name"] for c in evaluation["out_of_domain"]]}


def matrix(values: pd.DataFrame, system: str, collections: list[str], measure: str) -> pd.DataFrame:
    """seeds × (collection, qid) of one system's ``measure``."""
    rows = values[(values.system == system) & (values.measure == measure) & values.collection.isin(collections)]
    if rows.empty:
        raise SystemExit(f"no {measure} values for system {system!r} on {collections}: check the --pair names "
                         f"against the 'system' column of perquery.csv.gz")
    seeds = rows.seed.astype("Int64").fillna(RUN_ONCE)  # pivot_table would drop a row without a seed
    return rows.assign(seed=seeds).pivot_table(index="seed", columns=["collection", "qid"], values="value",
                                               aggfunc="first")


def _run_once(values: pd.DataFrame) -> bool:
    """Whether a system's matrix is one row without a seed (BM25, a given teacher): it meets every seed of the other."""
    return list(values.index) == [RUN_ONCE]


def compare(base: Path, variant: Path, pairs: list[tuple[str, str]], measure: str) -> pd.DataFrame:
    """The table: a row per pair and collection, and per pair and pooled scope."""
    if scopes(base) != scopes(variant):
        raise SystemExit(f"{base} and {variant} evaluate different collections: {scopes(base)} vs {scopes(variant)}")
    a_values, b_values = evidence.read(base / "perquery.csv.gz"), evidence.read(variant / "perquery.csv.gz")
    rows = []
    for name_a, name_b in pairs:
        for scope, members in scopes(base).items():
            units = [("collection", [c], c) for c in members]
            units.append(("pooled", members, f"{scope} ({members[0]})" if len(members) == 1
                          else f"{scope} (pooled queries)"))
            for kind, collections, label in units:
                a, b = matrix(a_values, name_a, collections, measure), matrix(b_values, name_b, collections, measure)
                if (not (_run_once(a) or _run_once(b)) and list(a.index) != list(b.index)) \
                        or list(a.columns) != list(b.columns):
                    raise SystemExit(f"{name_a} and {name_b} on {label}: different seeds or queries "
                                     f"({list(a.index)} vs {list(b.index)}; {a.shape[1]} vs {b.shape[1]} queries)")
                c = seed_aware.crossed(a.to_numpy(), b.to_numpy(), alpha=ALPHA)
                rows.append({"A run": base.name, "A": name_a, "B run": variant.name, "B": name_b, "scope": kind,
                             "collection": label,
                             "queries": c.queries, "seeds": c.seeds, "A mean": c.mean_a, "B mean": c.mean_b,
                             "B-A": c.mean_difference,
                             "per seed B-A": " ".join(f"{x:+.4f}" for x in c.per_seed),
                             "95% CI low (seed-aware t, uncorrected)": c.ci_low,
                             "95% CI high (seed-aware t, uncorrected)": c.ci_high,
                             "p (seed-aware t)": c.p, "se": c.se, "df": c.df})
    table = pd.DataFrame(rows)
    for _, family in table.groupby("scope"):
        table.loc[family.index, "p (holm)"] = correct(family["p (seed-aware t)"].to_numpy(), "holm", ALPHA)
        level = family_alpha(ALPHA, "holm", len(family))
        table.loc[family.index, "MDE (80% power)"] = [mde_from_se(se, df, level) for se, df in
                                                      zip(family["se"], family["df"])]
    table["significant"] = table["p (holm)"] < ALPHA
    table["measure"] = measure
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the run whose systems are A")
    parser.add_argument("variant", type=Path, help="the run whose systems are B")
    parser.add_argument("--pair", action="append", required=True, metavar="A=B",
                        help="a system of the base run and the system of the variant run it is compared with")
    parser.add_argument("--measure", default="nDCG@10")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write (a .md beside it)")
    args = parser.parse_args(argv)
    pairs = [tuple(part.strip() for part in p.split("=", 1)) for p in args.pair]
    table = compare(args.base, args.variant, pairs, args.measure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    shown = table.drop(columns=["se", "df"]).round(4)
    args.out.with_suffix(".md").write_text(shown.to_markdown(index=False) + "\n")
    print(shown[shown.scope == "pooled"].to_string(index=False))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
