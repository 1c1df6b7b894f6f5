"""What the benchmarks share: child processes, statistics, synthetic records, reports."""
