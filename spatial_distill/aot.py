"""Ahead-of-time compilation of the real train step for a TPU slice, on any host (`config.mode=aot`).

    python run.py --config=configs/student.py:paper --workdir=W --config.mode=aot \
        --config.aot.topology=v5e:4x4 [--config.mesh.shape=1,-1,1]

With libtpu installed (the `[tpu]` extra; no TPU needed), `jax.experimental.topologies` describes
the slice and XLA:TPU compiles for it here. What compiles is what the train stage runs: the same
`trainer.programs` (model, optimizer, shardings, jitted step) on a mesh of the slice's devices,
at the input pipeline's static shapes (`config.data`, `config.input`, `config.teacher.k`; only
`W/records/teacher_meta.json`, when there is one, for the prompt and answer lengths `config.input`
leaves unset). Pallas kernels lower through Mosaic, as on the slice.

`W/aot/report.json` (and a printed summary) holds, per device: argument, output, temporary,
aliased and code bytes, their total against the chip's HBM and `fits` (XLA:TPU compiled the step,
which it refuses beyond the HBM it can allocate, and the total is within the chip's HBM); compiled FLOPs and bytes against
the analytic count (`trainer.step_flops`); every collective op with its count and result bytes;
the Pallas kernels that lowered through Mosaic (`mosaic_kernels`, so a kernel that fell back to
XLA shows); a roofline step time (compute, HBM and ICI terms, datasheet figures in `CHIPS`); and, with
`config.aot.search_batch`, the largest global batch whose step compiles within HBM (doubling,
then bisection in steps of the data x fsdp x accumulation ways).

XLA's cost analysis counts the body of a loop once: with `scan_layers` the decoder's layers (and
any `fori_loop`) are counted once, so compiled FLOPs read low by about that factor; the roofline
uses the analytic FLOPs and says which bytes it used.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
import types
import zlib

import ml_collections

from configs import common
from data_pipelines import teacher_records as tr
from spatial_distill import sharding
from spatial_distill import tokenizer as tokenizer_lib
from spatial_distill.teacher import dump
from spatial_distill.train import trainer, vision_cache

log = logging.getLogger(__name__)
SUBDIR = "aot"
REPORT = "report.json"


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip datasheet figures (Google Cloud TPU system architecture pages)."""

    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, all links
    peak_flops: float  # dense bf16 FLOP/s


