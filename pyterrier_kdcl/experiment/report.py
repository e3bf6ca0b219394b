"""The experiment's tables, plots and verdict, from its evaluation results and training logs.

Written under the output directory:

- ``tables/<collection>.csv|md``: pt.Experiment's table per collection (every system and seed, with the paired
  test against the baseline, its multiple-testing correction and the counts of queries improved/degraded);
- ``tables/<collection>.mean.csv|md``: mean ± standard deviation over seeds per system;
- ``tables/summary.csv|md``: the paper's shape (rows: student × objective; columns: in-domain collections,
  each out-of-domain collection, out-of-domain mean) for the main measure;
- ``tables/kd_vs_cl.csv|md``: KD − CL per student and collection, with a 95% confidence interval and a paired
  test over queries (each query's measure averaged over seeds), per collection and pooled in/out of domain;
- ``plots/kd_minus_cl.png`` and ``plots/training_curves.png``; ``report.md`` with all of it and the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

IN_DOMAIN, OUT_OF_DOMAIN = "in domain", "out of domain"


@dataclass
class Report:
    summary: pd.DataFrame
    summary_markdown: str
    kd_vs_cl: pd.DataFrame
    verdict: str
    files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.summary_markdown}\n\n{self.verdict}"


# -- systems ---------------------------------------------------------------------------------------------------
def system_groups(config) -> list[dict]:
    """Every row of the summary: its label, student, objective, and its system names (one per seed)."""
    teacher = "teacher" if config.teacher.name == "teacher" else f"teacher {config.teacher.name}"
    rows = [{"system": "BM25", "student": None, "objective": None, "names": ["BM25"]},
            {"system": teacher, "student": None, "objective": "CL" if config.teacher.train != "none" else "given",
             "names": ["teacher"]}]
    for s in config.students:
        for o in s.objectives:
            rows.append({"system": f"{s.name} {o}", "student": s.name, "objective": o,
                         "names": [f"{s.name}-{o}-s{seed}" for seed in config.seeds]})
    return rows


def _measure(name: str) -> str:
    import ir_measures

    return str(ir_measures.parse_measure(name))


# -- tables ----------------------------------------------------------------------------------------------------
def mean_table(config, result) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every measure, per system, on one collection."""
    measures = [_measure(m) for m in config.evaluation.measures]
    table = result.table.set_index("name")
    rows = []
    for group in system_groups(config):
        values = table.loc[[n for n in group["names"] if n in table.index], measures]
        row = {"system": group["system"], "seeds": len(values)}
        for m in measures:
            row[m] = values[m].mean()
            row[f"{m} std"] = values[m].std(ddof=1) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(config, collections) -> pd.DataFrame:
    """Main measure per system × collection (mean and std over seeds), and the out-of-domain mean."""
    main = _measure(config.evaluation.main_measure)
    means = {c.label: c.table.set_index("name")[main] for c in collections}
    ood = [c.label for c in collections if not c.in_domain]
    rows = []
    for group in system_groups(config):
        row = {"system": group["system"], "student": group["student"], "objective": group["objective"]}
        for c in collections:
            values = [means[c.label][n] for n in group["names"] if n in means[c.label].index]
            row[c.label], row[f"{c.label} std"] = _mean_std(values)
        if ood:
            per_seed = [np.mean([means[label][n] for label in ood]) for n in group["names"]
                        if all(n in means[label].index for label in ood)]
            row["OOD mean"], row["OOD mean std"] = _mean_std(per_seed)
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and not pd.isna(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def kd_vs_cl_table(config, collections) -> pd.DataFrame:
    """KD − CL of the main measure per student: per collection, and pooled in and out of domain.

    Each query's value is averaged over seeds first; the test pairs KD and CL on the same queries (``t``:
    scipy's ``ttest_rel``, ``wilcoxon``: signed-rank). The 95% interval is the t interval of the mean difference.
    ``p (Holm)`` corrects within a family: the per-collection rows are one, the pooled rows another.
    """
    main = _measure(config.evaluation.main_measure)
    rows = []
    for s in config.students:
        if not {"CL", "KD"} <= set(s.objectives):
            continue
        diffs = {}
        for c in collections:
            pq = c.perquery[c.perquery["measure"] == main]
            cl = _seed_mean(pq, [f"{s.name}-CL-s{seed}" for seed in config.seeds])
            kd = _seed_mean(pq, [f"{s.name}-KD-s{seed}" for seed in config.seeds])
            both = pd.concat([cl.rename("CL"), kd.rename("KD")], axis=1, join="inner").dropna()
            diffs[c.label] = both
            rows.append({"student": s.name, "scope": "collection", "collection": c.label,
                         "in_domain": c.in_domain, **_paired(both, config.evaluation.test)})
        for scope, in_domain in ((IN_DOMAIN, True), (OUT_OF_DOMAIN, False)):
            members = [c.label for c in collections if c.in_domain == in_domain]
            if not members:
                continue
            pooled = pd.concat([diffs[label].set_axis([f"{label}/{q}" for q in diffs[label].index])
                                for label in members])
            name = scope if len(members) > 1 else f"{scope} ({members[0]})"
            rows.append({"student": s.name, "scope": "pooled", "collection": name, "in_domain": in_domain,
                         **_paired(pooled, config.evaluation.test)})
    columns = ["student", "scope", "collection", "in_domain", "queries", "CL", "KD", "KD-CL", "CI low", "CI high",
               "p", "p (Holm)", "significant", "winner"]
    table = pd.DataFrame(rows, columns=columns)
    if len(table):
        for scope in ("collection", "pooled"):
            mask = table["scope"] == scope
            table.loc[mask, "p (Holm)"] = _holm(table.loc[mask, "p"].to_numpy(dtype=float))
        alpha = config.evaluation.alpha
        table["significant"] = table["p (Holm)"].astype(float) < alpha
        table["winner"] = np.where(~table["significant"], "-", np.where(table["KD-CL"] > 0, "KD", "CL"))
    return table


def _seed_mean(pq: pd.DataFrame, names: list[str]) -> pd.Series:
    values = pq[pq["name"].isin(names)]
    if values.empty:
        return pd.Series(dtype=float)
    return values.groupby("qid")["value"].mean()


def _paired(both: pd.DataFrame, test: str) -> dict:
    from scipy import stats

    n = len(both)
    out = {"queries": n, "CL": float("nan"), "KD": float("nan"), "KD-CL": float("nan"), "CI low": float("nan"),
           "CI high": float("nan"), "p": float("nan")}
    if n == 0:
        return out
    d = (both["KD"] - both["CL"]).to_numpy(dtype=float)
    out.update({"CL": both["CL"].mean(), "KD": both["KD"].mean(), "KD-CL": d.mean()})
    if n < 2:
        return out
    if np.allclose(d, 0):
        out.update({"CI low": 0.0, "CI high": 0.0, "p": 1.0})
        return out
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    if test == "wilcoxon":
        p = stats.wilcoxon(both["KD"], both["CL"]).pvalue
    else:
        p = stats.ttest_rel(both["KD"], both["CL"]).pvalue
    out.update({"CI low": d.mean() - half, "CI high": d.mean() + half, "p": float(p)})
    return out


def _holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN): ``max_{j<=i} min(1, (m - j) p_(j))`` in sorted order."""
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


# -- markdown --------------------------------------------------------------------------------------------------
def markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub table of ``frame`` (no extra dependency)."""
    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            if math.isnan(v):
                return ""
            return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
        return "" if v is None else str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def summary_markdown(config, summary: pd.DataFrame, kd: pd.DataFrame, collections) -> str:
    """The summary as text: ``mean ± std`` cells; ▲/▼ where KD is significantly above/below CL (Holm)."""
    labels = [c.label for c in collections] + (["OOD mean"] if "OOD mean" in summary else [])
    marks = {}
    for row in kd[kd["scope"] == "collection"].to_dict("records"):
        if row["significant"]:
            marks[(row["student"], row["collection"])] = " ▲" if row["KD-CL"] > 0 else " ▼"
    shown = []
    for row in summary.to_dict("records"):
        out = {"system": row["system"]}
        for label in labels:
            mean, std = row[label], row[f"{label} std"]
            text = "" if pd.isna(mean) else f"{mean:.3f}" + ("" if pd.isna(std) else f" ± {std:.3f}")
            if row["objective"] == "KD":
                text += marks.get((row["student"], label), "")
            heading = f"{label} (in domain)" if any(c.label == label and c.in_domain for c in collections) else label
            out[heading] = text
        shown.append(out)
    main = _measure(config.evaluation.main_measure)
    seeds = len(config.seeds)
    note = (f"{main}; mean ± std over {seeds} seeds" if seeds > 1 else f"{main}; one seed") + \
        "; ▲/▼: KD significantly above/below CL for that student (paired test over queries, Holm)."
    return markdown(pd.DataFrame(shown)) + f"\n\n{note}"


