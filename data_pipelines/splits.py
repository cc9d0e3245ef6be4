"""Train/val/test splits of real scenes, written once to `splits.json` and read by every stage.

Modes:
  "scene" (default): scene-disjoint. The unit is a scene id (`Sample.sample_id`, e.g.
    "scene0000_00"); every scene is in exactly one split, so no view or question of a test scene
    is ever trained on.
  "paper": the paper's random split, kept to reproduce its numbers, for comparison only. The unit
    is one question of one scene: the pair (scene_id, question_index), question_index indexing
    that scene's `Sample.qa` in the order its reader (or `attach`) gives them. Units are assigned
    at random, so one scene's views appear in several splits with different questions: the model
    is evaluated on scenes it was trained on (scene leak). Making or reading such a split warns
    (`SceneLeakWarning` and logging.warning).

Assignment, deterministic given the units and the seed: the units are sorted (scene ids as
strings; pairs by scene id, then index), permuted by `numpy.random.default_rng(seed)`, and cut
into train, val, test of `split_counts(len(units), fractions)` units: floor(fraction * n) each,
the remaining units going one each to the splits with the largest fractional parts (ties in
train, val, test order). Each split's list is stored sorted.

File (`splits.json`):
  {"mode": "scene", "seed": 0, "fractions": {"train": 0.8, "val": 0.1, "test": 0.1},
   "train": ["scene0000_00", ...], "val": [...], "test": [...]}
In "paper" mode the lists hold [scene_id, question_index] pairs. `read_splits` checks the file
and, given the scenes on disk, that it covers exactly them; every problem is a `SplitError` that
names the file, the field or scene, and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping

import numpy as np

from data_pipelines.sample import Sample

FILENAME = "splits.json"
MODES = ("scene", "paper")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
KEYS = ("mode", "seed", "fractions", *SPLITS)

log = logging.getLogger(__name__)

LEAK_MESSAGE = ("paper split (mode='paper'): questions are split at random, so one scene's views "
                "appear in several splits and the model is evaluated on scenes it trained on; use "
                "it only to compare with the paper's protocol (mode='scene' is scene-disjoint)")


class SplitError(ValueError):
    """The splits or the splits file are unusable; the message names the file, field or scene."""


class SceneLeakWarning(UserWarning):
    """A "paper" split: the same scene is in several splits."""


def _warn_leak(where: str) -> None:
    warnings.warn(f"{where}: {LEAK_MESSAGE}", SceneLeakWarning, stacklevel=3)
    log.warning("%s: %s", where, LEAK_MESSAGE)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Units per split: scene ids ("scene" mode) or (scene_id, question_index) pairs ("paper")."""

    mode: str
    seed: int
    fractions: dict
    train: tuple
    val: tuple
    test: tuple

    def units(self, name: str) -> tuple:
        if name not in SPLITS:
            raise SplitError(f"unknown split {name!r}; use one of {list(SPLITS)}")
        return getattr(self, name)

    def scene_ids(self, name: str | None = None) -> list[str]:
        """Sorted scenes in split `name` (every split when None)."""
        names = SPLITS if name is None else (name,)
        units = [u for n in names for u in self.units(n)]
        return sorted({u if self.mode == "scene" else u[0] for u in units})

    def questions(self, name: str, scene_id: str) -> tuple[int, ...] | None:
        """Question indices of `scene_id` in split `name` ("paper" mode); None in "scene" mode,
        where a scene comes with all its questions (or not at all: see `select`)."""
        if self.mode == "scene":
            return None
        return tuple(q for s, q in self.units(name) if s == scene_id)

    def to_json(self) -> dict:
        return {"mode": self.mode, "seed": self.seed, "fractions": dict(self.fractions),
                **{n: [u if self.mode == "scene" else list(u) for u in self.units(n)]
                   for n in SPLITS}}


