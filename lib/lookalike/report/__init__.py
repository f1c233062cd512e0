"""The `report` command: a self-contained HTML page of what the pipeline produced."""
