"""The fixed benchmark's measuring side: evaluator, hardware table, benchmarks."""
