"""Running the pipeline: the stage registry, the run lock, the `runs` table, the nightly run and its exports."""
