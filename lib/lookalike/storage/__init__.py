"""Where data lives: one resolver for every path and URI, small files published whole, Delta tables."""
