"""KD − CL against the teacher's margin over CL, over every verified run (issue 22 item 5).

Reads the pooled rows of tables/kd_vs_cl.csv and tables/teacher_vs_cl.csv of every docs/results/<run>/ that has
its per-query evidence (make test's `kdcl verify` rechecks those tables against it), and writes
docs/results/dose-response/{dose_response.csv,dose_response.png}. With several seeds a row's interval is the
seed-aware test's; with one seed it is the paired t over queries and is marked so.

    python experiments/dose_response.py
"""

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
    for run in sorted(p.parent for p in RESULTS.glob("*/perquery.csv.gz")):
        kd = _pooled(pd.read_csv(run / "tables" / "kd_vs_cl.csv"), "KD-CL")
        teacher = _pooled(pd.read_csv(run / "tables" / "teacher_vs_cl.csv"), "teacher-CL")
        both = kd.merge(teacher, on=["student", "collection", "in_domain", "seeds"], suffixes=(" KD-CL",
                                                                                              " teacher-CL"))
        frames.append(both.assign(run=run.name))
    table = pd.concat(frames, ignore_index=True)
    return table[["run", "student", "collection", "in_domain", "seeds", "diff teacher-CL", "low teacher-CL",
                  "high teacher-CL", "diff KD-CL", "low KD-CL", "high KD-CL"]]


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
        ax.annotate(f"{row['run']} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})", (x, y), fontsize=7,
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


if __name__ == "__main__":
    main()
