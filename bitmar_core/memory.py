"""Episodic memory (paper §3.4, eq. 1–3): a K×C matrix read by content and written softly.

Functional core (pure tensors, batched, differentiable — used in training):
    read:  w_r = softmax(τ M q) ∈ R^K,  M_r = w_rᵀ M                     (eq. 2; τ learned, ours)
    write: w_w = softmax(W_w q),      M ← M + α Σ_b w_w,b q_bᵀ           (eq. 1)
    L_mem = ||M_after − M_before||_F²                                      (eq. 3)
Usage-based forgetting (the paper names it, without a formula; ours):
    u ← γ·u + mean_b(w_w + w_r),   M_k ← (1 − f0 − f·(1 − u_k / max u)) · M_k
Every slot loses at least a fraction f0 per write, so with ||q|| ≤ Q a slot's norm can never exceed
||M0_k|| + α·Q / f0 however long the robot runs; stale (rarely used) slots fade up to f0 + f faster.
`EpisodicMemoryState` is the runtime's mutable copy (M, usage, n_writes) with exact save/load.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import BitMarConfig


def read(M: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """M (K,C), q (B,C) → (M_r (B,C), w_r (B,K)); w_r = softmax(scale · M q)."""
    w_r = (scale * (q.float() @ M.float().T)).softmax(dim=-1)
    return w_r @ M.float(), w_r


def write(M: torch.Tensor, q: torch.Tensor, w_w: torch.Tensor, alpha: float,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """M + α Σ_b w_w,b q_bᵀ over the items where mask (B,) is true. w_w (B,K) = softmax(W_w q)."""
    if mask is not None:
        w_w = w_w * mask.to(w_w.dtype).unsqueeze(-1)
    return M.float() + alpha * (w_w.float().T @ q.float())


def delta_penalty(M_after: torch.Tensor, M_before: torch.Tensor) -> torch.Tensor:
    """L_mem = ||ΔM||_F² (squared Frobenius norm of the change a write made)."""
    return (M_after - M_before).pow(2).sum()


def update_usage(usage: torch.Tensor, w_w: torch.Tensor, w_r: torch.Tensor, gamma: float) -> torch.Tensor:
    """u ← γ·u + mean_b(w_w + w_r): a slot is "used" when written to or read from."""
    return gamma * usage + (w_w + w_r).mean(dim=0)


def forget(M: torch.Tensor, usage: torch.Tensor, f0: float, f: float) -> torch.Tensor:
    """Decay slot k by (1 − f0 − f·(1 − u_k / max u)): the most-used slot by f0, an unused one by f0 + f."""
    rel = usage / usage.max().clamp(min=1e-12)
    return M * (1.0 - f0 - f * (1.0 - rel)).unsqueeze(-1)


def recall_step(M: torch.Tensor, usage: torch.Tensor, q: torch.Tensor, w_w: torch.Tensor, alpha: float,
                gamma: float, f0: float, f: float, mask: torch.Tensor | None = None,
                scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One runtime write (read-before-write usage, eq. 1, forgetting) for B separate memories at
    once: M (B,K,C), usage (B,K), q (B,C), w_w (B,K), mask (B,) — an item whose mask is false is
    left as it is. Differentiable: the memory task trains through a sequence of these, exactly as
    `EpisodicMemoryState.write_` runs them on the robot."""
    q = q.float()
    w_r = (scale * torch.einsum("bkc,bc->bk", M, q)).softmax(dim=-1)
    M_new = M + alpha * w_w.float().unsqueeze(-1) * q.unsqueeze(1)
    u_new = gamma * usage + w_w + w_r
    rel = u_new / u_new.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    M_new = M_new * (1.0 - f0 - f * (1.0 - rel)).unsqueeze(-1)
    if mask is None:
        return M_new, u_new
    m = mask.to(M.dtype)
    return torch.lerp(M, M_new, m.view(-1, 1, 1)), torch.lerp(usage, u_new, m.view(-1, 1))


