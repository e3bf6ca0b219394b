"""The KD-vs-CL study as an application: a config in, trained models, tables, plots and a verdict out.

``config.py`` reads and checks a YAML or TOML config; ``plan.py`` sizes it; ``data.py`` loads its data and first
stages; ``runner.py`` trains and evaluates; ``report.py`` writes tables, plots and the verdict; ``cli.py`` is the
``kdcl`` command. The only room that imports yaml, matplotlib and statsmodels; nothing in the library imports it.

Example::

    from pyterrier_kdcl.experiment import run_experiment
    result = run_experiment("experiments/quick.yaml", out="runs/quick")
"""

from pyterrier_kdcl.experiment.config import ConfigError, ExperimentConfig, load_config
from pyterrier_kdcl.experiment.runner import ExperimentResult, ExperimentRunner, default_out, run_experiment

__all__ = ["ConfigError", "ExperimentConfig", "ExperimentResult", "ExperimentRunner", "default_out", "load_config",
           "run_experiment"]
