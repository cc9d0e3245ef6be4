"""Losses (DESIGN.md §5): pure functions of arrays — `distill` (KD + CE), `depth`, `detection`
(Hungarian-matched 3D boxes), `weighting` (Kendall / static / DWA)."""
