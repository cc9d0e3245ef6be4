"""Learning study: held-out spatial accuracy against training steps, per recipe (docs/learning.md).

  # one run: the main job's stages with overrides, checkpoints every --every steps, each scored
  python -m benchmarks.study_learning run --base=W --name=grounding --steps=800 --every=100 \
      [--seed=0] [-- --config.loss.grounding=False ...]
  # a longer run that shares the first 4,500 steps of run `short` (wsd: before its decay)
  python -m benchmarks.study_learning run --base=W --name=long --steps=10000 --branch=short:4500 [-- ...]
  # the same run's checkpoints scored on a larger eval split, prepared in workdir W2
  python -m benchmarks.study_learning score --base=W --name=grounding --eval_base=W2 \
      [--at=800] [-- --config.data.num_eval_scenes=1000 ...]
  # where a run's answers fail: accuracy by objects in the scene, by the pixels showing the
  # question's objects, proximity by surface gap
  python -m benchmarks.study_learning crowding --base=W2/study_predictions/NAME/predictions_800.jsonl \
      [--image_size=112]
  # a run's errors against another's (e.g. the vision ceiling's --answers), question by question
  python -m benchmarks.study_learning overlap --base=PREDICTIONS.jsonl --against=OTHER.jsonl
  # the text-only prior of a workdir's data
  python -m benchmarks.study_learning prior --base=W
  # the plot of every run under W/study (or --only=a,b), of one or several bases (seeds)
  python -m benchmarks.study_learning plot --base=W0,W1 --out=docs/learning_curves.png

A run trains in `W/study/<name>` on the records of `W` (data and dump run there first, as the
main job's), then loads every saved checkpoint and answers the held-out questions as the eval
stage does: generated-answer accuracy (`grounded/<kind>_acc`) and the teacher-forced yes/no
accuracy (`grounded_forced/<kind>_acc`). Results go to `W/study/<name>.json` with the wall time.

The text-only prior answers each held-out question with the majority training answer of its
template and of its objects' shapes (no images, no training): the line every accuracy here must be
read against.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

KINDS = ("proximity", "contact", "size", "orientation")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_steps(ckpt_dir: str, at: str | None = None) -> list[int]:
    """The saved checkpoint steps of `ckpt_dir` to score: all, or those named in `at` ("1000,6000")."""
    saved = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    if not at:
        return saved
    wanted = sorted({int(s) for s in at.split(",")})
    missing = [s for s in wanted if s not in saved]
    if missing:
        raise SystemExit(f"--at={at}: no checkpoint at step(s) {missing} in {ckpt_dir} (saved: {saved}); "
                         "name saved steps or leave --at out")
    return wanted


def prepare(args, workdir: str, overrides) -> None:
    """Data and records of `workdir`, as the main job's (resumable: found complete after the first
    run). The data overrides (e.g. --config.data.num_train_scenes) shape its records too."""
    flags = [f"--config=configs/student.py:{args.preset}", f"--workdir={workdir}", f"--config.seed={args.seed}"]
    data_overrides = [o for o in overrides if o.startswith("--config.data.")]
    for mode in ("data", "dump"):
        subprocess.run([sys.executable, "run.py", *flags, f"--config.mode={mode}", *data_overrides],
                       cwd=ROOT, check=True)


def run(args, overrides) -> None:
    out = os.path.join(args.base, "study", args.name)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    prepare(args, args.base, overrides)
    t_data = time.time() - t0
    records, tok = os.path.join(args.base, "records"), os.path.join(args.base, "tokenizer")
    if args.branch:
        config = study_config(args, overrides).copy_and_resolve_references()
        config.train.steps = args.steps
        branch(args.base, args.name, args.branch, config)
    train = [sys.executable, "run.py", f"--config=configs/student.py:{args.preset}", f"--workdir={out}",
             "--config.mode=train", f"--config.seed={args.seed}", f"--config.train.steps={args.steps}",
             f"--config.train.checkpoint_every={args.every}", "--config.train.keep_checkpoints=1000",
             f"--config.teacher.records_dir={records}", f"--config.tokenizer.path={tok}", *overrides]
    t1 = time.time()
    subprocess.run(train, cwd=ROOT, check=True)
    # A rerun (e.g. after a failed scoring) resumes at the last step: keep the first run's wall.
    wall_file = os.path.join(out, "train_wall_s.json")
    if not os.path.exists(wall_file):
        with open(wall_file, "w") as f:
            json.dump(time.time() - t1, f)
    t_train = json.load(open(wall_file))
    scores = evaluate_checkpoints(args, out, overrides, records, tok)
    result = {"name": args.name, "seed": args.seed, "steps": args.steps, "overrides": overrides,
              "wall_s": {"data_and_dump": t_data, "train": t_train}, "curve": scores}
    branched = os.path.join(out, "branched_from.json")
    if os.path.exists(branched):  # its train wall covers the steps after the branch only
        result["branched_from"] = json.load(open(branched))
    with open(os.path.join(args.base, "study", f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    last = scores[-1]
    print(f"{args.name}: step {last['step']}: " + ", ".join(
        f"{k} {last.get(f'grounded/{k}_acc', float('nan')):.3f}" for k in KINDS))


def score(args, overrides) -> None:
    """Every checkpoint of the run `BASE/study/NAME` scored on the eval split of another workdir,
    `--eval_base` (prepared first with the `--config.data.*` overrides, e.g. a 1,000-scene eval
    split: the first scenes of a split do not depend on its size). The run's own tokenizer reads
    the new records, so both workdirs must share it (same seed and data)."""
    out = os.path.join(args.base, "study", args.name)
    prepare(args, args.eval_base, overrides)
    preds = os.path.join(args.eval_base, "study_predictions", args.name)
    os.makedirs(preds, exist_ok=True)
    scores = evaluate_checkpoints(args, out, overrides, os.path.join(args.eval_base, "records"),
                                  os.path.join(args.base, "tokenizer"), predictions_dir=preds)
    result = {"name": f"{args.name} on {args.eval_base}", "seed": args.seed, "overrides": overrides,
              "curve": scores}
    path = os.path.join(args.base, "study", f"{args.name}_on_{os.path.basename(os.path.normpath(args.eval_base))}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def study_config(args, overrides):
    """The run's config as run.py parses it: the preset, the seed and `overrides`."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    argv = [sys.argv[0], f"--config=configs/student.py:{args.preset}", f"--config.seed={args.seed}", *overrides]
    # Its own flag registry per call: parsing defines a flag per `--config.x` override, so a
    # second parse into one registry (a branched run asks before training and again to score)
    # would define them twice.
    flag_values = absl_flags.FlagValues()
    # config_flags finds `--config.x` overrides in the argv it is given at definition.
    config_flags.DEFINE_config_file("config", f"configs/student.py:{args.preset}",
                                    flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


# Fields the study sets on the train command line itself (the same for a branch and its source,
# but the length and the checkpoint cadence, which a branch may change).
RUN_FIELDS = ("mode", "teacher.records_dir", "tokenizer.path", "train.steps", "train.checkpoint_every",
              "train.keep_checkpoints")


def branch(base: str, name: str, spec: str, config) -> None:
    """Starts run `name` at a step of another run of `base` (`spec` = "SOURCE:STEP"): its
    checkpoint, metrics and events up to there are copied, and the trainer resumes from it.

    A longer wsd run shares its first steps with a shorter one, up to where the shorter one's
    decay starts; the trainer's resume restores state, RNG and input position exactly, so the
    branch is the run `config` would train from scratch. That is checked, not assumed: refused
    unless the source's stored config equals `config` but the length and checkpoint cadence, and
    both give the same learning rate at every step up to STEP. Nothing happens when `name`
    already has checkpoints (a rerun resumes its own). Writes `name/branched_from.json`."""
    import shutil

    import ml_collections
    import numpy as np

    from spatial_distill.train import checkpoint as ckpt_lib
    from spatial_distill.train import step as step_lib

    source, _, at = spec.rpartition(":")
    if not source or not at.isdigit():
        raise SystemExit(f"--branch={spec}: expected SOURCE:STEP, e.g. recipe_6000:4500")
    out, step = os.path.join(base, "study", name), int(at)

    def saved(ckpt_dir):
        return checkpoint_steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []

    if saved(os.path.join(out, "checkpoints")):
        return
    src_dir = os.path.join(base, "study", source, "checkpoints")
    if step not in saved(src_dir):
        raise SystemExit(f"--branch={spec}: {src_dir} has no step {step} (saved: {saved(src_dir)})")
    reader = ckpt_lib.Checkpointer(src_dir, keep=1000, create=False)
    stored = reader.meta(step)["config"]
    reader.close()
    diffs = ckpt_lib.config_diffs(stored, ckpt_lib.config_dict(config), RUN_FIELDS)
    if diffs:
        listed = "; ".join(f"{k}: {source} {a!r}, this run {b!r}" for k, a, b in diffs[:6])
        raise SystemExit(f"--branch={spec}: the runs differ in more than their length ({listed}); "
                         "pass the source's --seed and overrides")
    if int(config.train.steps) <= step:
        raise SystemExit(f"--branch={spec}: --steps={config.train.steps} must be past step {step}")
    steps = np.arange(step + 1)
    ours = np.asarray(step_lib.learning_rate_schedule(config)(steps))
    theirs = np.asarray(step_lib.learning_rate_schedule(ml_collections.ConfigDict(stored))(steps))
    if not np.array_equal(ours, theirs):
        k = int(np.argmax(ours != theirs))
        raise SystemExit(f"--branch={spec}: the learning rate of a {config.train.steps}-step run differs "
                         f"from {source}'s at step {k} ({ours[k]:.3g} vs {theirs[k]:.3g}): branch from "
                         f"a step before {k} (a wsd run's decay start; a cosine run cannot branch)")
    # Everything lands beside the checkpoints first: the step directory appears last, so a copy
    # cut short is redone by the rerun, never resumed from.
    staging = os.path.join(out, f".branching-{step}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(os.path.join(src_dir, str(step)), staging)
    for extra in ("metrics.jsonl", "tb"):  # the trainer cuts both back to `step` on resume
        there = os.path.join(base, "study", source, extra)
        if os.path.isdir(there):
            shutil.copytree(there, os.path.join(out, extra), dirs_exist_ok=True)
        elif os.path.exists(there):
            shutil.copyfile(there, os.path.join(out, extra))
    with open(os.path.join(out, "branched_from.json"), "w") as f:
        json.dump({"run": source, "step": step}, f)
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    os.rename(staging, os.path.join(out, "checkpoints", str(step)))


def evaluate_checkpoints(args, out, overrides, records, tok, predictions_dir: str | None = None) -> list[dict]:
    """Grounded accuracy of every checkpoint in `out` (the eval stage's scoring); predictions go
    to `predictions_dir` (default `out`)."""
    import jax
    from flax import nnx

    from data_pipelines import teacher_records as tr
    from spatial_distill.eval import grounded
    from spatial_distill.models import student as st
    from spatial_distill.teacher import dump
    from spatial_distill.tokenizer import load_tokenizer
    from spatial_distill.train import checkpoint as ckpt_lib
    from spatial_distill.train import step as step_lib

    config = dump.with_record_lengths(study_config(args, overrides), tr.read_meta(records), records)
    tokenizer = load_tokenizer(tok)
    cfg = st.config_from(config.model, config.data.image_size, tokenizer)
    graphdef, abstract_state = nnx.split(st.create(cfg, abstract=True))
    place = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"student": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place),
                                        abstract_state.to_pure_dict())}
    ckpt_dir = os.path.join(out, "checkpoints")
    steps = checkpoint_steps(ckpt_dir, getattr(args, "at", None))
    scores = []
    for step in steps:
        params = ckpt_lib.load_params(ckpt_dir, abstract, step)
        model = step_lib.student_from(graphdef, abstract_state, params["student"])
        predictions = os.path.join(predictions_dir or out, f"predictions_{step}.jsonl")
        m = grounded.evaluate(model, tokenizer, records, split="eval", batch_size=config.train.batch_size,
                              max_questions=config.input.max_questions,
                              max_prompt_len=config.input.max_prompt_len,
                              max_new_tokens=config.input.max_answer_len, predictions_path=predictions)
        scores.append({"step": step, **{k: v for k, v in m.items() if k.startswith("grounded")},
                       **per_relation(predictions)})
        print(f"  step {step}: " + ", ".join(f"{k} {m[f'grounded/{k}_acc']:.3f}" for k in KINDS), flush=True)
    return scores


