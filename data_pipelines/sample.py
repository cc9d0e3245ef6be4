"""The canonical sample every data source is turned into (DESIGN.md §3).

One `Sample` = one scene seen from S views, its 3D boxes and its spatial QA. Readers (synthetic,
ScanNet export, 3D-FRONT) produce it; the teacher dump and the record writer consume it.
`validate()` rejects bad shapes and values with an error naming the field and the value.

Conventions: cameras are OpenCV (x right, y down, z forward); `cam_to_world` maps camera
coordinates to world coordinates; world z is up; depth is metric z-depth in metres with 0 meaning
invalid; boxes are `(cx, cy, cz, dx, dy, dz, yaw)` in the world frame, yaw about world z.
"""

from __future__ import annotations

import dataclasses

import numpy as np

QA_KINDS = ("proximity", "contact", "size", "orientation", "describe")
# Kinds whose questions name objects: their QA carries the referred ids (subject, reference).
REFERRING_KINDS = ("proximity", "contact", "size", "orientation")


class SampleError(ValueError):
    """A sample field has a bad shape, dtype or value; the message names the field."""


@dataclasses.dataclass(frozen=True)
class QA:
    """One question about a scene. `subjects` are the objects it refers to, as indices into the
    sample's boxes, in template order: (subject, reference) for "Is the {a} near the {b}?"."""

    question: str
    answer: str
    kind: str
    subjects: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "kind": self.kind,
                "subjects": list(self.subjects)}

    @classmethod
    def from_json(cls, d: dict) -> QA:
        return cls(str(d["question"]), str(d["answer"]), str(d["kind"]),
                   tuple(int(s) for s in d.get("subjects", ())))


@dataclasses.dataclass(frozen=True)
class Sample:
    """A scene as S views plus ground truth.

    Fields:
      sample_id: unique, stable id (used in record hashes and resume bookkeeping).
      rgb: uint8 `[S, H, W, 3]`.
      depth: float32 `[S, H, W]` metres, 0 = invalid.
      intrinsics: float32 `[S, 3, 3]` pinhole K (pixels).
      cam_to_world: float32 `[S, 4, 4]` rigid transforms (OpenCV camera -> world, z up).
      boxes: float32 `[N, 7]` (cx, cy, cz, dx, dy, dz, yaw) in world metres / radians.
      labels: int32 `[N]` class ids.
      label_names: `[N]` human-readable names (e.g. "red box") used by prompts.
      qa: the questions about this scene.
    """

    sample_id: str
    rgb: np.ndarray
    depth: np.ndarray
    intrinsics: np.ndarray
    cam_to_world: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    label_names: tuple[str, ...] = ()
    qa: tuple[QA, ...] = ()

    @property
    def num_views(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.rgb.shape[1]), int(self.rgb.shape[2])

    def validate(self) -> Sample:
        """Checks every field; returns self so readers can `return Sample(...).validate()`."""
        sid = self.sample_id
        if not isinstance(sid, str) or not sid:
            raise SampleError(f"sample_id must be a non-empty string, got {sid!r}")

        def fail(field, msg):
            raise SampleError(f"sample {sid!r}: field '{field}' {msg}")

        def check(field, arr, dtype, ndim, trailing=()):
            if not isinstance(arr, np.ndarray):
                fail(field, f"must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != np.dtype(dtype):
                fail(field, f"must have dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
            if arr.ndim != ndim or (trailing and tuple(arr.shape[-len(trailing):]) != trailing):
                want = "[" + ", ".join(["*"] * (ndim - len(trailing)) + [str(t) for t in trailing]) + "]"
                fail(field, f"must have shape {want}, got {list(arr.shape)}")
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                bad = np.argwhere(~np.isfinite(arr))[0].tolist()
                fail(field, f"holds a non-finite value {float(arr[tuple(bad)])} at index {bad}")

        check("rgb", self.rgb, np.uint8, 4, (3,))
        s, h, w = self.rgb.shape[:3]
        if s < 1 or h < 1 or w < 1:
            fail("rgb", f"must hold at least one non-empty view, got shape {list(self.rgb.shape)}")
        check("depth", self.depth, np.float32, 3)
        if self.depth.shape != (s, h, w):
            fail("depth", f"must have shape {[s, h, w]} to match rgb, got {list(self.depth.shape)}")
        if (self.depth < 0).any():
            bad = np.argwhere(self.depth < 0)[0].tolist()
            fail("depth", f"must be >= 0 metres (0 = invalid), got {float(self.depth[tuple(bad)])} at {bad}")
        check("intrinsics", self.intrinsics, np.float32, 3, (3, 3))
        check("cam_to_world", self.cam_to_world, np.float32, 3, (4, 4))
        for name, arr in (("intrinsics", self.intrinsics), ("cam_to_world", self.cam_to_world)):
            if arr.shape[0] != s:
                fail(name, f"must have {s} views to match rgb, got {arr.shape[0]}")
        k = self.intrinsics.astype(np.float64)
        if (k[:, 0, 0] <= 0).any() or (k[:, 1, 1] <= 0).any():
            fail("intrinsics", f"focal lengths must be > 0, got fx={k[:, 0, 0].tolist()} fy={k[:, 1, 1].tolist()}")
        pose = self.cam_to_world.astype(np.float64)
        rot = pose[:, :3, :3]
        err = np.abs(rot @ np.swapaxes(rot, 1, 2) - np.eye(3)).max(axis=(1, 2))
        if (err > 1e-3).any() or (np.linalg.det(rot) < 0).any():
            v = int(np.argmax(err))
            fail("cam_to_world", f"view {v}: rotation is not orthonormal with det +1 "
                                 f"(max |R R^T - I| = {err[v]:.2e}, det = {np.linalg.det(rot[v]):.4f})")
        if np.abs(pose[:, 3] - np.array([0, 0, 0, 1])).max() > 1e-6:
            fail("cam_to_world", f"last row must be [0, 0, 0, 1], got {pose[0, 3].tolist()}")
        check("boxes", self.boxes, np.float32, 2, (7,))
        check("labels", self.labels, np.int32, 1)
        n = self.boxes.shape[0]
        if self.labels.shape[0] != n:
            fail("labels", f"must have {n} entries to match boxes, got {self.labels.shape[0]}")
        if n and (self.boxes[:, 3:6] <= 0).any():
            bad = np.argwhere(self.boxes[:, 3:6] <= 0)[0].tolist()
            fail("boxes", f"box {bad[0]} has a non-positive size {float(self.boxes[bad[0], 3 + bad[1]])} "
                          "(dx, dy, dz must be > 0)")
        if self.label_names and len(self.label_names) != n:
            fail("label_names", f"must have {n} entries to match boxes, got {len(self.label_names)}")
        for i, qa in enumerate(self.qa):
            if qa.kind not in QA_KINDS:
                fail(f"qa[{i}].kind", f"must be one of {QA_KINDS}, got {qa.kind!r}")
            if not qa.question or not qa.answer:
                fail(f"qa[{i}]", "must have a non-empty question and answer")
            bad = [j for j in qa.subjects if not 0 <= j < n]
            if bad:
                fail(f"qa[{i}].subjects", f"refers to object id {bad[0]}, which is not one of the "
                                          f"scene's {n} boxes (question {qa.question!r}); fix the "
                                          "QA's referred ids")
        return self
