"""spark-submit entry for `lookalike search`: spark-submit jobs/search.py --conf conf/local.yaml --queries PATH."""

from lookalike.cli import run_job

run_job("search")
