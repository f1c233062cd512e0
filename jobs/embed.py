"""spark-submit entry for `lookalike embed`: spark-submit jobs/embed.py --conf conf/local.yaml [--set k=v]."""

from lookalike.cli import run_job

run_job("embed")
