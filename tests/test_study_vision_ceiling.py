"""The vision-ceiling study's slot-to-object reading (benchmarks/study_vision_ceiling.py)."""

import numpy as np

from benchmarks import study_vision_ceiling


def test_slot_objects_reads_each_object_from_its_main_slot():
    # Six patches: objects 0 (patches 0-1), 1 (patches 2-3), 2 (patch 4), background (patch 5).
    owner = np.array([0, 0, 1, 1, 2, -1])
    objectness = np.array([0.9, 0.6, 0.8, 0.7, 0.6, 0.9])
    member = np.array([
        [1, 1, 1, 0, 0, 0],  # object 0's main slot (1.5 of object 0 against 0.8 of object 1)
        [1, 0, 0, 0, 0, 0],  # a one-patch fragment of object 0: purer, but smaller
        [0, 0, 0, 1, 0, 1],  # background (0.9) beats object 1 (0.7)
        [0, 0, 0, 0, 1, 0],  # object 2 alone
        [0, 0, 0, 0, 0, 0],  # empty
    ], float)
    w = member * objectness
    weights = w / np.maximum(w.sum(-1, keepdims=True), 1e-12)  # as slots.group normalises
    slot_of, purity = study_vision_ceiling.slot_objects(weights, objectness, owner, 3)
    np.testing.assert_array_equal(slot_of, [0, -1, 3])  # object 1 dominates no slot
    np.testing.assert_allclose(purity, [1.5 / 2.3, 1.0, 0.9 / 1.6, 1.0])
