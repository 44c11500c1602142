"""The paper's figures of a run: memory read weights (Fig. 2), the zero-weight fraction, the losses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.bitmar import BitMar


@torch.no_grad()
def memory_read_weights(model: BitMar, batch: dict) -> np.ndarray:
    """w_r (B, K) of a probe batch under the training protocol: every item's q_ep is written into
    M0, then each image-only query q_desc reads. The paper's Figure 2 (slot activations)."""
    was = model.training
    model.eval()
    ids, mask, vision = batch["caption_ids"], batch["caption_mask"].bool(), batch["vision"]
    Z = model.encode_text(ids, mask)
    V = model.compress_vision(vision)
    M, _ = model.memory.write(model.memory.M0.float(), model.fuse(Z, mask, V))
    _, w_r = model.memory.read(M, model.fuse(None, None, V))
    model.train(was)
    return w_r.float().cpu().numpy()


def plot_memory_activations(first: np.ndarray, last: np.ndarray, steps: tuple[int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), constrained_layout=True)
    vmax = max(first.max(), last.max())
    for ax, w, s in zip(axes, (first, last), steps):
        im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"memory read weights w_r, step {s} (max {w.max():.3f}, "
                     f"slots with w_r > 1/K: {(w.max(0) > 1.0 / w.shape[1]).sum()}/{w.shape[1]})")
        ax.set_ylabel("probe item")
    axes[-1].set_xlabel("memory slot")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_zero_fraction(steps: list[int], fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    ax.plot(steps, [100 * f for f in fractions])
    ax.axhline(42.8, color="grey", linestyle="--", linewidth=1, label="paper: 42.8%")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("zero ternary weights (%)")
    ax.set_title("zero-weight fraction over training")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    s = [int(r["step"]) for r in rows]
    for k in ("loss", "lm", "cm"):
        ax.plot(s, [float(r[k]) for r in rows], label=k)
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss") not in ("", None)]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_yscale("log")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
