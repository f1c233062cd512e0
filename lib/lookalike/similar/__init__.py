"""The similar stage: every item's nearest neighbours, and the duplicates table."""
