"""The learning study's checkpoint selection and error breakdown (benchmarks/study_learning.py)."""

import json
import os

import pytest

from benchmarks import study_learning


def test_checkpoint_steps_selects_saved_steps(tmp_path):
    for step in ("1000", "2603", "6000", "tmp_6000.orbax-checkpoint-tmp"):
        os.makedirs(tmp_path / step)
    assert study_learning.checkpoint_steps(str(tmp_path)) == [1000, 2603, 6000]
    assert study_learning.checkpoint_steps(str(tmp_path), "6000,1000,6000") == [1000, 6000]
    with pytest.raises(SystemExit, match=r"step\(s\) \[5000\].*saved: \[1000, 2603, 6000\]"):
        study_learning.checkpoint_steps(str(tmp_path), "5000,6000")


def test_crowding_counts_by_objects_and_gap(tmp_path):
    from data_pipelines import spatial_qa, synthetic

    rows, expect_gaps = [], []
    for seed in (11, 12):
        lay = synthetic.sample_layout(seed)
        for i, qa in enumerate(spatial_qa.generate_qa(lay.prims, lay.names, lay.cam_to_world[0], lay.qa_rng)):
            wrong = i % 3 == 0  # every third answer wrong
            answer = {"yes": "no", "no": "yes"}[qa.answer] if wrong else qa.answer
            rows.append({"sample_id": f"synthetic-{seed}", "kind": qa.kind, "question": qa.question,
                         "answer": answer, "gt": qa.answer, "n": len(lay.prims)})
            if qa.kind == "proximity":
                expect_gaps.append(spatial_qa.surface_gap(*(lay.prims[s] for s in qa.subjects)))
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = study_learning.crowding(str(path))
    for kind in study_learning.KINDS:
        for n in {r["n"] for r in rows}:
            mine = [r for r in rows if r["kind"] == kind and r["n"] == n]
            if mine:
                acc = sum(r["answer"] == r["gt"] for r in mine) / len(mine)
                assert out["by_objects"][f"{kind}/{n}"] == pytest.approx((acc, len(mine)))
    assert sum(n for _, n in out["proximity_by_gap"].values()) == len(expect_gaps) > 0
    near = sum(g < 1e-3 for g in expect_gaps)
    assert out["proximity_by_gap"].get("0-0.001 m", (0, 0))[1] == near
    bad = tmp_path / "real.jsonl"
    bad.write_text(json.dumps({**rows[0], "sample_id": "scannet-scene0000_00"}) + "\n")
    with pytest.raises(SystemExit, match="scene0000_00.*not synthetic"):
        study_learning.crowding(str(bad))
