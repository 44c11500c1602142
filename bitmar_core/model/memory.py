"""Episodic memory (paper §3.4, eq. 1–3): a K×C matrix read by content and written softly.

Functional core (pure tensors, batched, differentiable — used in training):
    read:  w_r = softmax(τ s(M, q)) ∈ R^K,  M_r = w_rᵀ M                 (eq. 2; τ learned, ours)
           s = M q (paper) or cos(P M_k, P q), P a learned key map (`memory_read: cosine`, ours)
    write: w_w = softmax(W_w q − λ u),  M ← M + α Σ_b w_w,b q_bᵀ          (eq. 1; λ = 0 in the paper)
           with cosine reads the logits are β_w cos(W_w,k, q) − λ u (β_w learned)
    L_mem = ||M_after − M_before||_F²                                      (eq. 3)
Why the departures (docs/MODEL.md): with dot-product reads a learned M0 whose rows point where
queries point outscores a slot written once, and with λ = 0 episodes with similar content share
slots; both made the memory a blur that the decoder learned to ignore. Cosine reads score a slot
by what it holds, not by how faded it is; the usage term sends each new episode to a free slot (as
DNC's allocation does), and an empty memory (`memory_init: zero`) reads as nothing at all.
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


def unit(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / |x| along the last axis; an all-zero row (an empty slot) stays zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def scores(M: torch.Tensor, q: torch.Tensor, key: nn.Module | None = None) -> torch.Tensor:
    """Content scores of the K slots: M (...,K,C), q (...,C) → (...,K). Without `key`: M q (eq. 2).
    With it: cos(key(M_k), key(q)) — a learned C×C map, so what tells episodes apart (colour,
    shape) can outweigh what every episode shares, and a faded slot scores as it did when new."""
    M, q = M.float(), q.float()
    if key is None:
        return (M @ q.unsqueeze(-1)).squeeze(-1)
    return (unit(key(M)) @ unit(key(q)).unsqueeze(-1)).squeeze(-1)


def read(M: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | float = 1.0,
         key: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """M (K,C), q (B,C) → (M_r (B,C), w_r (B,K)); w_r = softmax(scale · scores(M, q))."""
    w_r = (scale * scores(M.unsqueeze(0), q, key)).softmax(dim=-1)
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
                scale: torch.Tensor | float = 1.0, key: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One runtime write (read-before-write usage, eq. 1, forgetting) for B separate memories at
    once: M (B,K,C), usage (B,K), q (B,C), w_w (B,K), mask (B,) — an item whose mask is false is
    left as it is. Differentiable: the memory task trains through a sequence of these, exactly as
    `EpisodicMemoryState.write_` runs them on the robot."""
    q = q.float()
    w_r = read_each(M, q, scale, key)[1]
    M_new = M + alpha * w_w.float().unsqueeze(-1) * q.unsqueeze(1)
    u_new = gamma * usage + w_w + w_r
    rel = u_new / u_new.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    M_new = M_new * (1.0 - f0 - f * (1.0 - rel)).unsqueeze(-1)
    if mask is None:
        return M_new, u_new
    m = mask.to(M.dtype)
    return torch.lerp(M, M_new, m.view(-1, 1, 1)), torch.lerp(usage, u_new, m.view(-1, 1))


def read_each(M: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | float = 1.0, key: nn.Module | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 for B separate memories: M (B,K,C), q (B,C) → (M_r (B,C), w_r (B,K))."""
    w_r = (scale * scores(M, q, key)).softmax(dim=-1)
    return torch.einsum("bk,bkc->bc", w_r, M.float()), w_r


class EpisodicMemory(nn.Module):
    """Initial memory M0 (K,C) — learned, or empty — and the learned write addressing W_w: C → K."""

    def __init__(self, config: BitMarConfig):
        super().__init__()
        self.alpha = config.memory_alpha
        self.gamma = config.memory_usage_decay
        self.f0, self.f = config.memory_forget_base, config.memory_forget_rate
        self.usage_weight = config.memory_write_usage
        if config.memory_init == "zero":
            self.register_buffer("M0", torch.zeros(config.memory_slots, config.memory_dim))
        else:
            self.M0 = nn.Parameter(torch.randn(config.memory_slots, config.memory_dim) * 0.02)
        # Full precision: addressing is a softmax over 512 slots, as sensitive as the attention softmax.
        self.write_proj = nn.Linear(config.memory_dim, config.memory_slots, bias=False)
        # Ours: a learned read sharpness (log of the inverse temperature of eq. 2's softmax, as the
        # key strength of NTM-style reads). With a fixed 1, a slot holding α·w·q of one episode
        # stood out from M0 by ~0.1 logit and every read was a blur of all slots.
        self.read_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.key_proj = None
        if config.memory_read == "cosine":
            # Ours: the read key map (identity at first) and a write sharpness β_w for cosine write
            # addressing softmax(β_w cos(W_w,k, q) − λu): with raw logits W_w q the paper's L_mem
            # (α²|q|² Σ w²) had driven W_w to uniform writes (max weight 1/512 measured).
            # Starting sharpness: cosines of different episodes differ by ~0.05, and random write
            # addresses by ~0.1 (measured), so τ = 30 and β_w = 60 give reads and writes that pick.
            self.key_proj = nn.Linear(config.memory_dim, config.memory_dim, bias=False)
            self.read_log_scale.data.fill_(math.log(30.0))
            self.write_log_scale = nn.Parameter(torch.tensor(math.log(60.0)))

    @property
    def read_scale(self) -> torch.Tensor:
        return self.read_log_scale.exp()

    def write_weights(self, q: torch.Tensor, usage: torch.Tensor | None = None) -> torch.Tensor:
        """w_w = softmax(W_w q − λ u): content picks the slot, usage u (K,) or (B,K) steers it off full ones."""
        if self.key_proj is None:
            logits = self.write_proj(q.float())
        else:
            logits = self.write_log_scale.exp() * (unit(q.float()) @ unit(self.write_proj.weight).T)
        if usage is not None and self.usage_weight:
            logits = logits - self.usage_weight * usage
        return logits.softmax(dim=-1)

    def read(self, M: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return read(M, q, self.read_scale, self.key_proj)

    def read_each(self, M: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return read_each(M, q, self.read_scale, self.key_proj)

    def write(self, M: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None,
              usage: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (M_after, w_w)."""
        w_w = self.write_weights(q, usage)
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
            M, usage = recall_step(M, usage, q[:, e], self.write_weights(q[:, e], usage), self.alpha, self.gamma,
                                   self.f0, self.f, mask[:, e], self.read_scale, self.key_proj)
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
        M, w_w = self.memory.write(self.M, q, usage=self.usage)
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
