"""Benchmarks, apart from the product paths they measure (docs/design.md §7)."""
