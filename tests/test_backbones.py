"""Vision backbones: preprocessing by hand, shapes, real EfficientNet weights, DINOv2, memmaps."""
import warnings

import numpy as np
import pytest
import torch
from skimage import data as skdata

from bitmar_core.inference import backbones
from bitmar_core.inference.backbones import (Dinov2Backbone, EfficientNetLite0Backbone, PrecomputedFeatures,
                                   build_backbone)

torch.set_num_threads(1)

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Backbone:
    return EfficientNetLite0Backbone()


def _normalised(x: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite's inception-style normalisation, (x - 127) / 128, as (3, H, W)."""
    return ((x.astype(np.float64) - 127.0) / 128.0).transpose(2, 0, 1)


def test_preprocess_at_input_size_is_only_normalisation(effnet):
    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = effnet.preprocess(img)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), _normalised(img), atol=1e-6)


def test_preprocess_area_downscale_is_2x2_block_mean(effnet):
    img = np.random.default_rng(1).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    block_mean = img.astype(np.float64).reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(effnet.preprocess(img)[0].numpy(), _normalised(block_mean), atol=1e-5)


def test_preprocess_tiny_uniform_image(effnet):
    img = np.zeros((3, 5, 3), dtype=np.uint8)
    img[...] = (10, 127, 255)
    out = effnet.preprocess(img)[0]
    for c, v in enumerate((10, 127, 255)):
        torch.testing.assert_close(out[c], torch.full((224, 224), (v - 127) / 128), atol=1e-5, rtol=0)


def test_preprocess_list_and_tensor_agree_with_single_images(effnet):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (300, 224, 3), dtype=np.uint8)
    batch = effnet.preprocess([a, b])
    assert batch.shape == (2, 3, 224, 224)
    torch.testing.assert_close(batch[1], effnet.preprocess(b)[0])
    t = torch.from_numpy(np.stack([a, a]))
    torch.testing.assert_close(effnet.preprocess(t), torch.cat([effnet.preprocess(a)] * 2))


def test_preprocess_rejects_bad_images(effnet):
    with pytest.raises(TypeError, match="uint8"):
        effnet.preprocess(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H,W,3\)"):
        effnet.preprocess(np.zeros((8, 8, 4), dtype=np.uint8))


def test_efficientnet_is_frozen_and_gives_1280x7x7(effnet):
    effnet.train()  # a parent's .train() must not unfreeze BatchNorm
    assert not effnet.training and not any(m.training for m in effnet.modules())
    assert not any(p.requires_grad for p in effnet.parameters())
    img = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    feats = effnet.encode(img)
    assert feats.shape == (2, 1280, 7, 7) and feats.dtype == torch.float32
    assert effnet.feature_dim == 1280 and effnet.grid_size == (7, 7)
    assert not feats.requires_grad
    torch.testing.assert_close(effnet.encode(img[1]), feats[1:], atol=1e-4, rtol=1e-4)


def test_efficientnet_channels_last_gives_the_features_of_the_plain_network(effnet):
    """The backbone runs NHWC for speed; the reference is the same weights in the library's own
    NCHW layout."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(backbones.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True))
    ref.eval()
    img = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    pixels = effnet.preprocess(img)
    with torch.no_grad():
        want = ref.extract_features(pixels.contiguous())
    got = effnet(pixels)
    assert got.is_contiguous()
    assert effnet.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_efficientnet_real_weights_classify_photos(effnet):
    feats = effnet.encode([skdata.chelsea(), skdata.coffee()])
    logits = effnet.imagenet_logits(feats)
    top5_cat = set(logits[0].topk(5).indices.tolist())
    assert int(logits[0].argmax()) in IMAGENET_CATS
    assert len(top5_cat & IMAGENET_CATS) >= 3
    assert int(logits[1].argmax()) in {967, 968}  # espresso, cup


def _no_cached_weights(monkeypatch, variant):
    """Point the variant at a hub id no cache holds, so the test behaves the same on a machine
    that does have DINOv2 weights cached."""
    _, *sizes = backbones.DINOV2_VARIANTS[variant]
    monkeypatch.setitem(backbones.DINOV2_VARIANTS, variant, ("bitmar-test/no-such-dinov2", *sizes))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_dinov2_small_random_init_warns_and_gives_16x16_grid(monkeypatch):
    _no_cached_weights(monkeypatch, "vits14")
    with pytest.warns(UserWarning, match="RANDOM"):
        bb = Dinov2Backbone("vits14")
    assert not bb.pretrained and bb.feature_dim == 384
    feats = bb.encode(np.zeros((224, 224, 3), dtype=np.uint8))
    assert feats.shape == (1, 384, 16, 16) and torch.isfinite(feats).all()


@pytest.mark.slow
def test_dinov2_base_random_init_gives_768x16x16(monkeypatch):
    _no_cached_weights(monkeypatch, "vitb14")
    with pytest.warns(UserWarning, match="meaningless"):
        bb = build_backbone("dinov2_vitb14")
    assert bb.net.config.num_hidden_layers == 12
    feats = bb(bb.preprocess(np.full((224, 224, 3), 128, dtype=np.uint8)))
    assert feats.shape == (1, 768, 16, 16)


def test_dinov2_loads_local_weights_and_drops_cls_in_row_major_order(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    ref = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, patch_size=14, image_size=518)).eval()
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # local weights: no random-init warning
        bb = Dinov2Backbone("vits14", weights_dir=tmp_path)
    assert bb.pretrained and bb.feature_dim == 32
    pixels = torch.randn(2, 3, 224, 224)
    grid = bb(pixels)
    with torch.no_grad():
        tokens = ref(pixel_values=pixels).last_hidden_state
    assert grid.shape == (2, 32, 16, 16)
    for r, c in [(0, 0), (0, 15), (3, 7), (15, 0), (15, 15)]:
        torch.testing.assert_close(grid[:, :, r, c], tokens[:, 1 + 16 * r + c], atol=1e-5, rtol=1e-5)


def test_dinov2_missing_weights_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Dinov2Backbone("vitb14", weights_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="vitl14"):
        Dinov2Backbone("vitl14")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_precomputed_features_return_stored_values(tmp_path, dtype):
    stored = np.random.default_rng(4).standard_normal((5, 8, 3, 2)).astype(dtype)
    np.save(tmp_path / "f.npy", stored)
    feats = build_backbone("precomputed", path=tmp_path / "f.npy")
    assert isinstance(feats.array, np.memmap)
    assert len(feats) == 5 and feats.feature_dim == 8 and feats.grid_size == (3, 2)
    assert feats[2].dtype == torch.float32
    np.testing.assert_array_equal(feats[2].numpy(), stored[2].astype(np.float32))
    np.testing.assert_array_equal(feats[[4, 0]].numpy(), stored[[4, 0]].astype(np.float32))
    np.testing.assert_array_equal(feats(torch.tensor([1, 3])).numpy(), stored[[1, 3]].astype(np.float32))


def test_precomputed_features_bad_files_name_the_file(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((4, 8), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((4, 8, 2, 2), np.int32))
    with pytest.raises(ValueError, match=r"flat\.npy.*\(N, D, h, w\)"):
        PrecomputedFeatures(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match=r"ints\.npy.*int32"):
        PrecomputedFeatures(tmp_path / "ints.npy")
    with pytest.raises(FileNotFoundError, match=r"absent\.npy"):
        PrecomputedFeatures(tmp_path / "absent.npy")
    with pytest.raises(ValueError, match="path="):
        build_backbone("precomputed")
    with pytest.raises(ValueError, match="resnet"):
        build_backbone("resnet50")