def check_fractions(fractions) -> dict:
    """{"train": f, "val": f, "test": f} from a mapping with those keys or a 3-sequence; each in
    [0, 1], summing to 1 (within 1e-6)."""
    if isinstance(fractions, Mapping):
        if set(fractions) != set(SPLITS):
            raise SplitError(f"fractions must have the keys {list(SPLITS)}, got {sorted(fractions)}")
        values = [fractions[n] for n in SPLITS]
    else:
        values = list(fractions)
        if len(values) != len(SPLITS):
            raise SplitError(f"fractions must be 3 numbers (train, val, test), got {values}")
    for n, f in zip(SPLITS, values):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise SplitError(f"fraction of '{n}' must be a number in [0, 1], got {f!r}")
    if abs(sum(values) - 1) > 1e-6:
        raise SplitError(f"fractions must sum to 1, got {dict(zip(SPLITS, values))} "
                         f"(sum {sum(values)})")
    return {n: float(f) for n, f in zip(SPLITS, values)}


def split_counts(n: int, fractions) -> dict[str, int]:
    """Units per split for `n` units (largest remainder; module docstring)."""
    fr = check_fractions(fractions)
    exact = [fr[s] * n for s in SPLITS]
    counts = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(SPLITS)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:n - sum(counts)]:
        counts[k] += 1
    return dict(zip(SPLITS, counts))


def make_splits(scene_ids: Iterable[str], *, mode: str = "scene", seed: int = 0,
                fractions=DEFAULT_FRACTIONS,
                num_questions: Mapping[str, int] | None = None) -> Splits:
    """Splits `scene_ids` (module docstring).

    Args:
      scene_ids: every scene of the dataset (any order; ids must be unique).
      mode: "scene" (scene-disjoint) or "paper" (random per question; warns: scene leak).
      seed: the permutation's seed.
      fractions: train/val/test shares (mapping or 3 numbers summing to 1).
      num_questions: "paper" mode only: scene id -> number of questions (>= 1) of every scene.
    """
    if mode not in MODES:
        raise SplitError(f"mode must be one of {list(MODES)}, got {mode!r}")
    fr = check_fractions(fractions)
    ids = list(scene_ids)
    bad = next((s for s in ids if not isinstance(s, str) or not s), None)
    if bad is not None:
        raise SplitError(f"scene ids must be non-empty strings, got {bad!r}")
    seen: set[str] = set()
    dup = next((s for s in ids if s in seen or seen.add(s)), None)
    if dup is not None:
        raise SplitError(f"scene {dup!r} is given twice; pass each scene id once")
    if not ids:
        raise SplitError("no scenes to split")
    if mode == "scene":
        if num_questions is not None:
            raise SplitError("num_questions is only used by mode='paper'")
        units: list = sorted(ids)
    else:
        if num_questions is None:
            raise SplitError("mode='paper' splits questions: pass num_questions={scene_id: count}")
        missing = [s for s in ids if s not in num_questions]
        if missing:
            raise SplitError(f"num_questions has no count for scene {missing[0]!r} "
                             f"({len(missing)} scenes lack one)")
        for s in ids:
            c = num_questions[s]
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
                raise SplitError(f"scene {s!r} has num_questions={c!r}; a paper split needs at "
                                 "least one question per scene (drop scenes without questions)")
        units = [(s, q) for s in sorted(ids) for q in range(int(num_questions[s]))]
        _warn_leak("make_splits")
    perm = np.random.default_rng(int(seed)).permutation(len(units))
    counts = split_counts(len(units), fr)
    out, start = {}, 0
    for name in SPLITS:
        out[name] = tuple(sorted(units[i] for i in perm[start:start + counts[name]]))
        start += counts[name]
    return Splits(mode, int(seed), fr, **out)


def _file(path) -> pathlib.Path:
    path = pathlib.Path(path)
    return path / FILENAME if path.is_dir() else path


