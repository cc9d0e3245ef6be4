"""The dump stage: run a teacher over every sample once and write teacher records (DESIGN.md §3).

For each split, samples are cut into `config.teacher.num_shards` contiguous shards. A shard is
written to a temporary file and renamed when complete, so after an interruption (even `kill -9`)
a rerun skips the finished shards and redoes only the others: every sample ends up in exactly
one record. With several processes (`jax.distributed`), process p writes the shards i with
i % process_count == p, so the shard set is complete and disjoint; process 0 writes the final
`teacher_meta.json` once every process is done. `teacher_meta.json` pins what produced the records (teacher, tokenizer hash, K,
temperature, frame size); a rerun with a different setting stops with the field and both values
instead of mixing records.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from data_pipelines import scannet
from data_pipelines import teacher_records as tr
from spatial_distill import prepare
from spatial_distill.teacher.base import Teacher, topk_at_temperature
from spatial_distill.teacher.oracle import OracleTeacher
from spatial_distill.tokenizer import Tokenizer, TokenizerError, load_tokenizer

SPLITS = ("train", "eval")
PROMPT_TEMPLATE = "<s>{question}"  # BOS, then the question's tokens; the answer follows directly
# Fields of teacher_meta.json that must agree between a dump and a rerun over the same directory.
IDENTITY_FIELDS = ("teacher_id", "teacher_revision", "tokenizer_hash", "vocab_size", "k",
                   "temperature", "image_size", "num_views", "prompt_template")


# Longest prompt or answer a `teacher_meta.json` may declare: beyond any context we train with,
# so a larger value is a corrupt file, not a batch shape to allocate.
MAX_RECORD_TOKENS = 1 << 16
# The `config.input` lengths an unset value of which `with_record_lengths` reads from the records.
LENGTH_FIELDS = ("max_prompt_len", "max_answer_len")


def records_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.teacher.records_dir or os.path.join(workdir, "records")


def with_record_lengths(config: ml_collections.ConfigDict, meta: tr.TeacherMeta,
                        where: str) -> ml_collections.ConfigDict:
    """`config` with `input.max_prompt_len` / `input.max_answer_len` left None set to the longest
    prompt / answer the records hold (`teacher_meta.json`, over the train and eval splits): the
    padded batch then holds nothing but the data needs. A set value below it is refused here,
    before anything is built. `where`: the records directory (named in errors)."""
    resolved = config.copy_and_resolve_references()
    for field in LENGTH_FIELDS:
        found = [meta.splits[s].get(field) for s in SPLITS if s in meta.splits]
        if None in found or not found:
            if resolved.input[field] is None:
                raise ValueError(
                    f"{os.path.join(where, tr.META_FILE)} does not record '{field}' (dumped by an "
                    f"older version): rerun the dump stage (it keeps the finished shards and rescans "
                    f"them) or set config.input.{field}")
            continue
        # Untrusted like the records: a length sizes every padded batch, so it must be one (the
        # decoder's context is checked where a decoder runs: StudentConfig.check_lengths).
        counts = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in found)
        longest = max(found) if counts else None
        if not counts or not 0 < longest <= MAX_RECORD_TOKENS:
            raise ValueError(f"{os.path.join(where, tr.META_FILE)}: '{field}' = {found} (per split) is "
                             f"not a token count in 1..{MAX_RECORD_TOKENS}; re-dump the records")
        if resolved.input[field] is None:
            resolved.input[field] = longest
        elif resolved.input[field] < longest:
            raise ValueError(f"config.input.{field} = {resolved.input[field]} but the records in {where} "
                             f"hold {longest} tokens ('{field}' in {tr.META_FILE}); raise it or leave it "
                             "None to use the records' longest")
    return resolved


def prompt_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.encode(question, add_bos=True)


TEACHER_KINDS = ("oracle", "llava3d", "hf")


def check_teacher_config(config: ml_collections.ConfigDict) -> None:
    kind = config.teacher.kind
    if kind not in TEACHER_KINDS:
        raise ValueError(f"config.teacher.kind = {kind!r}: choose one of {TEACHER_KINDS}")
    if kind != "oracle" and not config.teacher.path:
        raise ValueError(f"config.teacher.kind={kind!r} needs config.teacher.path: a local "
                         "checkpoint directory (config.json + weights)")


def make_teacher(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Teacher:
    check_teacher_config(config)
    kind = config.teacher.kind
    if kind == "oracle":
        # Real scenes' questions come from their 3D boxes; synthetic ones from exact solids.
        boxes = config.data.source in ("scannet", "front3d")
        return OracleTeacher(tokenizer, floor=config.teacher.oracle_floor,
                             ceiling=config.teacher.oracle_ceiling, geometry="boxes" if boxes else "solids")
    if kind == "llava3d":
        from spatial_distill.teacher import llava3d_teacher

        return llava3d_teacher.load(config, tokenizer)
    if kind == "hf":
        from spatial_distill.teacher import hf_teacher

        return hf_teacher.load(config, tokenizer)
    raise ValueError(f"config.teacher.kind = {kind!r}: choose one of {TEACHER_KINDS}")


def check_teacher_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                            tokenizer: Tokenizer) -> int:
    """Before any dump: the tokenizer in the teacher's checkpoint must split text into the same
    ids as the student's, checked on the dataset's questions and answers plus the teacher's
    template. Returns the number of texts compared (0: the checkpoint has no tokenizer files)."""
    path = config.teacher.path
    try:
        teacher_tok = load_tokenizer(path)
    except TokenizerError:
        return 0
    from spatial_distill.teacher import llava3d_inputs
    from spatial_distill.teacher.llava3d_teacher import check_same_tokenizer

    corpus = [llava3d_inputs.prompt("Is the red box near the blue ball?", "Yes."),
              llava3d_inputs.SYSTEM, " ASSISTANT:"]
    for split in SPLITS:
        for d in prepare.scene_dirs(config, workdir, split)[:200]:
            corpus += [t for qa in scannet.read_scene_qa(d) for t in (qa.question, qa.answer)]
    return check_same_tokenizer(teacher_tok, tokenizer, corpus)


def teacher_record(sample, teacher: Teacher, tokenizer: Tokenizer, meta: tr.TeacherMeta,
                   max_answer_len: int | None) -> tr.TeacherRecord:
    """Greedy answers, then the teacher-forced pass reduced to top-K at the dump temperature.
    `max_answer_len` (None: the teacher's own budget only) refuses longer answers."""
    prompts = [prompt_ids(tokenizer, qa.question) for qa in sample.qa]
    answers = teacher.answer(sample, prompts)
    for qa, ans in zip(sample.qa, answers):
        if max_answer_len is not None and len(ans) > max_answer_len:
            raise ValueError(f"sample {sample.sample_id!r}: the teacher's answer to {qa.question!r} has "
                             f"{len(ans)} tokens, more than config.input.max_answer_len = "
                             f"{max_answer_len}; raise the limit")
    logits = teacher.score(sample, prompts, answers)
    out = []
    for qa, prompt, ans, lg in zip(sample.qa, prompts, answers, logits):
        if lg.shape != (len(ans), meta.vocab_size):
            raise ValueError(f"teacher {meta.teacher_id} returned logits {lg.shape} for an answer of "
                             f"{len(ans)} tokens; expected ({len(ans)}, {meta.vocab_size})")
        ids, lp, lse = topk_at_temperature(lg, meta.k, meta.temperature)
        out.append(tr.TeacherAnswer.build(meta, prompt_ids=prompt, answer_ids=ans, topk_ids=ids,
                                          topk_logprobs=lp, logsumexp=lse, kind=qa.kind,
                                          gt_answer=qa.answer))
    return tr.TeacherRecord(sample, tuple(out))


def _check_same_dump(out_dir: str, meta: tr.TeacherMeta) -> None:
    if not os.path.exists(os.path.join(out_dir, tr.META_FILE)):
        return
    old = tr.read_meta(out_dir)
    for field in IDENTITY_FIELDS:
        a, b = getattr(old, field), getattr(meta, field)
        if a != b:
            raise ValueError(
                f"{out_dir} holds teacher records with {field} = {a!r} but this run has {field} = "
                f"{b!r}; use another config.teacher.records_dir (nothing was changed)")


def dump(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the train and eval records; returns the records directory. Resumable."""
    out_dir = records_dir(config, workdir)
    os.makedirs(out_dir, exist_ok=True)
    check_teacher_config(config)
    tokenizer = prepare.tokenizer(config, workdir)
    checked = 0 if config.teacher.kind == "oracle" else check_teacher_tokenizer(config, workdir, tokenizer)
    teacher = make_teacher(config, tokenizer)
    n_shards = config.teacher.num_shards
    size = config.data.image_size
    process, processes = jax.process_index(), jax.process_count()
    if n_shards % processes:
        raise ValueError(f"config.teacher.num_shards = {n_shards} is not a multiple of the "
                         f"{processes} processes; every process must write the same number of shards")
    calibration = dict(teacher.calibration())
    if checked:
        calibration["tokenizer_check"] = f"teacher and student ids equal on {checked} texts"
    meta = tr.TeacherMeta(
        teacher_id=teacher.teacher_id, teacher_revision=teacher.revision,
        vocab_size=tokenizer.vocab_size, k=config.teacher.k, temperature=config.teacher.temperature,
        image_size=(size, size), num_views=config.data.num_views, tokenizer_hash=tokenizer.sha256,
        prompt_template=PROMPT_TEMPLATE, calibration=calibration,
        splits={s: {"num_shards": n_shards} for s in SPLITS})
    _check_same_dump(out_dir, meta)
    if process == 0:
        meta = tr.write_meta(out_dir, meta)  # pins the identity before any shard is written

    for split in SPLITS:
        dirs = prepare.scene_dirs(config, workdir, split)
        if len(dirs) < n_shards:
            raise ValueError(f"split {split!r} has {len(dirs)} scenes, fewer than "
                             f"config.teacher.num_shards = {n_shards}")
        ranges = tr.shard_assignment(len(dirs), n_shards)
        mine = [i for i in range(n_shards) if i % processes == process]
        done = {int(p.name.split("-")[2]) for p in tr.finished_shards(out_dir, split, n_shards)}
        with tqdm(total=sum(len(ranges[i]) for i in mine),
                  initial=sum(len(ranges[i]) for i in mine if i in done),
                  desc=f"teacher dump ({split})", unit="sample", disable=process != 0) as bar:
            for index in mine:
                indices = ranges[index]
                if index in done:
                    continue
                # An interrupted earlier attempt at this shard left only a temp file: drop it.
                for stale in Path(out_dir).glob(f".{tr.shard_name(split, index, n_shards)}.tmp-*"):
                    stale.unlink()

                def records(indices=indices):
                    for i in indices:
                        sample = scannet.read_scene(dirs[i], num_views=config.data.num_views)
                        yield teacher_record(sample, teacher, tokenizer, meta, config.input.max_answer_len)
                        bar.update(1)

                tr.write_shard(out_dir, split, index, n_shards, records(), meta)
    if processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("teacher dump: every shard written")
    if process == 0:
        tr.write_meta(out_dir, meta)
    if processes > 1:
        multihost_utils.sync_global_devices("teacher dump: meta written")
    meta = tr.read_meta(out_dir)
    counts = {s: {k: v for k, v in meta.splits[s].items() if k != "shard_records"} for s in SPLITS}
    print(f"  records in {out_dir}: " + "; ".join(
        f"{s} {c['num_records']} samples, {c['num_questions']} questions" for s, c in counts.items()))
    return out_dir


def answer_token_stats(out_dir: str, split: str = "train") -> dict:
    """Mean teacher top-K mass and top-1 probability over a split's answer tokens (diagnostics)."""
    meta = tr.read_meta(out_dir)
    mass, top1 = [], []
    for path in tr.finished_shards(out_dir, split, meta.splits[split]["num_shards"]):
        for rec in tr.read_shard(path, meta):
            for a in rec.answers:
                p = np.exp(a.topk_logprobs.astype(np.float64))
                mass.extend(p.sum(-1))
                top1.extend(p[:, 0])
    return {"topk_mass": float(np.mean(mass)), "top1_prob": float(np.mean(top1)),
            "answer_tokens": len(mass)}
