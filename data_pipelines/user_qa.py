"""User-supplied questions for real scenes: a JSON-lines file, one question per line.

Schema of a line (a JSON object; blank lines are skipped, any other key is an error so a typo
such as "subject" is not silently dropped):

  scene_id  (required) non-empty string: the scene's `Sample.sample_id` (for ScanNet the scene
            folder name, e.g. "scene0000_00", unless its scene.json sets another sample_id).
  question  (required) non-empty string.
  answer    (required) non-empty string (a number is written as a string: "3").
  kind      (required) one of sample.QA_KINDS: proximity, contact, size, orientation, describe.
  subjects  (optional, default []) list of ints >= 0: the objects the question refers to, in
            template order ("Is the {a} near the {b}?" -> [a, b]), as indices into that scene's
            boxes in the order the reader returns them (`Sample.boxes`). Names are not
            accepted: real scenes hold several objects of a class, and an index is unambiguous.

Example:
  {"scene_id": "scene0000_00", "question": "Is the bed near the desk?", "answer": "no",
   "kind": "proximity", "subjects": [3, 7]}

`read_qa_file(path)` returns {scene_id: (QA, ...)} in file order and checks every line, raising
one `UserQAError` that lists each bad line as `file:line: field 'name': problem; fix`. Indices are
checked against a scene's boxes by `attach(sample, qas)`, which needs the scene.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

from data_pipelines.sample import QA, QA_KINDS, Sample

REQUIRED = ("scene_id", "question", "answer", "kind")
OPTIONAL = ("subjects",)
MAX_LISTED = 20  # bad lines listed in one error message


class UserQAError(ValueError):
    """A QA file or a question in it is unusable; `errors` holds one message per bad line."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors) or [message]


def _parse_line(obj, where: str) -> tuple[str, QA]:
    if not isinstance(obj, dict):
        raise UserQAError(f"{where}: a line must be a JSON object "
                          f"{{\"scene_id\": ..., \"question\": ..., \"answer\": ..., \"kind\": ...}}, "
                          f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise UserQAError(f"{where}: field '{unknown[0]}' is not part of the schema; use only "
                          f"{list(REQUIRED + OPTIONAL)}")
    for field in REQUIRED:
        if field not in obj:
            raise UserQAError(f"{where}: field '{field}' is missing; every line needs "
                              f"{list(REQUIRED)}")
        value = obj[field]
        if not isinstance(value, str) or not value.strip():
            raise UserQAError(f"{where}: field '{field}' must be a non-empty string, got "
                              f"{json.dumps(value)}; write it in double quotes")
    if obj["kind"] not in QA_KINDS:
        raise UserQAError(f"{where}: field 'kind' is {obj['kind']!r}, not a known kind; use one of "
                          f"{list(QA_KINDS)}")
    subjects = obj.get("subjects", [])
    if not isinstance(subjects, list):
        raise UserQAError(f"{where}: field 'subjects' must be a list of box indices such as [0, 2], "
                          f"got {json.dumps(subjects)}")
    for s in subjects:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise UserQAError(f"{where}: field 'subjects' holds {json.dumps(s)}; subjects must be "
                              "integers >= 0 indexing the scene's boxes (names are not accepted)")
    return obj["scene_id"], QA(obj["question"], obj["answer"], obj["kind"], tuple(subjects))


def read_qa_file(path) -> dict[str, tuple[QA, ...]]:
    """{scene_id: questions in file order} from a JSON-lines file (module docstring).

    Raises:
      UserQAError: the file is missing or unreadable, or lines are bad; the message lists each
        bad line as `path:line: field '...': problem; fix` (`errors` holds them all).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserQAError(f"QA file {path} does not exist; pass the path of a JSON-lines file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserQAError(f"QA file {path} is unreadable ({e}); write it as UTF-8 text") from e
    out: dict[str, list[QA]] = {}
    errors: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one JSON "
                          "object per line")
            continue
        try:
            scene_id, qa = _parse_line(obj, where)
        except UserQAError as e:
            errors.append(str(e))
            continue
        out.setdefault(scene_id, []).append(qa)
    if errors:
        listed = errors[:MAX_LISTED]
        more = f"\n... and {len(errors) - len(listed)} more" if len(errors) > len(listed) else ""
        raise UserQAError(f"{path}: {len(errors)} bad line(s):\n" + "\n".join(listed) + more, errors)
    return {scene_id: tuple(qas) for scene_id, qas in out.items()}


def attach(sample: Sample, qas: Sequence[QA], *, keep_existing: bool = False) -> Sample:
    """`sample` with the user's questions: they replace its own (or follow them with
    `keep_existing=True`). Every subject must index one of the sample's boxes.

    Raises:
      UserQAError: naming the scene, the question and the bad object id.
    """
    n = int(sample.boxes.shape[0])
    for q in qas:
        bad = [s for s in q.subjects if not 0 <= s < n]
        if bad:
            raise UserQAError(f"scene {sample.sample_id!r}: question {q.question!r} refers to "
                              f"object id {bad[0]}, but the scene has {n} boxes (ids 0..{n - 1}); "
                              "fix its 'subjects' (indices into the boxes as the reader returns "
                              "them)")
    qa = (tuple(sample.qa) if keep_existing else ()) + tuple(qas)
    return dataclasses.replace(sample, qa=qa)
