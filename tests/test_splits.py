"""Scene-disjoint and paper splits (`data_pipelines.splits`)."""

import collections
import json
import warnings

import numpy as np
import pytest

from data_pipelines import splits as sp
from data_pipelines.sample import QA, Sample

SCENES = [f"scene{i:04d}_{j:02d}" for i in range(37) for j in range(2)]  # 74 scenes


def test_scene_split_is_deterministic_disjoint_and_covering():
    a = sp.make_splits(SCENES, seed=3)
    assert a == sp.make_splits(list(reversed(SCENES)), seed=3)  # depends on the sorted ids only
    assert a != sp.make_splits(SCENES, seed=4)
    assert a.mode == "scene" and a.seed == 3 and a.fractions == sp.DEFAULT_FRACTIONS
    assert sorted(a.train + a.val + a.test) == sorted(SCENES)  # each scene exactly once
    assert not (set(a.train) & set(a.val) or set(a.train) & set(a.test) or set(a.val) & set(a.test))
    assert (len(a.train), len(a.val), len(a.test)) == (59, 8, 7)  # 59.2, 7.4, 7.4: largest remainder
    assert all(list(u) == sorted(u) for u in (a.train, a.val, a.test))
    assert a.scene_ids("val") == list(a.val) and a.scene_ids() == sorted(SCENES)
    assert a.questions("val", a.val[0]) is None


