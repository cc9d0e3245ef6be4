"""ScanNet label tables: raw category -> NYU40 -> the 18 ScanNet benchmark classes.

ScanNet's aggregation files label each instance with a *raw category* (free text such as
"kitchen cabinets"). The user's local `scannetv2-labels.combined.tsv` (tab-separated, one header
row; we read only its `raw_category` and `nyu40id` columns, matched exactly) maps it to an NYU40
id (1..40); the 3D detection benchmark keeps 18 of those 40 classes (`SCANNET18_CLASSES`, NYU40
ids `SCANNET18_NYU40_IDS`). A label that maps to nothing (not in the table, or an NYU40 class
outside the 18 such as wall or floor) gives `None` plus the reason, so the caller can count it.
"""

from __future__ import annotations

import csv
import pathlib

# NYU40 class names; the id of NYU40_CLASSES[i] is i + 1.
NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)

# The ScanNet 3D detection benchmark's 18 classes, in benchmark order (label = index here).
SCANNET18_CLASSES = (
    "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub",
    "otherfurniture",
)
SCANNET18_NYU40_IDS = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
_NYU40_TO_18 = {n: i for i, n in enumerate(SCANNET18_NYU40_IDS)}

TSV_COLUMNS = ("raw_category", "nyu40id")


class LabelTableError(ValueError):
    """The labels table is missing or malformed; the message names the path and the fix."""


def nyu40_name(nyu40_id: int) -> str:
    return NYU40_CLASSES[nyu40_id - 1] if 1 <= nyu40_id <= 40 else f"<not an NYU40 id: {nyu40_id}>"


def nyu40_to_scannet18(nyu40_id: int) -> int | None:
    """The ScanNet18 index of an NYU40 id, or None for the 22 classes the benchmark leaves out."""
    return _NYU40_TO_18.get(int(nyu40_id))


def read_label_table(path) -> dict[str, int]:
    """`raw_category -> nyu40id` from a `scannetv2-labels.combined.tsv` (first row wins if a raw
    category repeats; rows with an empty nyu40id are left out, so their label counts as unknown)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise LabelTableError(f"missing labels table {path}; pass the path of your local "
                              "scannetv2-labels.combined.tsv")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header = rows[0] if rows else []
    missing = [c for c in TSV_COLUMNS if c not in header]
    if missing:
        raise LabelTableError(f"{path}: header lacks column(s) {missing} (has {header}); pass "
                              "ScanNet's scannetv2-labels.combined.tsv (tab-separated)")
    raw_col, nyu_col = header.index("raw_category"), header.index("nyu40id")
    table: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or max(raw_col, nyu_col) >= len(row):
            if any(cell.strip() for cell in row):
                raise LabelTableError(f"{path}: line {line} has {len(row)} columns, fewer than the "
                                      f"header's {len(header)}")
            continue
        raw, nyu = row[raw_col], row[nyu_col].strip()
        if not nyu:
            continue
        try:
            value = int(nyu)
        except ValueError as e:
            raise LabelTableError(f"{path}: line {line}: nyu40id {nyu!r} is not an integer") from e
        if not 1 <= value <= 40:
            raise LabelTableError(f"{path}: line {line}: nyu40id {value} is outside 1..40")
        table.setdefault(raw, value)
    return table


def raw_to_scannet18(raw: str, table: dict[str, int]) -> tuple[int | None, str]:
    """(ScanNet18 index, "") for a raw ScanNet category, or (None, why it maps to nothing)."""
    if raw not in table:
        return None, f"raw label {raw!r} is not in the labels table"
    return nyu40_to_class(table[raw])


def nyu40_to_class(nyu40_id: int) -> tuple[int | None, str]:
    """(ScanNet18 index, "") for an NYU40 id, or (None, why it is not a ScanNet18 class)."""
    idx = nyu40_to_scannet18(nyu40_id)
    if idx is None:
        return None, f"nyu40 id {nyu40_id} ({nyu40_name(nyu40_id)}) is not a ScanNet18 class"
    return idx, ""
