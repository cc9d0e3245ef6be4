"""Data: canonical samples, synthetic scenes, dataset readers, teacher records, input pipeline.

Nothing in this package imports model code (DESIGN.md §2).
"""
