"""spark-submit entry for `lookalike nightly`: spark-submit jobs/nightly.py --conf conf/local.yaml [--set k=v]."""

from lookalike.cli import run_job

run_job("nightly")
