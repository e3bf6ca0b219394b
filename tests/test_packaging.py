"""Packaging: what ``import pyterrier_kdcl`` loads, the entry point that resolves ``irds:kdcl/…`` ids in a fresh
process, and the version kept in one place. Fresh processes, because this process has imported everything."""

import importlib.metadata
import json
import subprocess
import sys

import ir_datasets
import pytest

import pyterrier_kdcl as kdcl


def run_python(code: str, cwd) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_import_loads_neither_the_offline_room_nor_the_experiment_app(tmp_path):
    code = """
import json, sys
import pyterrier_kdcl as kdcl
for name in kdcl.__all__:
    if name != "datasets":  # the offline collections, by definition
        getattr(kdcl, name)
kdcl.losses.InfoNCE(temperature=1.0)
print(json.dumps(sorted(sys.modules)))
"""
    loaded = json.loads(run_python(code, tmp_path))
    assert "pyterrier_kdcl.reranker" in loaded and "pyterrier_kdcl.training.trainer" in loaded
    unwanted = [m for m in loaded if m.startswith(("pyterrier_kdcl.offline", "pyterrier_kdcl.experiment"))
                or m.split(".")[0] in ("yaml", "matplotlib", "statsmodels")]
    assert unwanted == []


def test_a_fresh_process_resolves_kdcl_ids_without_importing_the_package(tmp_path):
    code = """
import pyterrier as pt
topics = pt.get_dataset("irds:kdcl/manpages/test").get_topics()
print(len(topics))
"""
    assert int(run_python(code, tmp_path)) > 0  # `make test` builds the collections before the tests


def test_the_entry_point_gives_pyterrier_the_package_and_loads_no_model_code(tmp_path):
    code = """
import json, sys
import pyterrier as pt
print(json.dumps([pt.kdcl.__name__, sorted(m for m in sys.modules if m.startswith(("pyterrier_kdcl", "torch")))]))
"""
    name, loaded = json.loads(run_python(code, tmp_path))
    assert name == "pyterrier_kdcl"
    assert loaded == ["pyterrier_kdcl", "pyterrier_kdcl._pyterrier_hook"]  # and ir_datasets


def test_unknown_kdcl_ids_list_the_known_ones():
    with pytest.raises(KeyError, match="kdcl/manpages/test"):
        ir_datasets.load("kdcl/manpages/nonsense")


def test_public_names_and_version():
    assert kdcl.datasets.__name__ == "pyterrier_kdcl.offline.datasets"
    assert kdcl.losses.InfoNCE.__module__ == "pyterrier_kdcl.training.losses"
    assert kdcl.ShardedScorer.__module__ == "pyterrier_kdcl.serving" and callable(kdcl.optimize_for_cpu)
    assert kdcl.GroupSampler is kdcl.training.GroupSampler
    assert set(kdcl.__all__) <= set(dir(kdcl))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        kdcl.nonsense  # noqa: B018
    assert kdcl.__version__ == importlib.metadata.version("pyterrier-kdcl")  # pyproject.toml reads __version__


def test_pt_docs_document_every_public_name_and_link_nothing_unfinished():
    import importlib
    import pathlib
    import re
    import types

    pages = "\n".join(p.read_text() for p in (pathlib.Path(kdcl.__file__).parent / "pt_docs").glob("*.rst"))
    targets = set(re.findall(r"^\.\. auto(?:class|function):: (\S+)", pages, flags=re.M))
    public = {f"pyterrier_kdcl.{n}" for n in kdcl.__all__ if not isinstance(getattr(kdcl, n), types.ModuleType)}
    public |= {f"pyterrier_kdcl.training.losses.{n}" for n in kdcl.losses.__all__}
    assert public <= targets
    for target in targets:  # as Sphinx's autodoc finds them: the longest importable module, then attributes
        module, _, rest = target.rpartition(".")
        path = [rest]
        while True:
            try:
                obj = importlib.import_module(module)
                break
            except ImportError:
                module, _, name = module.rpartition(".")
                path.insert(0, name)
        for name in path:
            obj = getattr(obj, name)
        assert obj.__doc__, f"{target} has no docstring"
    links = re.findall(r"<(https?://[^>]*)>`_", pages)
    assert all(re.match(r"https://[a-z0-9.-]+\.[a-z]+/\S+", link) for link in links), links
