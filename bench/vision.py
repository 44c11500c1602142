"""Benchmark 3: camera frame → 128-D codes, per backbone, through `BitMarRuntime` (what the node
calls): `embed_frame` (backbone → compress_vision → fuse without text → q_scene) and
`encode_episode` (caption → text encoder → fuse → the episode's q and its retrieval embedding).

Baselines in the same run: the backbone alone (what BitMar adds on top of it) and, for the BitMar
parts, the same model in its FP32 training form (BitLinear with fake quantisation, unpacked).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from bitmar_core.inference.backbones import build_backbone
from bitmar_core.model.config import BACKBONE_FEATURE_DIMS
from bitmar_core.model.bitmar import BitMar
from bitmar_core.model.quant import pack_model
from bitmar_core.inference.runtime import BitMarRuntime

from .common import Table, bitmar_config, interleaved, median, ms, per_call, spread, threads

BACKBONES = ("efficientnet_lite0", "dinov2_vits14", "dinov2_vitb14")
CAPTION = "a red cube to the left of a blue sphere on a wooden table"


def _runtime(name: str, packed: bool) -> BitMarRuntime:
    torch.manual_seed(0)
    model = BitMar(bitmar_config(backbone=name, vision_feature_dim=BACKBONE_FEATURE_DIMS[name])).eval()
    if packed:
        pack_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DINOv2 without local weights: random init, warned once
        backbone = build_backbone(name)
    return BitMarRuntime(model, backbone, name, identity=f"bench:{name}")


def frame_to_embedding(quick: bool) -> Table:
    rounds = 3 if quick else 5
    rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # one camera frame
    t = Table("3. Camera frame (640×480 RGB) → 128-D codes, 1 thread",
              ["backbone (weights)", "patch grid", "backbone alone ms (baseline)", "embed_frame ms",
               "BitMar part ms", "encode_episode ms", "same, FP32 training form ms"])
    for name in BACKBONES:
        with threads(1):
            rt, rt32 = _runtime(name, True), _runtime(name, False)
            with torch.no_grad():
                grid = rt.backbone.encode(rgb)
            code = rt.embed_frame(rgb)
            n = 1 if name == "dinov2_vitb14" else 3
            k = 20
            res = interleaved({
                "backbone": lambda: per_call(lambda: rt.backbone.encode(rgb), n),
                "frame": lambda: per_call(lambda: rt.embed_frame(rgb), n),
                "bitmar": lambda: per_call(lambda: _vision_part(rt, grid), k),
                "episode": lambda: per_call(lambda: rt.encode_episode(code, CAPTION), k),
                "episode32": lambda: per_call(lambda: rt32.encode_episode(code, CAPTION), k),
            }, rounds)
        weights = "ImageNet" if name == "efficientnet_lite0" else "random init"
        t.add(f"{name} ({weights})", "×".join(str(s) for s in grid.shape[1:]),
              f"{ms(median(res['backbone']), 1)} {spread(res['backbone'])}",
              f"{ms(median(res['frame']), 1)} {spread(res['frame'])}", ms(median(res["bitmar"]), 2),
              ms(median(res["episode"]), 2), ms(median(res["episode32"]), 2))
    t.notes.append("embed_frame = backbone + the BitMar part (compress_vision, fuse without text, the "
                   "vision embedding); encode_episode = caption tokens → text encoder → fuse with the "
                   f"frame's vision tokens → q and the unit retrieval embedding (caption: {CAPTION!r})")
    t.notes.append(f"median of {rounds} interleaved rounds; DINOv2 weights are not available offline, so "
                   "those rows time a random init of the same architecture (speed does not depend on weights)")
    return t


@torch.no_grad()
def _vision_part(rt: BitMarRuntime, grid: torch.Tensor):
    V = rt.model.compress_vision(grid)
    return rt.model.fuse(None, None, V), rt.model.fusion.vision_embedding(V)