# -- the verdict -----------------------------------------------------------------------------------------------
def verdict(config, summary: pd.DataFrame, kd: pd.DataFrame) -> str:
    """A few sentences: where KD beat CL significantly, where it did not (pooled rows, Holm-corrected)."""
    main = _measure(config.evaluation.main_measure)
    alpha = config.evaluation.alpha
    pooled = kd[kd["scope"] == "pooled"]
    if pooled.empty:
        return "No student was trained both ways, so there is no KD-vs-CL comparison."
    lines = [f"Verdict ({main}, KD − CL, paired test over queries, Holm-corrected, α = {alpha}):"]
    same = {s.name for s in config.students if s.model == config.teacher.model}
    for student, rows in pooled.groupby("student", sort=False):
        parts = []
        for row in rows.to_dict("records"):
            if pd.isna(row["KD-CL"]):
                parts.append(f"{row['collection']}: no queries")
                continue
            words = "no significant difference"
            if row["significant"]:
                words = "KD better" if row["KD-CL"] > 0 else "CL better"
            parts.append(f"{row['collection']}: {row['KD-CL']:+.3f} [{row['CI low']:+.3f}, {row['CI high']:+.3f}], "
                         f"p = {_p(row['p (Holm)'])} → {words}")
        control = " (same capacity as the teacher: the control)" if student in same else ""
        lines.append(f"- {student}{control}: " + "; ".join(parts) + ".")
    for in_domain, scope in ((True, "in domain"), (False, "out of domain")):
        rows = pooled[pooled["in_domain"] == in_domain]
        if rows.empty:
            continue
        wins = rows[(rows["winner"] == "KD")]["student"].tolist()
        losses = rows[(rows["winner"] == "CL")]["student"].tolist()
        text = f"{scope.capitalize()}, KD beat CL significantly for {len(wins)} of {len(rows)} students"
        text += f" ({', '.join(wins)})" if wins else ""
        text += f"; CL beat KD significantly for {', '.join(losses)}" if losses else "; CL never beat KD significantly"
        lines.append(text + ".")
    lines.append(_teacher_sentence(summary, main))
    return "\n".join(line for line in lines if line)


