# The metadata lives in pyproject.toml; this shim stays at the top of the repository (a project rule) for tools
# that still call setup.py.
from setuptools import setup

setup()
