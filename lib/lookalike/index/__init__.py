"""The index stage and the index builds that the searching stages read."""
