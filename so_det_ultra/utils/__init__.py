"""Small utilities shared by benchmarks, docs and tests."""
