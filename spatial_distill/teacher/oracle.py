"""The oracle teacher: answers from the scene's geometry, with calibrated softness.

It is *synthetic*: nothing here is a learned model. It reads the geometry the questions were
derived from: the exact solids of the synthetic scenes (`geometry="solids"`), or the 3D boxes of
real scenes (`geometry="boxes"`: every object its box, contact by the signed box distance, as
`spatial_qa.generate_box_qa` decides). Its greedy answer is the grounded answer (the
scene's QA answer, computed from exact geometry by `data_pipelines.spatial_qa`). Its distribution
over the first answer token puts `confidence` on the right word, most of the rest on the opposite
word ("yes" <-> "no") and a little spread over the vocabulary. The confidence grows with how far
the deciding geometric quantity is from its decision threshold:

    confidence = floor + (ceiling - floor) * tanh(margin / scale_kind)

with margins and scales per kind (documented below, stored in `teacher_meta.json`):
    proximity    |surface gap - NEAR|               scale 0.10 m
    contact      |surface gap - CONTACT_NO_MIN / 2| scale 0.02 m
    size         |log(volume_a / volume_b)|         scale log(SIZE_RATIO)
    orientation  |centre difference along the axis in camera 0| scale ORIENT_MARGIN
    describe     (counting) certain: ceiling
Later answer tokens (multi-token words, EOS) get `ceiling` on the greedy token. So a KD student
sees "how sure a good teacher would be" while its greedy target is always correct.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipelines import spatial_qa
from data_pipelines.sample import Sample
from spatial_distill.tokenizer import Tokenizer

OPPOSITE = {"yes": "no", "no": "yes"}
SCALES = {"proximity": 0.10, "contact": 0.02, "size": float(np.log(spatial_qa.SIZE_RATIO)),
          "orientation": spatial_qa.ORIENT_MARGIN}
SPREAD = 0.1  # share of the non-confident mass spread over the vocabulary (the rest -> opposite)


def _relation_name(qa, names: Sequence[str]) -> str | None:
    if len(qa.subjects) != 2:
        return None
    a, b = (names[i] for i in qa.subjects)
    for name, (kind, template, _) in spatial_qa.RELATIONS.items():
        if kind == qa.kind and template.format(a=a, b=b) == qa.question:
            return name
    return None


GEOMETRIES = ("solids", "boxes")


def margin(sample: Sample, qa_index: int, geometry: str = "solids") -> float:
    """How far the geometry is from flipping the answer, in units of the kind's scale."""
    qa = sample.qa[qa_index]
    if qa.kind not in SCALES:
        return float("inf")
    if geometry == "boxes":
        prims = spatial_qa.box_primitives(sample.boxes)
    else:
        prims = spatial_qa.primitives_from_boxes(sample.boxes, sample.labels)
    a, b = (prims[i] for i in qa.subjects)
    if qa.kind == "proximity":
        m = abs(spatial_qa.surface_gap(a, b) - spatial_qa.NEAR)
    elif qa.kind == "contact":
        gap = spatial_qa.surface_gap(a, b)
        if geometry == "boxes" and gap <= 0:  # overlapping boxes: minus how deep they overlap
            gap = -spatial_qa.box_overlap_depth(a, b)
        m = abs(gap - spatial_qa.CONTACT_NO_MIN / 2)
    elif qa.kind == "size":
        m = abs(np.log(a.volume() / b.volume()))
    else:
        name = _relation_name(qa, sample.label_names)
        axis = 0 if name in ("left", "right") else 2
        ca = spatial_qa.camera_centre(a, sample.cam_to_world[0])
        cb = spatial_qa.camera_centre(b, sample.cam_to_world[0])
        m = abs(ca[axis] - cb[axis])
    return float(m / SCALES[qa.kind])


class OracleTeacher:
    """Implements `spatial_distill.teacher.base.Teacher` for synthetic scenes."""

    revision = "1"

    def __init__(self, tokenizer: Tokenizer, *, floor: float = 0.6, ceiling: float = 0.95,
                 geometry: str = "solids"):
        if not 0.5 <= floor <= ceiling < 1.0:
            raise ValueError(f"oracle calibration needs 0.5 <= floor <= ceiling < 1, got floor={floor}, "
                             f"ceiling={ceiling} (config.teacher.oracle_floor / oracle_ceiling)")
        if geometry not in GEOMETRIES:
            raise ValueError(f"oracle geometry {geometry!r}: choose one of {GEOMETRIES}")
        self.tokenizer, self.floor, self.ceiling, self.geometry = tokenizer, floor, ceiling, geometry
        self.teacher_id = "oracle-synthetic" if geometry == "solids" else "oracle-boxes"

    def calibration(self) -> dict:
        kind = "synthetic oracle: answers from exact geometry" + (" (3D boxes)" if self.geometry == "boxes" else "")
        return {"kind": kind,
                "formula": "floor + (ceiling - floor) * tanh(margin / scale)",
                "floor": self.floor, "ceiling": self.ceiling, "scales": SCALES, "spread": SPREAD}

    def confidence(self, sample: Sample, qa_index: int) -> float:
        return self.floor + (self.ceiling - self.floor) * float(np.tanh(margin(sample, qa_index, self.geometry)))

    def answer(self, sample: Sample, prompts) -> list[list[int]]:
        return [self.tokenizer.encode(qa.answer, add_eos=True) for qa in sample.qa]

    def score(self, sample: Sample, prompts, answers) -> list[np.ndarray]:
        vocab = self.tokenizer.vocab_size
        out = []
        for i, (qa, ans) in enumerate(zip(sample.qa, answers)):
            logp = np.empty((len(ans), vocab), np.float32)
            for j, tok in enumerate(ans):
                row = np.empty(vocab, np.float64)
                alt = self.tokenizer.encode(OPPOSITE[qa.answer])[0] if qa.answer in OPPOSITE else None
                if j == 0 and alt is not None and alt != tok:
                    conf = self.confidence(sample, i)
                    row[:] = (1 - conf) * SPREAD / (vocab - 2)
                    row[alt] = (1 - conf) * (1 - SPREAD)
                else:
                    conf = self.ceiling
                    row[:] = (1 - conf) / (vocab - 1)
                row[tok] = conf
                logp[j] = np.log(row)  # logits = log-probs: their logsumexp is 0
            out.append(logp)
        return out
