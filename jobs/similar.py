"""spark-submit entry for `lookalike similar`: spark-submit jobs/similar.py --conf conf/local.yaml [--set k=v]."""

from lookalike.cli import run_job

run_job("similar")