def write_splits(splits: Splits, path) -> pathlib.Path:
    """Writes `splits` to `path` (a file, or a folder to hold `splits.json`) atomically; returns
    the file written."""
    path = _file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(splits.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _unit(value, mode: str, where: str):
    if mode == "scene":
        if not isinstance(value, str) or not value:
            raise SplitError(f"{where} must be a scene id string, got {json.dumps(value)}")
        return value
    if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str)
            or not value[0] or isinstance(value[1], bool) or not isinstance(value[1], int)
            or value[1] < 0):
        raise SplitError(f"{where} must be a [scene_id, question_index] pair (paper mode), got "
                         f"{json.dumps(value)}")
    return value[0], value[1]


def read_splits(path, *, scene_ids: Iterable[str] | None = None) -> Splits:
    """Reads and checks a splits file (or a folder's `splits.json`).

    Args:
      scene_ids: the scenes on disk; when given, every one of them must be in the file and the
        file may list no other scene.

    Raises:
      SplitError: the file is missing or not valid JSON, a field is missing or malformed, a unit
        is listed twice, or the file does not cover exactly `scene_ids`.
    """
    path = _file(path)
    fix = "write it with data_pipelines.splits.make_splits + write_splits"
    if not path.is_file():
        raise SplitError(f"splits file {path} does not exist; {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SplitError(f"splits file {path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(data, dict):
        raise SplitError(f"{path}: must hold a JSON object with keys {list(KEYS)}")
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise SplitError(f"{path}: field '{missing[0]}' is missing; a splits file has {list(KEYS)}")
    mode = data["mode"]
    if mode not in MODES:
        raise SplitError(f"{path}: field 'mode' must be one of {list(MODES)}, got {mode!r}")
    seed = data["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SplitError(f"{path}: field 'seed' must be an integer, got {json.dumps(seed)}")
    try:
        fractions = check_fractions(data["fractions"])
    except SplitError as e:
        raise SplitError(f"{path}: field 'fractions': {e}") from e
    lists, where_of = {}, {}
    for name in SPLITS:
        if not isinstance(data[name], list):
            raise SplitError(f"{path}: field '{name}' must be a list, got {type(data[name]).__name__}")
        units = []
        for k, value in enumerate(data[name]):
            u = _unit(value, mode, f"{path}: {name}[{k}]")
            if u in where_of:
                what = f"scene {u!r}" if mode == "scene" else f"question {u[1]} of scene {u[0]!r}"
                raise SplitError(f"{path}: {what} is listed twice (in '{where_of[u]}' and "
                                 f"'{name}'); each must be in exactly one split")
            where_of[u] = name
            units.append(u)
        lists[name] = tuple(units)
    splits = Splits(mode, seed, fractions, **lists)
    if scene_ids is not None:
        on_disk, listed = set(scene_ids), set(splits.scene_ids())
        for missing, msg in ((sorted(on_disk - listed), "on disk but in no split"),
                             (sorted(listed - on_disk), "listed but not on disk")):
            if missing:
                raise SplitError(f"{path}: {len(missing)} scene(s) {msg}: {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}; every scene on disk must "
                                 f"be in exactly one split: regenerate the file ({fix}) over the "
                                 "scenes on disk")
    if mode == "paper":
        _warn_leak(str(path))
    return splits


def select(sample: Sample, splits: Splits, name: str) -> Sample | None:
    """The part of `sample` that belongs to split `name`: the whole sample or None ("scene"
    mode); the sample with only that split's questions, or None when it has none ("paper")."""
    if splits.mode == "scene":
        return sample if sample.sample_id in set(splits.units(name)) else None
    keep = splits.questions(name, sample.sample_id)
    if not keep:
        return None
    bad = [q for q in keep if q >= len(sample.qa)]
    if bad:
        raise SplitError(f"split '{name}' lists question {bad[0]} of scene {sample.sample_id!r}, "
                         f"which has {len(sample.qa)} questions; regenerate the splits from the "
                         "scenes' current questions")
    return dataclasses.replace(sample, qa=tuple(sample.qa[q] for q in keep))
