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
        lay = synthetic.sample_layout(seed, image_size=64)
        pixels = synthetic.visible_pixels(lay).sum(0)
        for i, qa in enumerate(spatial_qa.generate_qa(lay.prims, lay.names, lay.cam_to_world[0], lay.qa_rng)):
            wrong = i % 3 == 0  # every third answer wrong
            answer = {"yes": "no", "no": "yes"}[qa.answer] if wrong else qa.answer
            fewer = int(min(pixels[j] for j in qa.subjects)) if qa.kind in study_learning.KINDS else 0
            rows.append({"sample_id": f"synthetic-{seed}", "kind": qa.kind, "question": qa.question,
                         "answer": answer, "gt": qa.answer, "n": len(lay.prims), "px": fewer})
            if qa.kind == "proximity":
                expect_gaps.append(spatial_qa.surface_gap(*(lay.prims[s] for s in qa.subjects)))
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = study_learning.crowding(str(path), image_size=64)
    for kind in study_learning.KINDS:
        for n in {r["n"] for r in rows}:
            mine = [r for r in rows if r["kind"] == kind and r["n"] == n]
            if mine:
                acc = sum(r["answer"] == r["gt"] for r in mine) / len(mine)
                assert out["by_objects"][f"{kind}/{n}"] == pytest.approx((acc, len(mine)))
        for key, (acc, n) in out["by_pixels_of_less_visible_object"].items():
            if key.startswith(kind + "/"):
                lo, hi = (float(x) for x in key.split("/")[1].removesuffix(" px").split("-"))
                mine = [r for r in rows if r["kind"] == kind and lo <= r["px"] < hi]
                assert (acc, n) == pytest.approx((sum(r["answer"] == r["gt"] for r in mine) / len(mine), len(mine)))
    grounded = [r for r in rows if r["kind"] in study_learning.KINDS]
    asked_near = [r for r in grounded if " near the " in r["question"]]
    assert study_learning.per_relation(str(path))["relation/near_acc"] == pytest.approx(
        sum(r["answer"] == r["gt"] for r in asked_near) / len(asked_near))
    assert sum(n for _, n in out["by_pixels_of_less_visible_object"].values()) == len(grounded)
    assert sum(n for _, n in out["proximity_by_gap"].values()) == len(expect_gaps) > 0
    near = sum(g < 1e-3 for g in expect_gaps)
    assert out["proximity_by_gap"].get("0-0.001 m", (0, 0))[1] == near
    bad = tmp_path / "real.jsonl"
    bad.write_text(json.dumps({**rows[0], "sample_id": "scannet-scene0000_00"}) + "\n")
    with pytest.raises(SystemExit, match="scene0000_00.*not synthetic"):
        study_learning.crowding(str(bad))
    bad.write_text(json.dumps({**grounded[0], "question": "Is the red box far from the sky?"}) + "\n")
    with pytest.raises(SystemExit, match="far from the sky.*no question of spatial_qa.RELATIONS"):
        study_learning.crowding(str(bad))


def test_overlap_splits_joined_questions_by_who_is_right(tmp_path):
    def write(name, answers):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"sample_id": f"synthetic-{i // 2}", "kind": kind,
                                            "question": f"q{i}", "answer": ans, "gt": "yes"}) + "\n"
                                for i, (kind, ans) in enumerate(answers)))
        return str(path)

    first = write("a.jsonl", [("proximity", "yes"), ("proximity", "yes"), ("proximity", "no"),
                              ("proximity", "no"), ("size", "yes"), ("describe", "a box")])
    second = write("b.jsonl", [("proximity", "yes"), ("proximity", "no"), ("proximity", "yes"),
                               ("proximity", "unseen"), ("size", "no")])
    assert study_learning.overlap(first, second) == {
        "proximity": {"both": 1, "first_only": 1, "second_only": 1, "neither": 1},
        "size": {"both": 0, "first_only": 1, "second_only": 0, "neither": 0}}
    with pytest.raises(SystemExit, match="share no grounded question"):
        study_learning.overlap(first, write("c.jsonl", [("describe", "x")]))
    other = tmp_path / "d.jsonl"
    other.write_text(json.dumps({"sample_id": "synthetic-0", "kind": "proximity", "question": "q0",
                                 "answer": "no", "gt": "no"}) + "\n")
    with pytest.raises(SystemExit, match="ground truth 'yes'.*but 'no'"):
        study_learning.overlap(first, str(other))


def test_plot_draws_each_runs_curves_the_prior_and_the_goal(tmp_path, monkeypatch):
    study = tmp_path / "study"
    study.mkdir()
    curve = [{"step": s, **{f"grounded/{k}_acc": a for k in study_learning.KINDS},
              **{f"grounded_forced/{k}_acc": a + 0.01 for k in study_learning.KINDS}}
             for s, a in ((2000, 0.9), (4000, 0.96))]
    (study / "long.json").write_text(json.dumps({"name": "long", "seed": 0, "curve": curve}))
    (study / "skipped.json").write_text(json.dumps({"name": "skipped", "seed": 0, "curve": curve[:1]}))
    prior = dict(zip(study_learning.KINDS, (0.55, 0.62, 0.62, 0.53)))
    monkeypatch.setattr(study_learning, "text_prior", lambda base: prior)

    def horizontal(ax):
        return sorted(round(float(line.get_ydata()[0]), 3) for line in ax.lines
                      if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2)

    fig = study_learning.plot([str(tmp_path)], str(tmp_path / "a.png"), only=["long"], goal=0.95, ymin=0.8)
    assert (tmp_path / "a.png").stat().st_size > 0
    for ax, kind in zip(fig.axes, study_learning.KINDS):
        assert ax.get_title() == kind and ax.get_ylim() == (0.8, 1.0)
        generated, forced = ax.lines[0], ax.lines[1]  # the one run named in `only`
        assert list(generated.get_xdata()) == [2000, 4000] and list(generated.get_ydata()) == [0.9, 0.96]
        assert list(forced.get_ydata()) == pytest.approx([0.91, 0.97])
        assert horizontal(ax) == [prior[kind], 0.95]
    # Without `goal`: the main job's goals per kind.
    fig = study_learning.plot([str(tmp_path)], str(tmp_path / "b.png"), only=["long"])
    assert [horizontal(ax)[-1] for ax in fig.axes] == [0.85, 0.85, 0.8, 0.8]
    assert fig.axes[0].get_ylim() == (0.4, 1.0)