@pytest.mark.parametrize("n, fractions, counts", [
    (10, (0.8, 0.1, 0.1), (8, 1, 1)),
    (74, (0.8, 0.1, 0.1), (59, 8, 7)),  # a tie of remainders goes to the earlier split
    (7, (0.5, 0.25, 0.25), (3, 2, 2)),
    (3, {"train": 0.0, "val": 0.5, "test": 0.5}, (0, 2, 1)),
    (5, (1.0, 0.0, 0.0), (5, 0, 0)),
    (1000, (0.7, 0.15, 0.15), (700, 150, 150)),
])
def test_counts_follow_the_fractions(n, fractions, counts):
    assert tuple(sp.split_counts(n, fractions).values()) == counts
    s = sp.make_splits([f"s{i}" for i in range(n)], fractions=fractions, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == counts


def test_bad_inputs_are_named():
    with pytest.raises(sp.SplitError, match="sum to 1"):
        sp.make_splits(SCENES, fractions=(0.8, 0.1, 0.2))
    with pytest.raises(sp.SplitError, match="fraction of 'val' must be a number in"):
        sp.make_splits(SCENES, fractions=(0.5, -0.1, 0.6))
    with pytest.raises(sp.SplitError, match="keys"):
        sp.make_splits(SCENES, fractions={"train": 0.9, "valid": 0.1, "test": 0.0})
    with pytest.raises(sp.SplitError, match="scene 'scene0001_00' is given twice"):
        sp.make_splits(SCENES + ["scene0001_00"])
    with pytest.raises(sp.SplitError, match="mode must be one of"):
        sp.make_splits(SCENES, mode="random")
    with pytest.raises(sp.SplitError, match="pass num_questions"):
        sp.make_splits(SCENES, mode="paper")
    with pytest.raises(sp.SplitError, match="no scenes"):
        sp.make_splits([])


def test_file_round_trip(tmp_path):
    s = sp.make_splits(SCENES, seed=7, fractions=(0.6, 0.2, 0.2))
    path = sp.write_splits(s, tmp_path)
    assert path == tmp_path / "splits.json"
    data = json.loads(path.read_text())
    assert list(data) == ["mode", "seed", "fractions", "train", "val", "test"]
    assert data["fractions"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert sp.read_splits(path, scene_ids=SCENES) == s
    assert sp.read_splits(tmp_path) == s  # a folder reads its splits.json
    assert not list(tmp_path.glob("*.tmp-*"))


def _write(tmp_path, data):
    path = tmp_path / "splits.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_read_errors(tmp_path):
    good = sp.make_splits(SCENES, seed=0).to_json()
    with pytest.raises(sp.SplitError, match=r"splits file .*missing.json does not exist; write it"):
        sp.read_splits(tmp_path / "missing.json")
    with pytest.raises(sp.SplitError, match="is not valid JSON"):
        sp.read_splits(_write(tmp_path, '{"mode": "scene",'))
    with pytest.raises(sp.SplitError, match="field 'val' is missing"):
        sp.read_splits(_write(tmp_path, {k: v for k, v in good.items() if k != "val"}))
    with pytest.raises(sp.SplitError, match="field 'mode' must be one of"):
        sp.read_splits(_write(tmp_path, {**good, "mode": "images"}))
    with pytest.raises(sp.SplitError, match="field 'seed' must be an integer"):
        sp.read_splits(_write(tmp_path, {**good, "seed": "0"}))
    with pytest.raises(sp.SplitError, match="field 'fractions': fractions must sum to 1"):
        sp.read_splits(_write(tmp_path, {**good, "fractions": {"train": 0.5, "val": 0.1, "test": 0.1}}))
    with pytest.raises(sp.SplitError, match=r"test\[1\] must be a scene id string, got 3"):
        sp.read_splits(_write(tmp_path, {**good, "test": [good["test"][0], 3]}))
    twice = {**good, "test": good["test"] + [good["train"][0]]}
    with pytest.raises(sp.SplitError, match=rf"scene '{good['train'][0]}' is listed twice \(in "
                                            r"'train' and 'test'\)"):
        sp.read_splits(_write(tmp_path, twice))
    with pytest.raises(sp.SplitError, match="listed twice \\(in 'val' and 'val'\\)"):
        sp.read_splits(_write(tmp_path, {**good, "val": good["val"] * 2}))
    path = _write(tmp_path, good)
    with pytest.raises(sp.SplitError, match=r"1 scene\(s\) on disk but in no split: \['scene9999_00'\]"):
        sp.read_splits(path, scene_ids=SCENES + ["scene9999_00"])
    with pytest.raises(sp.SplitError, match=r"1 scene\(s\) listed but not on disk: \['scene0000_00'\]"):
        sp.read_splits(path, scene_ids=SCENES[1:])


def test_paper_split_warns_and_leaks_scenes(tmp_path, caplog):
    rng = np.random.default_rng(0)
    counts = {s: int(rng.integers(5, 20)) for s in SCENES}  # questions per scene
    with pytest.warns(sp.SceneLeakWarning, match="evaluated on scenes it trained on"):
        p = sp.make_splits(SCENES, mode="paper", seed=1, num_questions=counts)
    assert "paper split" in caplog.text
    units = p.train + p.val + p.test
    assert sorted(units) == sorted((s, q) for s in SCENES for q in range(counts[s]))
    assert len(set(units)) == len(units)
    n = sum(counts.values())
    assert tuple(map(len, (p.train, p.val, p.test))) == tuple(sp.split_counts(n, (0.8, 0.1, 0.1)).values())
    # The leak: scenes whose questions fall in more than one split.
    splits_of = collections.defaultdict(set)
    for name in sp.SPLITS:
        for scene, _ in p.units(name):
            splits_of[scene].add(name)
    leaked = [s for s, names in splits_of.items() if len(names) > 1]
    assert len(leaked) > len(SCENES) // 2
    assert set(p.scene_ids("test")) & set(p.scene_ids("train"))
    # Round trip; reading warns too, every stage that uses it sees the warning.
    path = sp.write_splits(p, tmp_path / "paper.json")
    assert json.loads(path.read_text())["train"][0] == list(p.train[0])
    with pytest.warns(sp.SceneLeakWarning):
        assert sp.read_splits(path, scene_ids=SCENES) == p
    # Deterministic, and a scene split never warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sp.make_splits(SCENES, mode="paper", seed=1, num_questions=counts) == p
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.make_splits(SCENES)
    with pytest.raises(sp.SplitError, match=r"question \d+ of scene '\w+' is listed twice"):
        sp.read_splits(_write(tmp_path, {**p.to_json(), "val": [list(p.train[0])]}))
    with pytest.raises(sp.SplitError, match=r"train\[0\] must be a \[scene_id, question_index\] pair"):
        sp.read_splits(_write(tmp_path, {**p.to_json(), "train": ["scene0000_00"]}))
    with pytest.raises(sp.SplitError, match="scene .b. has num_questions=0"):
        sp.make_splits(["a", "b"], mode="paper", num_questions={"a": 2, "b": 0})


def _sample(sid, n_qa):
    return Sample(sid, np.zeros((1, 2, 2, 3), np.uint8), np.ones((1, 2, 2), np.float32),
                  np.array([[[1, 0, 1], [0, 1, 1], [0, 0, 1]]], np.float32),
                  np.eye(4, dtype=np.float32)[None], np.zeros((0, 7), np.float32),
                  np.zeros(0, np.int32), (),
                  tuple(QA(f"q{i}", "yes", "describe") for i in range(n_qa)))


def test_select():
    s = sp.make_splits(["a", "b", "c", "d"], fractions=(0.5, 0.25, 0.25), seed=0)
    for name in sp.SPLITS:
        for sid in "abcd":
            got = sp.select(_sample(sid, 2), s, name)
            assert (got is not None) == (sid in s.units(name))
    with pytest.warns(sp.SceneLeakWarning):
        p = sp.make_splits(["a", "b"], mode="paper", num_questions={"a": 4, "b": 4}, seed=0)
    seen = []
    for name in sp.SPLITS:
        for sid in "ab":
            got = sp.select(_sample(sid, 4), p, name)
            want = p.questions(name, sid)
            assert (got is None) == (not want)
            if got is not None:
                assert [q.question for q in got.qa] == [f"q{i}" for i in want]
                seen += [(sid, i) for i in want]
    assert sorted(seen) == [(sid, i) for sid in "ab" for i in range(4)]
    with pytest.raises(sp.SplitError, match="which has 1 questions"):
        for name in sp.SPLITS:
            sp.select(_sample("a", 1), p, name)
