"""spark-submit entry for `lookalike recommend`: spark-submit jobs/recommend.py --conf conf/local.yaml [--set k=v]."""

from lookalike.cli import run_job

run_job("recommend")