def _teacher_sentence(summary: pd.DataFrame, main: str) -> str:
    """KD can only pass on what the teacher knows: say how the teacher compares with its students."""
    cols = [c for c in summary.columns if c not in ("system", "student", "objective") and not c.endswith(" std")]
    teacher = summary[summary["student"].isna() & (summary["system"] != "BM25")]
    students = summary[summary["student"].notna()]
    if teacher.empty or students.empty or not cols:
        return ""
    t = teacher.iloc[0][cols].astype(float)
    best = students[cols].astype(float).max()
    ahead = [c for c in cols if t[c] > best[c]]
    if len(ahead) == len(cols):
        return f"The teacher beat every student on every collection ({main}), as KD needs."
    behind = [c for c in cols if c not in ahead]
    return (f"The teacher was not the strongest system on {', '.join(behind)} ({main}): "
            "distillation cannot be expected to help where the teacher is no better than its students.")


def _p(p) -> str:
    if pd.isna(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


# -- plots -----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kd_minus_cl(config, kd: pd.DataFrame, path: Path) -> Path | None:
    """KD − CL per student, in and out of domain (pooled), with 95% intervals; each collection as a faint dot."""
    if kd.empty:
        return None
    plt = _pyplot()
    students = list(dict.fromkeys(kd["student"]))
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(students) + 2), 3.6))
    for offset, in_domain, colour, label in ((-0.12, True, "tab:blue", IN_DOMAIN),
                                             (0.12, False, "tab:orange", OUT_OF_DOMAIN)):
        pooled = kd[(kd["scope"] == "pooled") & (kd["in_domain"] == in_domain)].set_index("student")
        each = kd[(kd["scope"] == "collection") & (kd["in_domain"] == in_domain)]
        xs = [i + offset for i, s in enumerate(students) if s in pooled.index]
        if not xs:
            continue
        rows = pooled.loc[[s for s in students if s in pooled.index]]
        err = np.vstack([(rows["KD-CL"] - rows["CI low"]).to_numpy(float),
                         (rows["CI high"] - rows["KD-CL"]).to_numpy(float)])
        ax.errorbar(xs, rows["KD-CL"], yerr=np.nan_to_num(err), fmt="o", color=colour, capsize=4, label=label)
        for i, s in enumerate(students):
            dots = each[each["student"] == s]["KD-CL"]
            ax.scatter([i + offset * 2] * len(dots), dots, s=10, color=colour, alpha=0.35)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(students)), students)
    ax.set_ylabel(f"KD − CL ({_measure(config.evaluation.main_measure)})")
    ax.set_title("KD − CL per student (pooled, 95% CI; dots: single collections)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(models, path: Path, metric: str = "metric", window: int = 10) -> Path | None:
    """Loss per step (moving average over ``window`` steps) for CL and for KD runs — their scales differ — and the
    validation metric per step; one colour per model throughout."""
    logs = [m for m in models if m.log is not None and len(m.log)]
    if not logs:
        return None
    plt = _pyplot()
    fig, (cl_ax, kd_ax, metric_ax) = plt.subplots(1, 3, figsize=(14, 3.9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(logs):
        colour, style = colours[i % len(colours)], ("-", "--", ":", "-.")[(i // len(colours)) % 4]
        log = m.log
        loss = log["loss"].rolling(window, min_periods=1).mean()
        (kd_ax if m.objective == "KD" else cl_ax).plot(log["step"], loss, color=colour, linestyle=style,
                                                       label=m.name, linewidth=1.2)
        if "metric" in log and log["metric"].notna().any():
            valid = log[log["metric"].notna()]
            metric_ax.plot(valid["step"], valid["metric"], marker="o", markersize=3, color=colour, linestyle=style,
                           label=m.name, linewidth=1.2)
    cl_ax.set(xlabel="step", ylabel=f"loss (moving average of {window} steps)", title="CL: InfoNCE")
    kd_ax.set(xlabel="step", title="KD: KL to the teacher")
    metric_ax.set(xlabel="step", ylabel=f"validation {metric}", title="Validation")
    for ax in (cl_ax, kd_ax, metric_ax):
        if ax.lines:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no validation set" if ax is metric_ax else "no such runs", ha="center",
                    va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- everything ------------------------------------------------------------------------------------------------
def write_report(config, models, collections, out: Path) -> Report:
    """Writes every table, plot and ``report.md`` under ``out``; returns what it wrote."""
    out = Path(out)
    tables, plots = out / "tables", out / "plots"
    tables.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    def save(frame: pd.DataFrame, stem: str, text: str | None = None) -> None:
        frame.to_csv(tables / f"{stem}.csv", index=False)
        (tables / f"{stem}.md").write_text((text or markdown(frame)) + "\n", encoding="utf-8")
        files.extend([tables / f"{stem}.csv", tables / f"{stem}.md"])

    per_collection = []
    for c in collections:
        save(c.table, c.label)
        means = mean_table(config, c)
        save(means, f"{c.label}.mean")
        per_collection.append((c, means))
    summary = summary_table(config, collections)
    kd = kd_vs_cl_table(config, collections)
    summary_md = summary_markdown(config, summary, kd, collections)
    save(summary, "summary", summary_md)
    save(kd, "kd_vs_cl")
    text = verdict(config, summary, kd)
    plot_files = [plot_kd_minus_cl(config, kd, plots / "kd_minus_cl.png"),
                  plot_training_curves(models, plots / "training_curves.png",
                                       _measure(config.training_args(config.teacher)["metric"]))]
    files.extend(p for p in plot_files if p is not None)
    report = _report_markdown(config, summary_md, kd, text, per_collection, models, plot_files, out)
    (out / "report.md").write_text(report, encoding="utf-8")
    files.append(out / "report.md")
    return Report(summary, summary_md, kd, text, files)


def _report_markdown(config, summary_md, kd, text, per_collection, models, plot_files, out: Path) -> str:
    parts = [f"# {config.name}", config.description.strip(), "## Summary", summary_md, "## KD − CL",
             markdown(kd.drop(columns=["in_domain"])), text]
    for plot in plot_files:
        if plot is not None:
            parts.append(f"![{plot.stem}]({plot.relative_to(out).as_posix()})")
    parts.append("## Per collection")
    for c, means in per_collection:
        parts += [f"### {c.label} ({IN_DOMAIN if c.in_domain else OUT_OF_DOMAIN}; {c.queries} queries, "
                  f"reranking the top {c.depth})", markdown(means)]
    trained = [m for m in models if m.objective != "given"]
    if trained:
        rows = pd.DataFrame([{"model": m.name, "objective": m.objective, "seed": m.seed,
                              "training seconds": round(m.seconds, 1), "reused": m.reused} for m in trained])
        parts += ["## Training", markdown(rows)]
    return "\n\n".join(p for p in parts if p) + "\n"
