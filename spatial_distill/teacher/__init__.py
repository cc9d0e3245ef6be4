"""Teachers and the offline dump that turns their outputs into teacher records (DESIGN.md §1)."""
