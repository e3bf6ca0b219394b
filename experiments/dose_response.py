"""KD − CL against the teacher's margin over CL, over every verified run (issue 22 item 5).

Reads the pooled rows of tables/kd_vs_cl.csv and tables/teacher_vs_cl.csv of every docs/results/<run>/ that has
its per-query evidence (make test's `kdcl verify` rechecks those tables against it), and writes
docs/results/dose-response/{dose_response.csv,dose_response.png} and, from 3 points with several seeds on, fit.csv
(a weighted line; see fit()). With several seeds a row's interval is the
seed-aware test's; with one seed it is the paired t over queries and is marked so.

    python experiments/dose_response.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
OUT = RESULTS / "dose-response"


def _pooled(table: pd.DataFrame, difference: str) -> pd.DataFrame:
    low = next(c for c in table.columns if c.startswith("95% CI low"))
    high = next(c for c in table.columns if c.startswith("95% CI high"))
    rows = table[table["scope"] == "pooled"]
    return rows[["student", "collection", "in_domain", "seeds", difference, low, high]].rename(
        columns={difference: "diff", low: "low", high: "high"})


def collect() -> pd.DataFrame:
    frames = []
    runs = [p.parent for p in RESULTS.glob("*/perquery.csv.gz") if (p.parent / "report.md").exists()]
    for run in sorted(runs, key=_finished):
        kd = _pooled(pd.read_csv(run / "tables" / "kd_vs_cl.csv"), "KD-CL")
        teacher = _pooled(pd.read_csv(run / "tables" / "teacher_vs_cl.csv"), "teacher-CL")
        both = kd.merge(teacher, on=["student", "collection", "in_domain", "seeds"], suffixes=(" KD-CL",
                                                                                              " teacher-CL"))
        if not both.empty:  # a run whose students trained with CL alone has no KD − CL
            frames.append(both.assign(run=run.name))
    table = pd.concat(frames, ignore_index=True)
    return once(table[["run", "student", "collection", "in_domain", "seeds", "diff teacher-CL", "low teacher-CL",
                       "high teacher-CL", "diff KD-CL", "low KD-CL", "high KD-CL"]])


def _finished(run: Path) -> tuple[str, str]:
    """When the run finished (its timings.json), then its name: the order in which runs are read."""
    timings = run / "timings.json"
    return (json.loads(timings.read_text()).get("finished_at", "") if timings.exists() else "", run.name)


def once(table: pd.DataFrame) -> pd.DataFrame:
    """Each point once: a run that reused another's students and teacher by their stage fingerprints (the same
    training runs on the same test queries) has the same rows to the last digit; the run that finished first keeps
    them and ``same in`` names the others."""
    values = ["student", "collection", "seeds", "diff teacher-CL", "low teacher-CL", "high teacher-CL", "diff KD-CL",
              "low KD-CL", "high KD-CL"]
    runs = table.groupby(values, sort=False)["run"].agg(list)
    kept = table.drop_duplicates(values).copy()
    kept["same in"] = [" ".join(runs[tuple(row)][1:]) for row in kept[values].itertuples(index=False)]
    return kept.reset_index(drop=True)


def fit(table: pd.DataFrame) -> dict | None:
    """KD − CL = a + b · (teacher − CL) over the points with several seeds, each weighted by its KD − CL interval
    (weighted least squares; the teacher's margin is taken as exact, which it is not). None below 3 points."""
    from scipy import stats

    points = table[table["seeds"] > 1]
    if len(points) < 3:
        return None
    x, y = points["diff teacher-CL"].to_numpy(), points["diff KD-CL"].to_numpy()
    se = (points["high KD-CL"] - points["low KD-CL"]).to_numpy() / (2 * 1.96)
    w = 1 / se**2
    design = np.column_stack([np.ones_like(x), x])
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    a, b = cov @ design.T @ (w * y)
    df = len(points) - 2
    half = stats.t.ppf(0.975, df) * np.sqrt(cov[1, 1]) if df > 0 else float("inf")
    return {"points": len(points), "runs": int(points["run"].nunique()), "slope": b, "slope low": b - half,
            "slope high": b + half, "intercept": a, "df": df}


def main() -> None:
    table = collect()
    OUT.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT / "dose_response.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row in table.to_dict("records"):
        colour = "tab:blue" if row["in_domain"] else "tab:orange"
        marker = "o" if row["seeds"] > 1 else "x"
        x, y = row["diff teacher-CL"], row["diff KD-CL"]
        ax.errorbar(x, y, xerr=[[x - row["low teacher-CL"]], [row["high teacher-CL"] - x]],
                    yerr=[[y - row["low KD-CL"]], [row["high KD-CL"] - y]], fmt=marker, color=colour, capsize=3)
        ax.annotate(f"{row['run']} {row['student']} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})", (x, y),
                    fontsize=6,
                    textcoords="offset points", xytext=(5, 5))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axvline(0, color="grey", linewidth=0.8)
    lims = np.array([min(0, table["low teacher-CL"].min()), table["high teacher-CL"].max()])
    ax.plot(lims, lims, color="grey", linestyle=":", linewidth=0.8, label="KD − CL = teacher − CL")
    ax.set(xlabel="teacher − CL (nDCG@10)", ylabel="KD − CL (nDCG@10)",
           title="blue: in domain, orange: out of domain; o: several seeds (seed-aware), x: one seed")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "dose_response.png", dpi=110)
    print(table.to_string())
    line = fit(table)
    if line is not None:
        pd.DataFrame([line]).to_csv(OUT / "fit.csv", index=False)
        print(f"weighted fit over {line['points']} points of {line['runs']} runs: slope {line['slope']:+.3f} "
              f"[{line['slope low']:+.3f}, {line['slope high']:+.3f}] (95%, t with {line['df']} df)")


if __name__ == "__main__":
    main()
