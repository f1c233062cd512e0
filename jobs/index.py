"""spark-submit entry for `lookalike index`: spark-submit jobs/index.py --conf conf/local.yaml [--set k=v]."""

from lookalike.cli import run_job

run_job("index")
