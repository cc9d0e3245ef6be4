"""AOT compilation for a TPU slice (`spatial_distill/aot.py`): HLO parsing and the batch search
on hand-built inputs; the named errors; and, with libtpu installed (the `[tpu]` extra, as CI
has it), the tiny preset's real train step compiled for v5e:2x2 with our Pallas kernel."""

import json
import os
import sys

import jax
import pytest

from configs import student as student_config
from spatial_distill import aot

HLO = """
  %all-reduce.87 = (f32[1,352,128]{2,1,0:T(8,128)S(1)}, bf16[4,32]{1,0}) all-reduce(%a, %b), channel_id=1
  %all-gather-start.2 = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%c), dimensions={0}
  %all-gather-done.2 = bf16[32,128]{1,0} all-gather-done(%all-gather-start.2)
  %reduce-scatter.1 = f32[16]{0} reduce-scatter(%d), dimensions={0}
  %all-reduce-start.4 = f32[10]{0} all-reduce-start(%e), to_apply=%add
  %fusion.3 = f32[10]{0} fusion(%all-reduce.87), kind=kLoop
  %flash_attention_fwd.39 = (f32[2,4,72,32]{3,2,1,0}, f32[2,4,72,1]{3,2,1,0}) custom-call(%q), custom_call_target="tpu_custom_call"
  %flash_attention_dq.2 = f32[2,4,72,32]{3,2,1,0} custom-call(%q), custom_call_target="tpu_custom_call"
  ROOT %flash_attention_fwd.40 = (f32[2,4,72,32]{3,2,1,0}) custom-call(%q), custom_call_target="tpu_custom_call"
  %cudnn = f32[2]{0} custom-call(%q), custom_call_target="__cudnn$fmha"
"""


def test_collectives_are_counted_with_their_result_bytes():
    assert aot.collectives(HLO) == {
        "all-reduce": {"count": 2, "bytes": 352 * 128 * 4 + 4 * 32 * 2 + 10 * 4},
        "all-gather": {"count": 1, "bytes": 32 * 128 * 2},  # the start's result, not its operand
        "reduce-scatter": {"count": 1, "bytes": 16 * 4}}


def test_mosaic_kernels_are_named_per_call_site():
    assert aot.mosaic_kernels(HLO) == {"flash_attention_dq": 1, "flash_attention_fwd": 2}


@pytest.mark.parametrize("start,threshold,limit,want,reached", [
    (64, 200, 4096, 200, False),   # doubles 64 -> 128 -> 256 (fails), bisects to 200
    (64, 40, 4096, 40, False),     # the configured batch fails: halves, then bisects upward
    (64, 4, 4096, 0, False),       # not even one unit of 8 fits
    (64, 10**6, 512, 512, True),   # everything fits up to the limit
])
def test_batch_search_finds_the_largest_multiple_of_the_unit(monkeypatch, start, threshold, limit, want, reached):
    config = student_config.get_config("tiny")
    config.unlock()
    config.mesh.shape = (-1, 1, 1)
    config.train.batch_size = start
    tried = []

    def fake_fits(cfg, devices, tokenizer, batch, hbm):
        tried.append(batch)
        return batch <= threshold, {"total_bytes": batch}, ""

    monkeypatch.setattr(aot, "_fits", fake_fits)
    out = aot.search_batch(config, list(range(8)), None, hbm=0, limit=limit)
    assert (out["largest_global_batch"], out["unit"], out["reached_limit"]) == (want, 8, reached)
    assert all(b % 8 == 0 for b in tried) and len(tried) == len(set(tried)) <= 12


def test_bad_inputs_are_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if the [tpu] extra were not installed
    with pytest.raises(aot.AOTError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
        aot.topology_devices("v5e:2x2")
    monkeypatch.undo()
    config = student_config.get_config("tiny")
    config.unlock()
    config.mode = "aot"
    config.mesh.shape = (3, 1, 1)
    with pytest.raises(ValueError, match=r"config.mesh.shape = \(3, 1, 1\): .*does not divide the 4"):
        aot.compile_step(config, jax.devices() * 4, aot.ShapeOnlyTokenizer(384))
    config.mesh.shape = (-1, 1, 1)
    with pytest.raises(aot.AOTError, match="max_batch = 4: below one batch unit"):
        aot.search_batch(config, list(range(8)), None, hbm=0, limit=4)
    # The tiny preset pads to the records' longest prompt: without records AOT needs it set.
    with pytest.raises(aot.AOTError, match=r"config.input.max_prompt_len is unset and .*records holds "
                                           r"no teacher records"):
        aot._with_lengths(config, str(tmp_path))
    config.input.max_prompt_len, config.input.max_answer_len = 13, 5
    assert aot._with_lengths(config, str(tmp_path)) is config


def test_shape_only_tokenizer_gives_stable_in_vocabulary_ids():
    tok = aot.ShapeOnlyTokenizer(384)
    assert tok.encode(" red") == tok.encode("red") and 0 <= tok.encode("red")[0] < 384
    assert tok.encode("red") != tok.encode("blue")


def test_unknown_topology_is_named():
    pytest.importorskip("libtpu")
    with pytest.raises(aot.AOTError, match=r"config.aot.topology = 'v5e:3x7'.*such as v5e:2x2"):
        aot.topology_devices("v5e:3x7")


@pytest.mark.slow
def test_tiny_train_step_compiles_for_v5e_with_our_kernel(tmp_path):
    """The real train step of `tiny` (vision side in the step, not cached) on a v5e:2x2 mesh with
    model.attention=pallas: it fits, our kernel's forward and backward lowered through Mosaic
    (none fell back to XLA), and the report holds every figure."""
    pytest.importorskip("libtpu")
    config = student_config.get_config("tiny")
    config.unlock()
    config.mode = "aot"
    config.model.attention = "pallas"
    config.train.cache_vision = False
    config.aot.topology = "v5e:2x2"
    # No records in tmp_path to read the padded lengths from: the ones the main job trains with.
    config.input.max_prompt_len, config.input.max_answer_len = 13, 5
    report = aot.run(config, str(tmp_path))
    on_disk = json.load(open(os.path.join(tmp_path, "aot", "report.json")))
    assert on_disk["fits"] is True and report["fits"] is True
    assert on_disk["num_devices"] == 4 and on_disk["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert set(on_disk["mosaic_kernels"]) == {"flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"}
    mem = on_disk["memory_per_device"]
    assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                  + mem["temp_bytes"] + mem["code_bytes"]) > 0
    assert on_disk["hbm_bytes"] == 16 * 2**30
    # Data parallel: the gradients are all-reduced; XLA counts scanned bodies once (ratio < 1).
    assert on_disk["collectives"]["all-reduce"]["count"] >= 1
    assert 0.05 < on_disk["flops"]["compiled_over_analytic"] < 1.5
    assert on_disk["roofline"]["step_time_s"] > 0 and on_disk["tokenizer"] == "shape-only stand-in"
