"""spark-submit entry for `lookalike train`: spark-submit jobs/train.py --conf conf/local.yaml."""

from lookalike.cli import run_job

run_job("train")