def relation_patterns() -> dict[str, re.Pattern]:
    """Each relation of `spatial_qa.RELATIONS` as a regex of its question, the two object names
    captured ("Is the (.+) near the (.+)?")."""
    from data_pipelines import spatial_qa

    return {name: re.compile("^" + re.escape(t).replace(r"\{a\}", "(.+)").replace(r"\{b\}", "(.+)") + "$")
            for name, (_, t, _) in spatial_qa.RELATIONS.items()}


def per_relation(predictions_path: str) -> dict[str, float]:
    """Generated-answer accuracy per question template (`relation/<name>_acc`, the relations of
    `spatial_qa.RELATIONS`), from the eval stage's predictions file."""
    patterns = relation_patterns()
    right, total = collections.Counter(), collections.Counter()
    for line in open(predictions_path):
        p = json.loads(line)
        name = next((n for n, pat in patterns.items() if pat.match(p["question"])), None)
        if name:
            right[name] += p["answer"] == p["gt"]
            total[name] += 1
    return {f"relation/{n}_acc": right[n] / total[n] for n in patterns if total[n]}


def crowding(predictions_path: str, image_size: int = 112) -> dict[str, dict]:
    """Where a run's answers fail, from its predictions on synthetic scenes (the layout is
    regenerated from the sample id, its cameras fitted for `image_size`, the size the run saw):
    accuracy per kind by objects in the scene, by how many pixels (over every view) show the
    question's less visible object, and proximity accuracy by the pair's surface gap (asked only
    below 0.10 m or above 0.50 m)."""
    from data_pipelines import spatial_qa, synthetic

    bands = (0.0, 1e-3, 0.03, 0.06, 0.10, 0.50, 0.60, 0.75, 1.0, 1.5, float("inf"))
    pixel_bands = (0, 50, 100, 200, 400, float("inf"))
    templates = relation_patterns().values()
    by_count, by_pixels, by_gap = (collections.defaultdict(list) for _ in range(3))
    layouts = {}
    for line in open(predictions_path):
        p = json.loads(line)
        if p["kind"] not in KINDS:
            continue
        prefix, _, seed = p["sample_id"].partition("-")
        if prefix != "synthetic":
            raise SystemExit(f"{predictions_path}: sample {p['sample_id']!r} is not synthetic; "
                             "crowding regenerates synthetic layouts only")
        if seed not in layouts:
            lay = synthetic.sample_layout(int(seed), image_size=image_size)
            layouts[seed] = lay, synthetic.visible_pixels(lay).sum(0)
        lay, pixels = layouts[seed]
        ok = p["answer"] == p["gt"]
        by_count[(p["kind"], len(lay.prims))].append(ok)
        m = next((m for t in templates if (m := t.match(p["question"]))), None)
        if m is None:
            raise SystemExit(f"{predictions_path}: sample {p['sample_id']}: {p['question']!r} is no "
                             "question of spatial_qa.RELATIONS")
        a, b = (lay.names.index(n) for n in m.groups())
        fewer = min(pixels[a], pixels[b])
        band = next(i for i in range(len(pixel_bands) - 1) if fewer < pixel_bands[i + 1])
        by_pixels[(p["kind"], pixel_bands[band], pixel_bands[band + 1])].append(ok)
        if p["kind"] == "proximity":
            gap = spatial_qa.surface_gap(lay.prims[a], lay.prims[b])
            band = next(i for i in range(len(bands) - 1) if gap < bands[i + 1])
            by_gap[(bands[band], bands[band + 1])].append(ok)
    def summary(v):  # (accuracy, questions)
        return sum(v) / len(v), len(v)

    return {"by_objects": {f"{k}/{n}": summary(v) for (k, n), v in sorted(by_count.items())},
            "by_pixels_of_less_visible_object": {
                f"{k}/{lo:g}-{hi:g} px": summary(v) for (k, lo, hi), v in sorted(by_pixels.items())},
            "proximity_by_gap": {f"{lo:g}-{hi:g} m": summary(v) for (lo, hi), v in sorted(by_gap.items())}}


