"""Datasets: a synthetic tiny-object generator, and converters for VisDrone and SODA-D."""
