"""Public utilities that need no other part of so-det-ultra: :mod:`.flops` (FLOP counts of every op a forward runs,
used by the benchmarks and the tables of docs/models.md and docs/blocks.md)."""
