"""The paper's "spatial accuracy": keyword agreement between student and teacher, no ground truth.

As the paper's released evaluation computes it (reference/paper.md §1.6): each answer is reduced
to one boolean, "contains a keyword of the question's kind" (plain lower-case substring match, so
"on" also matches "contains"), and a question counts as correct when the student's boolean equals
the teacher's. Overall = pooled over the four kinds. Reported beside the grounded accuracy so the
gap between the two is visible: two answers that both say "no" agree without either naming a
relation, and a wrong "yes, it is on the left" agrees with a right one.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

KEYWORDS = {
    "proximity": ("near", "close", "next to", "beside", "adjacent"),
    "contact": ("on", "touching", "contact", "above", "below", "under", "over"),
    "size": ("large", "small", "big", "bigger", "smaller", "size", "compare"),
    "orientation": ("left", "right", "front", "back", "behind", "side", "position"),
}


def has_keyword(answer: str, kind: str) -> bool:
    text = answer.lower()
    return any(word in text for word in KEYWORDS[kind])


def agreement(rows: Iterable[tuple[str, str, str]]) -> dict[str, float]:
    """rows of (kind, student answer, teacher answer) -> `paper_mode/<kind>_acc` for every kind
    with keywords and questions, and `paper_mode/overall_acc` pooled over them. Kinds without
    keywords (e.g. counting) are not scored, as in the paper."""
    right, total = collections.Counter(), collections.Counter()
    for kind, student, teacher in rows:
        if kind not in KEYWORDS:
            continue
        total[kind] += 1
        right[kind] += has_keyword(student, kind) == has_keyword(teacher, kind)
    out = {f"paper_mode/{k}_acc": right[k] / total[k] for k in sorted(total)}
    if total:
        out["paper_mode/overall_acc"] = sum(right.values()) / sum(total.values())
    return out


__all__ = ["KEYWORDS", "agreement", "has_keyword"]