def overlap(predictions_path: str, against_path: str) -> dict[str, dict[str, int]]:
    """Per kind, the questions both answer files hold (joined on sample id and question), split
    by who is right: both, only the first, only the second, neither."""
    def read(path):
        rows = {}
        for line in open(path):
            p = json.loads(line)
            if p["kind"] in KINDS:
                rows[(p["sample_id"], p["question"])] = p
        return rows

    a, b = read(predictions_path), read(against_path)
    joined = sorted(a.keys() & b.keys())
    if not joined:
        raise SystemExit(f"{predictions_path} and {against_path} share no grounded question "
                         "(sample_id, question); answer the same eval scenes in both")
    table = {}
    for key in joined:
        pa, pb = a[key], b[key]
        if pa["gt"] != pb["gt"]:
            raise SystemExit(f"{key}: ground truth {pa['gt']!r} in {predictions_path} but {pb['gt']!r} "
                             f"in {against_path}; the two answer different data")
        ra, rb = pa["answer"] == pa["gt"], pb["answer"] == pb["gt"]
        row = table.setdefault(pa["kind"], dict.fromkeys(("both", "first_only", "second_only", "neither"), 0))
        row["both" if ra and rb else "first_only" if ra else "second_only" if rb else "neither"] += 1
    return {k: table[k] for k in KINDS if k in table}


