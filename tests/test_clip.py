"""CLIP vision tower against stock transformers `CLIPVisionModel` (tiny random configs)."""

import numpy as np
import pytest
import torch
import transformers

from spatial_distill.models import clip
from spatial_distill.models.state_dict import CheckpointMismatchError


def _hf_tower(**overrides):
    kw = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=56, patch_size=14)
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial norms and biases (HF initialises them to 1 / 0)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return np.transpose(x.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_every_hidden_state_and_the_pooled_output_match_transformers(act):
    hf = _hf_tower(hidden_act=act)
    tower = clip.load_official(hf.state_dict(), config=hf.config.to_dict())
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
    ours = tower.hidden_states(_nhwc(x))
    assert len(ours) == len(ref.hidden_states) == 4
    for a, b in zip(ours, ref.hidden_states):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(tower.pooled(_nhwc(x))), ref.pooler_output.numpy(),
                               atol=2e-5, rtol=0)


def test_features_select_a_layer_and_drop_cls_running_only_what_is_needed():
    hf = _hf_tower()
    tower = clip.load_official(hf.state_dict(), config=hf.config.to_dict())
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states
    feats = np.asarray(tower.features(_nhwc(x), select_layer=-2, select_feature="patch"))
    assert feats.shape == (1, 16, 32)  # 4x4 patches, CLS dropped
    np.testing.assert_allclose(feats, ref[-2][:, 1:].numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(tower.features(_nhwc(x), 1, "cls_patch")), ref[1].numpy(),
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="mm_vision_select_layer=-5"):
        tower.features(_nhwc(x), select_layer=-5)


def test_loads_clipmodel_keys_and_names_every_bad_key(tmp_path):
    hf = _hf_tower()
    state = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(3, 4)  # a CLIPModel's
    state["logit_scale"] = torch.zeros(())
    tower = clip.load_official(state, config={"vision_config": hf.config.to_dict()})
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(np.asarray(tower.hidden_states(_nhwc(x))[-1]), ref.numpy(), atol=2e-5)

    del state["vision_model.pre_layrnorm.bias"]
    state["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    state["vision_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as e:
        clip.load_official(state, config=hf.config.to_dict())
    msg = str(e.value)
    assert "pre_layrnorm.bias" in msg and "layers.0.mlp.fc1.weight: checkpoint (7, 32)" in msg
    assert "vision_model.extra.weight" in msg and "text_model" not in msg


def test_directory_checkpoint_and_config_errors(tmp_path):
    hf = _hf_tower()
    hf.save_pretrained(tmp_path)
    tower = clip.load_official(tmp_path)
    assert tower.config.image_size == 56 and tower.config.num_layers == 3
    with pytest.raises(ValueError, match=r"pixels must be \[N, 56, 56, 3\].*got \(1, 64, 64, 3\)"):
        tower.hidden_states(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        clip.CLIPVisionConfig.from_hf({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="image_size 50 is not a multiple of patch_size 14"):
        clip.CLIPVisionConfig(image_size=50)
    # An absent field takes transformers' default, as from_pretrained would.
    assert clip.CLIPVisionConfig.from_hf({}).image_size == 224
    assert clip.CLIPVisionConfig.vit_l14_336().grid == 24