GiB = 2**30
CHIPS = {  # device_kind -> figures; a topology name's prefix (v5e:...) maps here via ALIASES
    "TPU v5 lite": Chip(16 * GiB, 819e9, 1600e9 / 8, 197e12),
    "TPU v5": Chip(95 * GiB, 2765e9, 4800e9 / 8, 459e12),
    "TPU v6 lite": Chip(32 * GiB, 1640e9, 3584e9 / 8, 918e12),
    "TPU v4": Chip(32 * GiB, 1228e9, 2400e9 / 8, 275e12),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


class AOTError(ValueError):
    """The AOT target cannot be set up (libtpu, topology, mesh); the message names the fix."""


def topology_devices(name: str) -> list:
    """The devices of TPU topology `name` (e.g. `v5e:2x2`), described by libtpu on this host."""
    try:
        import libtpu  # noqa: F401 - only its presence matters
        from jax.experimental import topologies
    except ImportError:
        raise AOTError("config.mode=aot compiles for TPU and needs libtpu: pip install -e '.[tpu]' "
                       "(no TPU is needed)") from None
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's errors are long; the first line says why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "lockfile" in first:  # one process at a time may hold libtpu, even without a TPU
            raise AOTError(f"libtpu is held by another process on this host ({first}); wait for it to "
                           "finish (another aot run, a test) and rerun") from None
        raise AOTError(f"config.aot.topology = {name!r}: libtpu cannot describe it ({first}); use "
                       "<chip>:<shape> such as v5e:2x2, v5e:2x4, v5e:4x4, v5p:2x2x1, v6e:2x2") from None


def chip(device) -> Chip:
    if device.device_kind not in CHIPS:
        raise AOTError(f"no datasheet figures for device kind {device.device_kind!r}; known: "
                       f"{sorted(CHIPS)} (spatial_distill/aot.py CHIPS)")
    return CHIPS[device.device_kind]


class ShapeOnlyTokenizer:
    """Stands in for the decoder's tokenizer when none is on disk: each word encodes to one
    stable id below the vocabulary. Word ids are constants of the step; they change no shape, so
    no memory or FLOPs (the report records that a stand-in was used)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        return [zlib.crc32(text.strip().encode()) % self.vocab_size]


def _tokenizer(config, workdir):
    try:
        return trainer.load_tokenizer(config, workdir), "loaded"
    except tokenizer_lib.TokenizerError:
        return ShapeOnlyTokenizer(config.model.decoder.vocab_size), "shape-only stand-in"


def _with_lengths(config, workdir):
    """`config` with the prompt and answer lengths the train stage would pad to: the records'
    longest where `config.input` leaves them unset (`dump.with_record_lengths`)."""
    records = dump.records_dir(config, workdir)
    if os.path.exists(os.path.join(records, tr.META_FILE)):
        return dump.with_record_lengths(config, tr.read_meta(records), records)
    for field in dump.LENGTH_FIELDS:
        if config.input[field] is None:
            raise AOTError(f"config.input.{field} is unset and {records} holds no teacher records to "
                           "read it from: set config.input.max_prompt_len and max_answer_len to the "
                           "lengths training will pad to")
    return config


def with_batch(config: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    c.unlock()
    c.train.batch_size = int(batch)
    c.lock()
    return c


def build(config, devices, tokenizer):
    """(`trainer.Programs`, mesh) for `config` on `devices`, checked against their count."""
    common.validate(config, num_devices=len(devices))
    trainer.check_accumulation(config, len(devices))
    mesh = sharding.make_mesh(config.mesh.shape, devices)
    meta = types.SimpleNamespace(num_views=config.data.num_views, k=config.teacher.k,
                                 image_size=(config.data.image_size, config.data.image_size))
    prog = trainer.programs(config, mesh, sharding.DEFAULT_RULES, meta, tokenizer,
                            cache_vision=vision_cache.caches_vision(config))
    return prog, mesh


def compile_train_step(prog, mesh):
    with sharding.axis_rules(mesh, sharding.DEFAULT_RULES):
        return prog.train_fn.lower(prog.abstract_state, prog.train_spec).compile()


def compile_step(config, devices, tokenizer):
    """(compiled train step, `trainer.Programs`, mesh) for `config` on `devices`."""
    prog, mesh = build(config, devices, tokenizer)
    return compile_train_step(prog, mesh), prog, mesh


def memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program; `total` = arguments + outputs - aliased + temps."""
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "code_bytes": int(m.generated_code_size_in_bytes)}
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                          + out["temp_bytes"] + out["code_bytes"])
    return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes per collective op in optimized HLO text (async pairs counted once,
    at their `-start`; an op in a loop body once, like XLA's cost analysis)."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None:
            continue
        shapes = _SHAPE.findall(m.group(1))
        sizes = [_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in shapes]
        # A combined all-reduce returns a tuple of results; other async starts return (operand,
        # result, ...), of which the result is the largest.
        nbytes = max(sizes, default=0) if m.group(3) and m.group(2) != "all-reduce" else sum(sizes)
        entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return out


_MOSAIC = re.compile(r"^\s*(?:ROOT\s+)?%([\w-]+?)(?:\.\d+)?\s*=.*custom_call_target=\"tpu_custom_call\"")


def mosaic_kernels(hlo_text: str) -> dict[str, int]:
    """Pallas/Mosaic kernels in optimized HLO text: kernel name -> number of call sites."""
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _MOSAIC.match(line)
        if m is not None:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return dict(sorted(out.items()))


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return {"flops": float(cost.get("flops", math.nan)),
            "bytes_accessed": float(cost.get("bytes accessed", math.nan))}


def out_of_memory(err: BaseException) -> str | None:
    """XLA:TPU's compile-time out-of-HBM error as one line (None for any other error)."""
    text = str(err).strip()
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
        return None
    return text.splitlines()[0][:300]


def _fits(config, devices, tokenizer, batch: int, hbm: int) -> tuple[bool, dict | None, str]:
    """Whether the step at global `batch` compiles and fits; its memory; why not."""
    try:
        compiled, _, _ = compile_step(with_batch(config, batch), devices, tokenizer)
    except Exception as e:  # noqa: BLE001 - XLA:TPU reports running out of HBM at compile time
        why = out_of_memory(e)
        if why is None:
            raise
        return False, None, why
    mem = memory(compiled)
    return mem["total_bytes"] <= hbm, mem, ""


def search_batch(config, devices, tokenizer, hbm: int, *, limit: int, known: dict | None = None) -> dict:
    """The largest global batch (a multiple of data x fsdp x accumulation ways) whose step fits.
    `known`: {batch: (fits, total_bytes or None)} already compiled (not compiled again)."""
    data, fsdp, _ = sharding.mesh_shape(config.mesh.shape, len(devices))
    unit = data * fsdp * int(config.train.accum_steps)
    tried: dict[int, dict] = {}

    def fits(b):
        if known and b in known:
            ok, total = known[b]
            tried[b] = {"fits": ok, "total_bytes": total}
            return ok
        ok, mem, why = _fits(config, devices, tokenizer, b, hbm)
        tried[b] = {"fits": ok, "total_bytes": None if mem is None else mem["total_bytes"],
                    **({"error": why} if why else {})}
        log.info("aot batch %d: fits=%s %s", b, ok, why)
        return ok

    if limit < unit:
        raise AOTError(f"config.aot.max_batch = {limit}: below one batch unit ({unit} = data x fsdp x "
                       "accumulation ways)")
    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    b = max(unit, min(config.train.batch_size, limit) // unit * unit)
    while b <= limit:
        if fits(b):
            lo, b = b, 2 * b
        else:
            hi = b
            break
    if lo == 0:  # even the configured batch failed: halve towards one unit
        b = hi // 2 // unit * unit
        while b >= unit and not fits(b):
            hi, b = b, b // 2 // unit * unit
        lo = b if b >= unit else 0
    if hi is not None:
        while hi - lo > unit:
            mid = (lo + hi) // 2 // unit * unit
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"largest_global_batch": lo, "unit": unit, "limit": limit,
            "reached_limit": hi is None, "tried": {str(k): v for k, v in sorted(tried.items())}}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Compiles the train step for `config.aot.topology`, writes `W/aot/report.json`, prints a
    summary and returns the report."""
    devices = topology_devices(config.aot.topology)
    spec = chip(devices[0])
    config = _with_lengths(config, workdir)
    tokenizer, tokenizer_source = _tokenizer(config, workdir)
    prog, mesh = build(config, devices, tokenizer)
    t0 = time.perf_counter()
    try:
        compiled, error = compile_train_step(prog, mesh), None
    except Exception as e:  # noqa: BLE001 - only running out of HBM is a result, the rest raises
        compiled, error = None, out_of_memory(e)
        if error is None:
            raise
    compile_s = time.perf_counter() - t0
    n = len(devices)
    analytic = trainer.step_flops(config, prog, config.data.num_views)
    if compiled is None:
        mem = {"compile_error": error}
        cost = {"flops": math.nan, "bytes_accessed": math.nan}
        hlo = ""
    else:
        mem, cost, hlo = memory(compiled), _cost(compiled), compiled.as_text()
    comms = collectives(hlo)
    comm_bytes = sum(c["bytes"] for c in comms.values())
    terms = {"compute_s": analytic["total"] / (n * spec.peak_flops),
             "hbm_s": cost["bytes_accessed"] / spec.hbm_bandwidth,
             "collective_s": comm_bytes / spec.ici_bandwidth}
    bound = max(terms, key=terms.get)
    step_s = terms[bound]
    report = {
        "topology": config.aot.topology, "device_kind": devices[0].device_kind, "num_devices": n,
        "mesh": dict(mesh.shape), "global_batch": int(config.train.batch_size),
        "accum_steps": int(config.train.accum_steps), "attention": config.model.attention,
        "remat": {"decoder": config.model.decoder.remat_policy, "vision": bool(config.model.vision.remat)},
        "vision_cached": prog.vision_fn is not None, "tokenizer": tokenizer_source,
        "parameters": {k: int(v) for k, v in prog.breakdown.items()},
        "compile_s": round(compile_s, 2),
        "memory_per_device": mem, "hbm_bytes": spec.hbm_bytes,
        "fits": compiled is not None and mem["total_bytes"] <= spec.hbm_bytes,
        "flops": {"analytic_total": analytic["total"], "analytic_per_device": analytic["total"] / n,
                  "compiled_per_device": cost["flops"],
                  "compiled_over_analytic": cost["flops"] / (analytic["total"] / n),
                  "note": "XLA counts a loop body once (scanned layers, fori_loops)",
                  **({"vision_cached": "the frozen vision side runs once per sample, outside the step"}
                     if prog.vision_fn is not None else {})},
        "bytes_accessed_per_device": cost["bytes_accessed"],
        "collectives": comms,
        "mosaic_kernels": mosaic_kernels(hlo),
        "roofline": {**terms, "step_time_s": step_s, "bound": bound,
                     "mfu_at_roofline": terms["compute_s"] / step_s if step_s > 0 else math.nan,
                     "chip": dataclasses.asdict(spec),
                     "note": "max of the three terms (perfect overlap); hbm_s from XLA's bytes "
                             "accessed, collective_s from result bytes over the chip's ICI bandwidth "
                             "(both count a loop body once, so they read low with scanned layers)"},
    }
    if config.aot.search_batch:
        report["batch_search"] = search_batch(
            config, devices, tokenizer, spec.hbm_bytes, limit=int(config.aot.max_batch),
            known={int(config.train.batch_size): (report["fits"], mem.get("total_bytes"))})
    out = os.path.join(workdir, SUBDIR)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, REPORT)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    # Flushed now: libtpu's exit handlers can end the process before Python flushes stdout.
    print(summary(report), flush=True)
    print(f"  report in {path}", flush=True)
    return report


def summary(r: dict) -> str:
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    m, f, rl = r["memory_per_device"], r["flops"], r["roofline"]
    lines = [
        f"  {r['topology']} ({r['num_devices']} x {r['device_kind']}), mesh {r['mesh']}, global batch "
        f"{r['global_batch']}, attention {r['attention']}, remat {r['remat']}",
        f"  per device: arguments {g(m['argument_bytes'])}, outputs {g(m['output_bytes'])}, aliased "
        f"{g(m['alias_bytes'])}, temporaries {g(m['temp_bytes'])} -> {g(m['total_bytes'])} of "
        f"{g(r['hbm_bytes'])} HBM: fits={r['fits']}" if "compile_error" not in m else
        f"  per device: does not fit ({m['compile_error']})",
        f"  FLOPs per device: analytic {f['analytic_per_device']:.3g}, compiled {f['compiled_per_device']:.3g} "
        f"({f['compiled_over_analytic']:.2f}x; {f['note']})",
        "  Mosaic kernels: " + (", ".join(f"{k} x{v}" for k, v in r["mosaic_kernels"].items()) or "none"),
        "  collectives: " + (", ".join(f"{k} x{v['count']} ({g(v['bytes'])})" for k, v in
                                       sorted(r["collectives"].items())) or "none"),
        f"  roofline step {rl['step_time_s'] * 1e3:.1f} ms ({rl['bound']}-bound: compute "
        f"{rl['compute_s'] * 1e3:.1f} ms, HBM {rl['hbm_s'] * 1e3:.1f} ms, collectives "
        f"{rl['collective_s'] * 1e3:.1f} ms), MFU at roofline {rl['mfu_at_roofline']:.0%}",
    ]
    if "batch_search" in r:
        s = r["batch_search"]
        lines.append(f"  largest global batch that fits: {s['largest_global_batch']} (steps of {s['unit']}"
                     + (f"; reached the search limit {s['limit']})" if s["reached_limit"] else ")"))
    return "\n".join(lines)