def text_prior(base: str) -> dict[str, float]:
    """Accuracy per kind of the majority training answer per (template, subject shape, reference
    shape), on the held-out questions."""
    from data_pipelines import scannet

    def items(split):
        root = os.path.join(base, "data", split)
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            if not os.path.isdir(d):
                continue
            meta = json.load(open(os.path.join(d, "scene.json")))
            names = meta["label_names"]
            for qa in scannet.read_scene_qa(d):
                if qa.kind not in KINDS:
                    continue
                template = qa.question
                for role, j in zip("ab", qa.subjects):
                    template = re.sub(rf"\b{re.escape(names[j])}\b", "{" + role + "}", template)
                shapes = tuple(names[j].split()[-1] for j in qa.subjects)
                yield qa.kind, (template, shapes), qa.answer

    votes = collections.defaultdict(collections.Counter)
    for _, key, answer in items("train"):
        votes[key][answer] += 1
    right, total = collections.Counter(), collections.Counter()
    for kind, key, answer in items("eval"):
        guess = votes[key].most_common(1)[0][0] if votes[key] else "yes"
        right[kind] += guess == answer
        total[kind] += 1
    return {k: right[k] / total[k] for k in KINDS if total[k]}


def plot(bases: list[str], out: str, only: list[str] | None = None, goal: float | None = None,
         ymin: float = 0.4):
    """One panel per kind: every run under each base's `study/` (or the `only` names), solid
    generated and dotted teacher-forced accuracy, each base's text-only prior dashed, and the
    main job's goal per kind (or `goal` for every kind: the study's 0.95 at saturation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), sharey=True)
    priors = {}
    for base in bases:
        priors[base] = prior = text_prior(base)
        study = os.path.join(base, "study")
        runs = [json.load(open(os.path.join(study, f))) for f in sorted(os.listdir(study))
                if f.endswith(".json") and (only is None or f[:-5] in only)]
        for ax, kind in zip(axes, KINDS):
            for r in runs:
                steps = [c["step"] for c in r["curve"]]
                line, = ax.plot(steps, [c[f"grounded/{kind}_acc"] for c in r["curve"]], marker="o", ms=3,
                                label=f"{r['name']} (seed {r['seed']})")
                ax.plot(steps, [c.get(f"grounded_forced/{kind}_acc", float("nan")) for c in r["curve"]],
                        ls=":", color=line.get_color())
            seed = runs[0]["seed"] if runs else "?"
            ax.axhline(prior[kind], color="k", ls="--", lw=1, alpha=0.6,
                       label=f"text-only prior (seed {seed} data)")
    for ax, kind in zip(axes, KINDS):
        line = goal if goal is not None else 0.85 if kind in ("proximity", "contact") else 0.80
        ax.axhline(line, color="r", lw=0.8, label=f"goal {line:.2f}")
        ax.set_title(kind)
        ax.set_xlabel("train step")
        ax.set_ylim(ymin, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (solid: generated, dotted: teacher-forced)")
    fig.tight_layout()
    # Below the panels, so that no curve hides behind it; the saved image grows to hold it.
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=3, fontsize=8, frameon=False)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}; text-only prior " + "; ".join(
        f"{b}: {json.dumps({k: round(v, 3) for k, v in p.items()})}" for b, p in priors.items()))
    return fig


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("run", "score", "prior", "plot", "crowding", "overlap"))
    p.add_argument("--base", required=True, help="main-job workdir (data, records, tokenizer); "
                   "plot: several, comma-separated; crowding, overlap: a predictions file")
    p.add_argument("--image_size", type=int, default=112,
                   help="crowding: the image size the run's scenes were rendered at (tiny preset: 112)")
    p.add_argument("--against", default=None, help="overlap: the answers to set --base's against")
    p.add_argument("--only", default=None, help="plot: comma-separated run names (default: all)")
    p.add_argument("--name", default="run")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--out", default="docs/learning_curves.png")
    p.add_argument("--goal", type=float, default=None,
                   help="plot: one goal line for every kind (default: the main job's per-kind goals)")
    p.add_argument("--ymin", type=float, default=0.4, help="plot: the accuracy axis starts here")
    p.add_argument("--eval_base", default=None, help="score: the workdir whose eval split scores the run")
    p.add_argument("--branch", default=None, help="run: start at step STEP of run SOURCE of the same "
                   "base, SOURCE:STEP (a longer wsd run, branched before the shorter one's decay)")
    p.add_argument("--at", default=None, help="run/score: only the checkpoints of these steps, "
                   "comma-separated (default: every saved one)")
    args = p.parse_args(argv)
    if args.command in ("run", "score"):
        if args.command == "score" and not args.eval_base:
            p.error("score needs --eval_base, the workdir whose eval split scores the run")
        (run if args.command == "run" else score)(args, overrides)
    elif args.command == "crowding":
        for table, rows in crowding(args.base, args.image_size).items():
            print(table)
            for key, (acc, n) in rows.items():
                print(f"  {key:>16}  {acc:.3f}  ({n})")
    elif args.command == "overlap":
        if not args.against:
            p.error("overlap needs --against, a second answers file")
        print(f"right answers: first {args.base}, second {args.against}")
        for kind, row in overlap(args.base, args.against).items():
            n = sum(row.values())
            print(f"  {kind:>12}  {n} questions: both {row['both']}, first only {row['first_only']}, "
                  f"second only {row['second_only']}, neither {row['neither']} "
                  f"(first {(row['both'] + row['first_only']) / n:.3f}, "
                  f"second {(row['both'] + row['second_only']) / n:.3f})")
    elif args.command == "prior":
        print(json.dumps({k: round(v, 3) for k, v in text_prior(args.base).items()}))
    else:
        plot(args.base.split(","), args.out, args.only.split(",") if args.only else None, args.goal,
             args.ymin)


if __name__ == "__main__":
    main()
