"""The learning study's checkpoint selection and error breakdown (benchmarks/study_learning.py)."""

import json
import os

import jax
import numpy as np
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


def test_branch_starts_a_longer_wsd_run_only_where_it_equals_one_from_scratch(tmp_path):
    from configs import student as student_configs
    from spatial_distill.train import checkpoint as ckpt_lib

    def config(steps, **fields):
        c = student_configs.get_config("tiny")  # wsd, 30 warmup steps, decay over the last 20 %
        c.train.steps = steps
        c.update_from_flattened_dict(fields)
        return c

    # The 6,000-step source decays from step 30 + 5,970 - 1,200 = 4,800 on.
    src = tmp_path / "study" / "short"
    ckpt = ckpt_lib.Checkpointer(str(src / "checkpoints"), keep=10, async_save=False)
    stored = ckpt_lib.config_dict(config(6000, **{"train.checkpoint_every": 100, "mode": "train"}))
    for step in (4500, 4800, 4801):
        ckpt.save(step, {"params": {"w": np.full(3, step, np.float32)}}, {"config": stored})
    ckpt.close()
    (src / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (4500, 6000)))

    def branch(name, spec, c):
        study_learning.branch(str(tmp_path), name, spec, c)
        return tmp_path / "study" / name

    with pytest.raises(SystemExit, match="differs from short's at step 4801 .*before 4801"):
        branch("long", "short:4801", config(10000))
    with pytest.raises(SystemExit, match=r"loss.grounding: short True, this run False"):
        branch("long", "short:4800", config(10000, **{"loss.grounding": False}))
    with pytest.raises(SystemExit, match=r"has no step 4000 \(saved: \[4500, 4800, 4801\]\)"):
        branch("long", "short:4000", config(10000))
    with pytest.raises(SystemExit, match="expected SOURCE:STEP"):
        branch("long", "short", config(10000))
    cos = ckpt_lib.config_dict(config(6000, **{"train.schedule": "cosine"}))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "study" / "cos" / "checkpoints"), keep=1, async_save=False)
    ckpt.save(4800, {"params": {"w": np.zeros(3, np.float32)}}, {"config": cos})
    ckpt.close()
    with pytest.raises(SystemExit, match="at step 31 "):  # cosine decays from the warmup's end
        branch("long", "cos:4800", config(10000, **{"train.schedule": "cosine"}))
    assert not (tmp_path / "study" / "long" / "checkpoints").exists() or \
        study_learning.checkpoint_steps(str(tmp_path / "study" / "long" / "checkpoints")) == []

    out = branch("long", "short:4800", config(10000))
    assert study_learning.checkpoint_steps(str(out / "checkpoints")) == [4800]
    restored = ckpt_lib.Checkpointer(str(out / "checkpoints"), keep=10, create=False).restore_params(
        4800, {"w": jax.ShapeDtypeStruct((3,), np.float32)})
    np.testing.assert_array_equal(restored["w"], [4800, 4800, 4800])
    assert json.loads((out / "branched_from.json").read_text()) == {"run": "short", "step": 4800}
    assert (out / "metrics.jsonl").read_text() == (src / "metrics.jsonl").read_text()
    assert not any(p.name.startswith(".branching") for p in out.iterdir())
    # A rerun finds the branch's own checkpoints and leaves them.
    (out / "metrics.jsonl").write_text("mine\n")
    branch("long", "short:4500", config(10000))
    assert study_learning.checkpoint_steps(str(out / "checkpoints")) == [4800]
    assert (out / "metrics.jsonl").read_text() == "mine\n"


def test_study_config_parses_the_same_overrides_twice_in_one_process():
    # A branched run parses its config before training and again to score its checkpoints.
    from types import SimpleNamespace

    args = SimpleNamespace(preset="tiny", seed=3)
    overrides = ["--config.data.image_size=168", "--config.loss.relations.near=gap<0.15"]
    first = study_learning.study_config(args, overrides)
    second = study_learning.study_config(args, overrides[:1])
    assert (first.seed, first.data.image_size, first.loss.relations.near) == (3, 168, "gap<0.15")
    assert (second.seed, second.data.image_size) == (3, 168)
    assert second.loss.relations.near != "gap<0.15"  # the default, not the first call's
