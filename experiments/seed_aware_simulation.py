"""The type-I error of the seed-aware test and of the seed-averaged paired t-test it replaced, by simulation.

Differences of two training methods with no true difference are drawn from the crossed model of
pyterrier_kdcl.experiment.seed_aware (query, seed and residual spreads as in tests/test_seed_aware.py: the seed
spread of docs/results/cpu-paper's in-domain runs, 0.032, and around it), and both tests are applied at α = 0.05.

    python experiments/seed_aware_simulation.py  # → docs/results/seed-aware-simulation/ (csv and png)
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pyterrier_kdcl.experiment.seed_aware import simulate_type_one_error  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "seed-aware-simulation"
QUERIES, QUERY_SD, RESIDUAL_SD, ALPHA, REPETITIONS = 400, 0.08, 0.14, 0.05, 1000
SEED_SDS = (0.0, 0.01, 0.02, 0.032, 0.05, 0.08)


def main() -> None:
    rows = []
    for seeds in (2, 3, 5, 10):
        for seed_sd in SEED_SDS:
            rates = simulate_type_one_error(seeds=seeds, queries=QUERIES, seed_sd=seed_sd, query_sd=QUERY_SD,
                                            residual_sd=RESIDUAL_SD, alpha=ALPHA, repetitions=REPETITIONS,
                                            random_state=1000 * seeds + int(seed_sd * 1000))
            rows += [{"seeds": seeds, "seed sd": seed_sd, "test": test, "type-I error": rate}
                     for test, rate in rates.items()]
    table = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    table.to_csv(OUT / "simulation.csv", index=False)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharey=True)
    for ax, (seeds, group) in zip(axes, table.groupby("seeds")):
        for test, style in (("seed-aware", "o-"), ("seed-averaged t", "s--")):
            rows = group[group["test"] == test]
            ax.plot(rows["seed sd"], rows["type-I error"], style, label=test)
        ax.axhline(ALPHA, color="grey", linewidth=0.8)
        ax.axvline(0.032, color="tab:red", linewidth=0.8, linestyle=":")
        ax.set(title=f"{seeds} seeds", xlabel="seed sd of the difference")
    axes[0].set_ylabel(f"rejection rate under the null (α = {ALPHA})")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{QUERIES} queries, query sd {QUERY_SD}, residual sd {RESIDUAL_SD}, {REPETITIONS} draws a point; "
                 "dotted: the seed sd of cpu-paper's in-domain KD − CL", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "type_one_error.png", dpi=110)
    print(table.pivot_table(index=["seeds", "seed sd"], columns="test", values="type-I error").to_string())


if __name__ == "__main__":
    main()
