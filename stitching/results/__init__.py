"""Results: the tidy CSV schema every run writes, and collection of many runs into one table."""