def read_each(M: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 for B separate memories: M (B,K,C), q (B,C) → (M_r (B,C), w_r (B,K))."""
    w_r = (scale * torch.einsum("bkc,bc->bk", M.float(), q.float())).softmax(dim=-1)
    return torch.einsum("bk,bkc->bc", w_r, M.float()), w_r


class EpisodicMemory(nn.Module):
    """Learned initial memory M0 (K,C) and the learned write addressing W_w: C → K."""

    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.alpha = config.memory_alpha
        self.gamma = config.memory_usage_decay
        self.f0, self.f = config.memory_forget_base, config.memory_forget_rate
        self.M0 = nn.Parameter(torch.randn(config.memory_slots, config.memory_dim) * 0.02)
        # Full precision: addressing is a softmax over 512 slots, as sensitive as the attention softmax.
        self.write_proj = nn.Linear(config.memory_dim, config.memory_slots, bias=False)
        # Ours: a learned read sharpness (log of the inverse temperature of eq. 2's softmax, as the
        # key strength of NTM-style reads). With a fixed 1, a slot holding α·w·q of one episode
        # stood out from M0 by ~0.1 logit and every read was a blur of all slots.
        self.read_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    @property
    def read_scale(self) -> torch.Tensor:
        return self.read_log_scale.exp()

    def write_weights(self, q: torch.Tensor) -> torch.Tensor:
        return self.write_proj(q.float()).softmax(dim=-1)

    def read(self, M: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return read(M, q, self.read_scale)

    def read_each(self, M: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return read_each(M, q, self.read_scale)

    def write(self, M: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (M_after, w_w)."""
        w_w = self.write_weights(q)
        return write(M, q, w_w, self.alpha, mask), w_w

    def write_sequence(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """B memories, each starting at M0 and written episode by episode as on the robot:
        q (B,E,C), mask (B,E) → M (B,K,C) after the E writes (masked episodes skipped)."""
        B, E, _ = q.shape
        M = self.M0.float().unsqueeze(0).expand(B, -1, -1)
        usage = M.new_zeros(B, M.shape[1])
        for e in range(E):
            if not bool(mask[:, e].any()):
                continue
            M, usage = recall_step(M, usage, q[:, e], self.write_weights(q[:, e]), self.alpha, self.gamma,
                                   self.f0, self.f, mask[:, e], self.read_scale)
        return M

    def new_state(self) -> "EpisodicMemoryState":
        return EpisodicMemoryState(self)


class EpisodicMemoryState:
    """The memory a running robot carries: M, usage u and the write count, outside autograd.

    write_(q): M ← forget(write(M, q), u') with u' = γu + mean_b(w_w + w_r), w_r read before the
    write (one write = one time step for γ). read(q, touch=True) adds mean_b(w_r) to u without
    decay, so recalled episodes count as used.
    """

    def __init__(self, memory: EpisodicMemory):
        self.memory = memory
        self.reset()

    def reset(self) -> None:
        M0 = self.memory.M0.detach()
        self.M = M0.float().clone()
        self.usage = torch.zeros(M0.shape[0], device=M0.device)
        self.n_writes = torch.zeros((), dtype=torch.int64, device=M0.device)

    @torch.no_grad()
    def write_(self, q: torch.Tensor) -> torch.Tensor:
        """Write q (C,) or (B,C); returns w_w (B,K)."""
        q = q.reshape(-1, self.M.shape[1]).float()
        _, w_r = self.memory.read(self.M, q)
        M, w_w = self.memory.write(self.M, q)
        self.usage = update_usage(self.usage, w_w, w_r, self.memory.gamma)
        self.M = forget(M, self.usage, self.memory.f0, self.memory.f)
        self.n_writes += q.shape[0]
        return w_w

    @torch.no_grad()
    def read(self, q: torch.Tensor, touch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """q (C,) or (B,C) → (M_r (B,C), w_r (B,K))."""
        M_r, w_r = self.memory.read(self.M, q.reshape(-1, self.M.shape[1]))
        if touch:
            self.usage = self.usage + w_r.mean(dim=0)
        return M_r, w_r

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"memory": self.M.clone(), "usage": self.usage.clone(), "n_writes": self.n_writes.clone()}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        expect = {"memory": tuple(self.M.shape), "usage": tuple(self.usage.shape), "n_writes": ()}
        for name, shape in expect.items():
            if name not in state:
                raise KeyError(f"EpisodicMemoryState: missing tensor {name!r}; expected {sorted(expect)}")
            if tuple(state[name].shape) != shape:
                raise ValueError(f"EpisodicMemoryState: {name!r} has shape {tuple(state[name].shape)}, expected {shape}")
        device = self.M.device
        self.M = state["memory"].to(device, torch.float32).clone()
        self.usage = state["usage"].to(device, torch.float32).clone()
        self.n_writes = state["n_writes"].to(device, torch.int64).clone()
