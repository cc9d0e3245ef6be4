"""The vision stage: pretraining runs, exports official-layout weights the student loads, and the
shipped tiny checkpoint reloads and reproduces its recorded held-out figures."""

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import student as student_configs
from spatial_distill.train import checkpoint as ckpt_lib
from spatial_distill.train import vision
from tests.test_trainer import tiny_config

SHIPPED = Path(student_configs.TINY_VISION_CHECKPOINT)
# The same stage continued at 168 x 168 pixels (docs/learning.md, "At 168 pixels").
SHIPPED_168 = SHIPPED.with_name("vggt_tiny_synthetic_168.safetensors")


@pytest.mark.slow
def test_vision_stage_trains_exports_and_the_student_loads_it(tmp_path):
    # A decoder context shorter than the unpooled patch tokens: the stage never runs the decoder,
    # so it must not refuse (larger images than the preset's would).
    config = tiny_config(**{"vision.steps": 3, "vision.batch_size": 2, "vision.warmup_steps": 1,
                            "vision.eval_every": 0, "train.checkpoint_every": 2,
                            "model.decoder.max_position_embeddings": 8})
    path = vision.pretrain(config, str(tmp_path))
    assert path == str(tmp_path / "vision" / "vggt.safetensors")
    tensors = load_file(path)
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"aggregator", "camera_head", "object_head"}
    assert "aggregator.patch_embed.pos_embed" in tensors and "camera_head.pose_branch.fc2.weight" in tensors
    record = json.loads((tmp_path / "vision" / "vggt.json").read_text())
    assert record["steps"] == 3 and record["data"]["split"] == "train"
    assert record["sha256"] and record["held_out"]["eval/objects/centre_err_m"] > 0
    assert set(record["reference"]["metrics"]) >= {"objects/centre_err_m", "camera/translation_l1"}
    # The main job's config reads it: every exported tensor lands in the student.
    student_config = tiny_config(**{"model.vision.checkpoint": path,
                                    "model.vision.pos_embed_size": config.data.image_size})
    model = vision.student_with_vision(student_config, path, seed=5)
    exported = {**model.aggregator.export_torch("aggregator"), **model.camera_head.export_torch("camera_head"),
                **model.object_head.export_torch("object_head")}
    assert sorted(exported) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(np.asarray(exported[k], np.float32), v, err_msg=k)
    # A rerun finds the finished stage and only re-exports.
    assert vision.pretrain(config, str(tmp_path)) == path

    # A second stage continues from that export (`vision.init_checkpoint`): at learning rate 0
    # every weight it exports is the one it loaded, so all three parts were loaded, none redrawn.
    first = tmp_path / "first.safetensors"
    Path(path).rename(first)
    (tmp_path / "first.json").write_text((tmp_path / "vision" / "vggt.json").read_text())
    shutil.rmtree(tmp_path / "vision")
    again = vision.pretrain(tiny_config(**{
        "vision.steps": 2, "vision.batch_size": 2, "vision.warmup_steps": 1, "vision.eval_every": 0,
        "vision.learning_rate": 0.0, "vision.init_checkpoint": str(first),
        "model.vision.pos_embed_size": config.data.image_size}), str(tmp_path))
    continued = load_file(again)
    assert sorted(continued) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(continued[k], v, err_msg=k)
    init = json.loads((tmp_path / "vision" / "vggt.json").read_text())["init_checkpoint"]
    assert init["path"] == str(first) and init["steps"] == 3
    assert init["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()


@pytest.mark.parametrize("path", [SHIPPED, SHIPPED_168], ids=["112px", "168px"])
def test_shipped_checkpoint_reloads_and_reproduces_its_held_out_figures(path):
    record = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    config = student_configs.get_config("tiny")
    assert config.model.vision.checkpoint == str(SHIPPED)
    # Read as it was trained: its image size, its position-embedding grid (None: made for the
    # image size; the 168-px stage continued from the 112-px weights and kept their 8 x 8 grid,
    # interpolated to 12 x 12).
    config.model.vision.checkpoint = str(path)
    config.data.image_size = record["data"]["image_size"]
    config.model.vision.pos_embed_size = (record["model"]["vision"]["pos_embed_size"]
                                          or record["data"]["image_size"])
    model = vision.student_with_vision(config, str(path))
    scenes = vision.reference_scenes(config)
    assert record["reference"]["split_seed"] == 1 and record["reference"]["indices"] == list(range(len(scenes)))
    got = vision.reference_figures(model, scenes)
    for key, want in record["reference"]["metrics"].items():
        # Float32 on another CPU may round differently; the figures are means over many patches.
        assert got[key] == pytest.approx(want, rel=1e-3, abs=1e-5), key
    # It learned to see objects: objectness far above the ~70% background rate, class far above
    # the ~41% prior, and view 0's objects placed to well under the ~0.5 m of the constant-depth
    # baseline (benchmarks/study_vision_stage.py).
    metrics = record["reference"]["metrics"]
    assert metrics["objects/objectness_acc"] > 0.95 and metrics["objects/class_acc"] > 0.75
    assert metrics["objects/centre_err_view0_m"] < 0.2
    jax.clear_caches()


def test_stage_config_ignores_the_decoders_pooling(tmp_path):
    # A half-trained vision stage stays resumable when the preset's pooling or slot thresholds
    # change: the stage never pools.
    before = vision.stage_config(tiny_config(**{"model.vision_pool": "objects8"}), str(tmp_path))
    after = vision.stage_config(tiny_config(**{"model.vision_pool": "slots12",
                                               "model.slots.radius": 0.5}), str(tmp_path))
    assert before.model.vision_pool == after.model.vision_pool == "patch"
    scaled = vision.stage_config(tiny_config(**{"train.vision_lr_scale": 0.1}), str(tmp_path))
    assert scaled.train.vision_lr_scale == 1.0 and scaled.train.learning_rate == scaled.vision.learning_rate
    ckpt_lib.check_same_model(ckpt_lib.config_dict(before), after, "here")
    with pytest.raises(ckpt_lib.CheckpointError, match="model.vision.embed_dim"):
        ckpt_lib.check_same_model(ckpt_lib.config_dict(before), vision.stage_config(
            tiny_config(**{"model.vision.embed_dim": 48}), str(tmp_path)), "here")
