"""The kdcl command: kdcl experiment CONFIG [--out DIR] [--check] [--wait]; kdcl verify PATH...

experiment validates the config, trains the teacher and the students, evaluates them with pt.Experiment and
writes tables, plots and a verdict to --out (default: runs/<config name>); a rerun reuses finished work.
--check only validates the config and prints what would run and how many (query, document) pairs each
step scores, to size a run before starting it. One run writes to an output directory at a time: while another
run holds it, the command stops at once naming that run (exit status 3), or waits for it with --wait (or
wait_for_lock: true in the config). Ctrl-C stops with one line (exit status 130); the next run continues where
it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdcl", description="Rerankers trained by distillation vs contrastive "
                                     "learning, in PyTerrier.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("experiment", help="run a KD-vs-CL experiment from a config file",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("config", help="a YAML or TOML experiment config (see docs/experiment.md)")
    ex.add_argument("--out", help="output directory (default: runs/<config name>)")
    ex.add_argument("--check", action="store_true", help="validate the config and print the plan; train nothing")
    ex.add_argument("--target-mde", type=float, default=None, metavar="D",
                    help="with --check: how many seeds the seed-aware KD − CL test needs to detect D (default 0.03)")
    ex.add_argument("--quiet", action="store_true", help="no progress output; print only the results")
    ex.add_argument("--wait", action="store_true", default=None,
                    help="if another run writes to the output directory, wait for it to finish instead of stopping")
    ve = sub.add_parser("verify", help="recompute a report's tables and verdict from its perquery.csv.gz, and check "
                        "the numbers that prose quotes from tables",
                        description="For a directory: recomputes every table, section and the verdict of "
                        "DIR/report.md from DIR/perquery.csv.gz and DIR/config.json, and checks the claims of "
                        "DIR/README.md. For a Markdown file: checks its claims, the numbers written as links to a "
                        "table row (docs/results/README.md, 'Claims'). Lists every difference; exit status 1 if any.")
    ve.add_argument("paths", nargs="+", metavar="PATH", help="an experiment's output directory, or a Markdown file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "verify":
        return verify(args.paths)
    return experiment(args)


def verify(paths: list[str]) -> int:
    from pathlib import Path

    from pyterrier_kdcl.experiment import claims
    from pyterrier_kdcl.experiment.evidence import verify as check_evidence

    failed = 0
    for path in map(Path, paths):
        problems, said = [], []
        if path.is_dir():
            problems += check_evidence(path)
            said.append("every table and the verdict reproduce")
        markdown = path / "README.md" if path.is_dir() else path
        if markdown.is_file():
            count, wrong = claims.check(markdown)
            problems += wrong
            said.append(f"{count} claim(s) of {markdown.name} match their tables")
        elif not path.is_dir():
            problems.append(f"{path}: no such directory or Markdown file")
        print("\n".join(problems) if problems else f"{path}: {'; '.join(said)}")
        failed += bool(problems)
    return 1 if failed else 0


INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


def experiment(args) -> int:
    from pyterrier_kdcl.experiment import console

    try:
        with console.configured(quiet=args.quiet):  # the process's bars and logging as they were once it returns
            return _experiment(args)
    except KeyboardInterrupt:  # every file is written atomically and the lock is released: nothing to repair
        print("\ninterrupted: what finished is kept (stages, checkpoints, run files); run the same command again "
              "to continue", file=sys.stderr)
        return INTERRUPTED


def _experiment(args) -> int:
    from pyterrier_kdcl.directory_lock import DirectoryLocked
    from pyterrier_kdcl.experiment.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"error: invalid config: {err}", file=sys.stderr)
        return 2
    from pyterrier_kdcl.experiment.plan import plan
    from pyterrier_kdcl.experiment.runner import ExperimentRunner, ForeignFiles, default_out
    from pyterrier_kdcl.paths import UnreadableFile

    out = args.out or default_out(config)
    if args.check:
        print(f"config {args.config} is valid; output would go to {out}\n")
        print(plan(config, **({} if args.target_mde is None else {"target_mde": args.target_mde})))
        return 0
    if not args.quiet:
        print(f"plan of {args.config} (rough CPU minutes for packaged models; see --check):\n{plan(config)}\n",
              flush=True)
    started = time.perf_counter()
    try:
        result = ExperimentRunner(config, out, verbose=not args.quiet, wait=args.wait).run()
    except DirectoryLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ForeignFiles, UnreadableFile) as err:  # each names the file and what to do
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result is None:  # not the main process of a multi-process run: that one reports
        return 0
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{result.report.summary_markdown}\n\n{result.report.verdict}\n")
    print(f"finished in {minutes:.1f} min; tables, plots and report.md are in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
