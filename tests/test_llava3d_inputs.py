"""LLaVA-3D's preprocessing and prompt against the official code's fixtures and the spec."""

import os

import numpy as np
import pytest
from PIL import Image

from spatial_distill.teacher import llava3d_inputs as inputs

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "llava3d")


@pytest.fixture(scope="module")
def raw():
    return np.load(os.path.join(FIXTURES, "tiny", "inputs.npz"))


def test_scene_preprocessing_reproduces_the_official_tensors(raw):
    s = inputs.scene(list(raw["raw_rgb"]), list(raw["raw_depth_mm"]), raw["raw_depth_intrinsic"],
                     raw["raw_poses_cam2world"], raw["axis_align_matrix"], size=84,
                     depth_scale=float(raw["depth_scale"]))
    np.testing.assert_array_equal(s["images"], raw["pixel_values_3d"][0])
    np.testing.assert_array_equal(s["depths"], raw["depths"][0])  # the 0 mm block stays 0 m
    np.testing.assert_array_equal(s["intrinsics"], raw["intrinsics"][0])
    np.testing.assert_allclose(s["poses"], raw["poses"][0], atol=3e-7, rtol=0)
    assert (s["depths"] == 0).any()


def test_2d_square_and_pad(raw):
    np.testing.assert_array_equal(inputs.image_2d(raw["raw_image_2d"], "square", 84), raw["pixel_values_2d"][0])
    np.testing.assert_array_equal(inputs.image_2d(raw["raw_image_2d"], "pad", 84), raw["pixel_values_2d_pad"][0])
    with pytest.raises(ValueError, match="image_aspect_ratio='anyres'"):
        inputs.image_2d(raw["raw_image_2d"], "anyres", 84)


def test_full_size_depth_and_intrinsics():
    g = np.load(os.path.join(FIXTURES, "units", "geometry_336.npz"))
    depth, resized = inputs.depth_map(g["raw_depth_mm_view0"], 336)
    assert resized == (448, 336)
    np.testing.assert_array_equal(depth, g["depths_view0"])
    K = inputs.intrinsic_matrix(g["raw_depth_intrinsic"], (640, 480), resized)
    np.testing.assert_array_equal(K, g["intrinsics"][0, 0])
    np.testing.assert_allclose(K[[0, 1, 0, 1], [0, 1, 2, 2]], [404.32, 404.32, 167.23, 166.95], atol=5e-3)


@pytest.mark.parametrize("hw", [(480, 640), (968, 1296), (640, 480), (77, 131)])
def test_depth_resize_is_pils_nearest_on_16_bit_pngs(hw):
    """The index rule equals PIL's NEAREST on the "I;16" images upstream opens, both orientations."""
    d = np.random.default_rng(hw[0]).integers(0, 65535, hw, dtype=np.uint16)
    ours, (nw, nh) = inputs.depth_map(d, 336, scale=1.0)
    im = Image.fromarray(d)
    assert im.mode == "I;16"
    ref = im.resize((nw, nh), Image.NEAREST).crop(((nw - 336) / 2, (nh - 336) / 2, (nw + 336) / 2, (nh + 336) / 2))
    np.testing.assert_array_equal(ours, np.asarray(ref, np.float32))


def test_portrait_intrinsics_keep_upstreams_shift_or_crop_correctly():
    K = np.diag([500.0, 500.0, 1.0, 1.0])
    K[0, 2], K[1, 2] = 240.0, 320.0  # a 480 x 640 portrait frame
    resized = (336, 448)
    with pytest.warns(UserWarning, match="portrait frames"):
        up = inputs.intrinsic_matrix(K, (480, 640), resized)
    # Scale 0.7 on both axes, then upstream's cx -= (336 - 448) / 2 and cy untouched.
    np.testing.assert_allclose(up[:2, :3], [[350, 0, 168 + 56], [0, 350, 224]], rtol=1e-6)
    fixed = inputs.intrinsic_matrix(K, (480, 640), resized, upstream_intrinsics=False)
    np.testing.assert_allclose(fixed[:2, :3], [[350, 0, 168], [0, 350, 224 - 56]], rtol=1e-6)


def test_prompt_and_chunkwise_tokenization():
    text = inputs.prompt("Is the chair near the table?")
    assert text == ("A chat between a curious human and an artificial intelligence assistant. The "
                    "assistant gives helpful, detailed, and polite answers to the human's questions. "
                    "USER: <image>\nIs the chair near the table? ASSISTANT:")
    assert inputs.prompt("q", "Yes.").endswith("ASSISTANT: Yes.</s>")

    def encode(chunk):  # a stand-in SentencePiece: BOS, then one id per character
        return [1] + [3 + ord(ch) % 200 for ch in chunk]

    ids = inputs.tokenize("ab<image>\ncd<boxes>e", encode)
    assert ids == [1, *encode("ab")[1:], -200, *encode("\ncd")[1:], -300, *encode("e")[1:]]
    with pytest.raises(ValueError, match="did not start 'x' with BOS 1"):
        inputs.tokenize("x", lambda c: [5])


def test_click_extraction_and_frame_choice():
    q, click = inputs.extract_click("What is at [0.7314, 1.2536, -0.9118, 0.5]? Describe it.")
    assert q == "What is at <boxes>? Describe it."
    np.testing.assert_array_equal(click, np.float32([0.731, 1.254, -0.912]))
    assert inputs.extract_click("no click here") == ("no click here", None)
    assert inputs.frame_indices(50, 20) == [2 * i for i in range(20)]
    assert inputs.frame_indices(3, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert inputs.frame_indices(20, 20) == list(range(20))


def test_invalid_poses_are_refused_by_view(raw):
    poses = raw["raw_poses_cam2world"].copy()
    poses[1, 0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"poses of views \[1\] hold inf/NaN"):
        inputs.scene(list(raw["raw_rgb"]), list(raw["raw_depth_mm"]), raw["raw_depth_intrinsic"],
                     poses, size=84)
