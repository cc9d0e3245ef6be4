"""The eval report: `WORKDIR/eval/report.md` and `report.html`, with pictures (matplotlib).

Sections: the metric tables (grounded beside paper-mode per kind, text, depth, 3D boxes, and
what was skipped), the training curves read from `WORKDIR/metrics.jsonl` (train and held-out
loss, and every `aux/*` task loss), and for a few held-out samples: the input views, predicted vs
ground-truth depth of view 0 (with a depth head), the ground-truth boxes (and predicted ones, with
a detection head) drawn into view 0, and each question with the teacher's, the student's and the
grounded answer. Images go to `WORKDIR/eval/report/`; both documents link them.
"""

from __future__ import annotations

import collections
import html
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spatial_distill import geometry  # noqa: E402

# Box corner signs (x, y, z) in the box frame, and the 12 edges between corner indices.
_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64) / 2
_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if np.abs(_CORNERS[a] - _CORNERS[b]).sum() == 1]


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """Yawed boxes `[N, 7]` -> corners `[N, 8, 3]` in the boxes' frame."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
    local = _CORNERS[None] * boxes[:, None, 3:6]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    x = c[:, None] * local[..., 0] - s[:, None] * local[..., 1]
    y = s[:, None] * local[..., 0] + c[:, None] * local[..., 1]
    return np.stack([x, y, local[..., 2]], -1) + boxes[:, None, :3]


def _tables(metrics: dict, notes: list[str]) -> list[str]:
    kinds = sorted({k.split("/")[1][:-4] for k in metrics if k.startswith("grounded/") and k.endswith("_acc")},
                   key=lambda k: (k == "overall", k))
    out = ["## Spatial QA (held-out)", "",
           "| kind | grounded | teacher-forced | teacher | retention | paper-mode | questions |",
           "|---|---|---|---|---|---|---|"]
    fmt = lambda key: f"{metrics[key]:.3f}" if key in metrics else "-"  # noqa: E731
    for k in kinds:
        out.append(f"| {k} | {fmt(f'grounded/{k}_acc')} | {fmt(f'grounded_forced/{k}_acc')} | "
                   f"{fmt(f'teacher/{k}_acc')} | {fmt(f'retention/{k}')} | {fmt(f'paper_mode/{k}_acc')} | "
                   f"{metrics.get(f'grounded/{k}_n', '-')} |")
    out += ["", "Grounded: the student's first answer word against the answer computed from the "
            "scene geometry. Paper-mode: the paper's metric, whether the student's and the teacher's "
            "answers agree on containing a keyword of the kind (no ground truth). Unparsable "
            f"answers: {fmt('grounded/unparsable_frac')}.", ""]
    for title, prefix in (("Text against the teacher's answers", "text/"), ("Depth", "depth/"),
                          ("3D boxes", "det/")):
        rows = [(k, v) for k, v in sorted(metrics.items()) if k.startswith(prefix)]
        if rows:
            out += [f"## {title}", "", "| metric | value |", "|---|---|"]
            out += [f"| `{k}` | {v:.4f} |" for k, v in rows] + [""]
    if "text/meteor_wordnet" in metrics and not metrics["text/meteor_wordnet"]:
        out += ["METEOR: exact + Porter-stem matching (no WordNet data offline), a lower bound.", ""]
    if notes:
        out += ["## Skipped", ""] + [f"- {n}" for n in notes] + [""]
    return out


def _curves(workdir: str, out_dir: str) -> str | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(line) for line in open(path) if line.strip()]
    series = collections.defaultdict(list)
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and (
                    k in ("learning/loss", "eval/learning/loss") or k.startswith("aux/")):
                series[k].append((r["step"], v))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, pts in sorted(series.items()):
        steps, values = zip(*pts)
        ax.plot(steps, values, label=k, marker="o" if k.startswith("eval/") else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.legend(fontsize=7)
    ax.set_title("training (lines) and held-out (markers) losses")
    fig.tight_layout()
    name = "curves.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def _sample_figure(sample, heads: dict, b: int, out_dir: str, index: int) -> str:
    S = sample.num_views
    depth_pred = heads.get("depth")
    cols = S + (2 if depth_pred is not None else 0)
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 2.9))
    axes = np.atleast_1d(axes)
    for v in range(S):
        axes[v].imshow(sample.rgb[v])
        axes[v].set_title(f"view {v}", fontsize=8)
    # Boxes into view 0: ground truth (green) from the world frame, predictions (red) from
    # camera 0's frame, where the detection head predicts them.
    K, pose = sample.intrinsics[None, :1], sample.cam_to_world[None, :1]
    sets = [(np.asarray(sample.boxes), "lime")]
    if "det_boxes" in heads:
        probs = heads["det_probs"][b][:, :-1]
        keep = probs.max(-1) > 0.5
        world = np.asarray(geometry.boxes_from_camera0_frame(heads["det_boxes"][b][keep][None],
                                                             sample.cam_to_world[None]))[0]
        sets.append((world, "red"))
    h, w = sample.rgb.shape[1:3]
    for boxes, colour in sets:
        if not len(boxes):
            continue
        corners = box_corners(boxes).reshape(1, -1, 3)
        uvz = np.asarray(geometry.project(corners, pose, K))[0, 0].reshape(-1, 8, 3)
        for box in uvz:
            for a, c in _EDGES:
                if box[a, 2] > 0 and box[c, 2] > 0:
                    axes[0].plot(box[[a, c], 0], box[[a, c], 1], color=colour, linewidth=0.8)
    axes[0].set_xlim(0, w - 1)
    axes[0].set_ylim(h - 1, 0)
    if depth_pred is not None:
        vmax = float(np.percentile(sample.depth[0][sample.depth[0] > 0], 99)) if (sample.depth[0] > 0).any() else 1
        axes[S].imshow(sample.depth[0], vmin=0, vmax=vmax, cmap="viridis")
        axes[S].set_title("GT depth, view 0", fontsize=8)
        axes[S + 1].imshow(depth_pred[b][0], vmin=0, vmax=vmax, cmap="viridis")
        axes[S + 1].set_title("predicted depth", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    name = f"sample_{index}.png"
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    return name


def write(eval_dir: str, workdir: str, metrics: dict, notes: list[str], examples=(),
          heads: dict | None = None) -> tuple[str, str]:
    """Writes report.md and report.html; `examples` are records (samples with teacher answers)
    drawn as pictures, `heads` the model's head outputs for them (`predictions._heads_out`)."""
    pics = os.path.join(eval_dir, "report")
    os.makedirs(pics, exist_ok=True)
    lines = ["# Evaluation report", ""] + _tables(metrics, notes)
    curves = _curves(workdir, pics)
    if curves:
        lines += ["## Training curves", "", f"![curves](report/{curves})", ""]
    preds = collections.defaultdict(list)
    path = os.path.join(eval_dir, "predictions.jsonl")
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            preds[r["sample_id"]].append(r)
    if examples:
        lines += ["## Held-out samples", "",
                  "Ground-truth boxes in green, predicted boxes (detection head, score > 0.5) in red.", ""]
    for i, rec in enumerate(examples):
        rows = preds.get(rec.sample.sample_id, [])
        pic = _sample_figure(rec.sample, heads or {}, i, pics, i)
        lines += [f"### {rec.sample.sample_id}", "", f"![sample {i}](report/{pic})", "",
                  "| question | teacher | student | grounded |", "|---|---|---|---|"]
        for r in rows:
            cells = [r["question"], r["teacher_text"], r["answer_text"], r["gt"]]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines.append("")
    md = "\n".join(lines) + "\n"
    md_path = os.path.join(eval_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(md)
    html_path = os.path.join(eval_dir, "report.html")
    with open(html_path, "w") as f:
        f.write(_html(lines))
    return md_path, html_path


def _html(lines: list[str]) -> str:
    """The markdown subset written above (headings, tables, images, paragraphs) as HTML."""
    body, table = [], False
    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not table:
                body.append("<table border=1 cellspacing=0 cellpadding=3>")
                table = True
            body.append("<tr>" + "".join(f"<td>{html.escape(c).replace('`', '')}</td>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("</table>")
            table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img src="{html.escape(src[:-1])}" alt="{html.escape(alt)}">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if table:
        body.append("</table>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title></head>"
            "<body style='font-family:sans-serif'>\n" + "\n".join(body) + "\n</body></html>\n")


__all__ = ["box_corners", "write"]
