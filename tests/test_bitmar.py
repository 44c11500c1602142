"""BitMar training forward: eq. 4 on the scene-stream, recall and text tasks recomputed by hand from
the pieces (hand-built batches in conftest.py); gradients; the parameter count from the shapes."""
import pytest
import torch
import torch.nn.functional as F

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.bitmar import BitMar

from conftest import (IGNORE, TINY_ANSWERS, TINY_CAPTIONS, TINY_EOS, TINY_N, TINY_RECALL_ORDER, TINY_S,
                      TINY_STREAM_OFFSET, TINY_STREAMS, TINY_TEXTS, tiny_config_dict)


def _model(**kw) -> BitMar:
    torch.manual_seed(0)
    return BitMar(BitMarConfig(**tiny_config_dict(write_fraction=1.0, **kw)))


def _read(M, q, tau):
    """Eq. 2 with the read sharpness: M_r = softmax(τ M q)ᵀ M, one memory (K,C), one query (C,)."""
    return torch.softmax(tau * (M @ q), dim=0) @ M


def _prefix_by_hand(model, V):
    """LN(V) plus the row and column embedding of each token of the 2×2 grid."""
    side = 2
    rows = [model.prefix_row.weight[n // side] + model.prefix_col.weight[n % side] for n in range(V.shape[1])]
    ln = model.prefix_norm
    return F.layer_norm(V, (V.shape[-1],), ln.weight, ln.bias, ln.eps) + torch.stack(rows)


def _nll(model, emb, cond, pos, targets):
    """Σ −log p(target) over the (position, target) pairs of one unpadded stream."""
    logits = model.decoder(emb.unsqueeze(0), cond.unsqueeze(0), pos=pos)[0]
    p, t = zip(*targets)
    return F.cross_entropy(logits[list(p)], torch.tensor(t), reduction="sum"), len(targets)


def _scene_reference(model, batch):
    cfg = model.config
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    Z = model.encode_text(ids, mask)
    V = model.compress_vision(batch["vision"])
    E = len(TINY_CAPTIONS)
    # InfoNCE, both directions, over L2-normalised projected means
    t = F.normalize(model.fusion.text_head(torch.stack([Z[e, :len(TINY_CAPTIONS[e])].mean(0) for e in range(E)])), dim=-1)
    v = F.normalize(model.fusion.vision_head(V.mean(1)), dim=-1)
    sim = t @ v.T / cfg.infonce_temperature
    cm = -0.5 * (sim.log_softmax(1).diag().mean() + sim.log_softmax(0).diag().mean())
    # memory: every episode written (write_fraction = 1) in one batched write; L_mem = ||ΔM||²
    M0 = model.memory.M0
    q_ep = model.fuse(Z, mask, V)
    w_w = torch.softmax(q_ep @ model.memory.write_proj.weight.T, dim=-1)
    M = M0 + cfg.memory_alpha * w_w.T @ q_ep
    mem = ((M - M0) ** 2).sum()
    # each scene conditioned on [q_desc ; read(M, q_desc)], q_desc = fuse(image alone)
    tau = model.memory.read_log_scale.exp()
    q_desc = model.fuse(None, None, V)
    cond_ep = [torch.cat([q_desc[e], _read(M, q_desc[e], tau)]) for e in range(E)]
    prefix = _prefix_by_hand(model, V)
    wte = model.wte.weight
    nll, n = 0.0, 0
    for episodes in TINY_STREAMS:
        emb = [wte[TINY_EOS]] * TINY_S
        cond = [torch.zeros(2 * cfg.memory_dim)] * TINY_S
        targets = []
        for e in episodes:
            cap = TINY_CAPTIONS[e]
            emb += [prefix[e, k] for k in range(TINY_N)]
            emb += [wte[TINY_EOS]] + [wte[c] for c in cap]
            cond += [cond_ep[e]] * (TINY_N + 1 + len(cap))
            first = len(emb) - len(cap) - 1  # the eos that opens the caption
            targets += [(first + k, tok) for k, tok in enumerate(cap + [TINY_EOS])]
        T = len(emb)
        pos = torch.cat([torch.arange(TINY_S), TINY_S + TINY_STREAM_OFFSET + torch.arange(T - TINY_S)])
        a, b = _nll(model, torch.stack(emb), torch.stack(cond), pos, targets)
        nll, n = nll + a, n + b
    return {"cm": cm, "mem": mem, "nll": nll, "n": n, "similarity": (t * v).sum(-1).mean()}


def _recall_reference(model, batch, memory: bool = True):
    """Memories written episode by episode by the runtime's rule, here by hand: read-before-write
    usage, eq. 1, then forgetting; the answer stream's sinks unconditioned."""
    cfg, mem = model.config, model.memory
    Z = model.encode_text(batch["recall_ids"], batch["recall_mask"])
    q = model.fuse(Z, batch["recall_mask"], model.compress_vision(batch["recall_vision"]))
    q_cue = model.fuse(model.encode_text(batch["cue_ids"], batch["cue_mask"]), batch["cue_mask"], None)
    tau = mem.read_log_scale.exp()
    wte = model.wte.weight
    nll, n = 0.0, 0
    for b, order in enumerate(TINY_RECALL_ORDER):
        M, u = mem.M0.float(), torch.zeros(cfg.memory_slots)
        for e in order:
            w_r = torch.softmax(tau * (M @ q[e]), 0)
            w_w = torch.softmax(mem.write_proj.weight @ q[e], 0)
            M = M + cfg.memory_alpha * torch.outer(w_w, q[e])
            u = cfg.memory_usage_decay * u + w_w + w_r
            M = M * (1 - cfg.memory_forget_base - cfg.memory_forget_rate * (1 - u / u.max())).unsqueeze(1)
        M_r = _read(M, q_cue[b], tau) if memory else torch.zeros(cfg.memory_dim)
        ans = TINY_ANSWERS[b]
        ids = [TINY_EOS] * (TINY_S + 1) + ans
        cond = torch.stack([torch.zeros(2 * cfg.memory_dim)] * TINY_S + [torch.cat([q_cue[b], M_r])] * (1 + len(ans)))
        targets = [(TINY_S + k, tok) for k, tok in enumerate(ans + [TINY_EOS])]
        a, c = _nll(model, wte[ids], cond, torch.arange(len(ids)), targets)
        nll, n = nll + a, n + c
    return {"nll": nll, "n": n}


def _text_reference(model):
    nll, n = 0.0, 0
    for text in TINY_TEXTS:
        ids = [TINY_EOS] * (TINY_S + 1) + text
        targets = [(TINY_S + k, tok) for k, tok in enumerate(text + [TINY_EOS])]
        a, c = _nll(model, model.wte.weight[ids], torch.zeros(len(ids), 2 * model.config.memory_dim),
                    torch.arange(len(ids)), targets)
        nll, n = nll + a, n + c
    return {"nll": nll, "n": n}


def test_fixture_layout_is_the_documented_one(tiny_scene_batch, tiny_recall_batch):
    """The hand-built batches themselves: row 0 of the scene streams, spelled out."""
    e, I = TINY_EOS, IGNORE
    b = tiny_scene_batch
    assert b["stream_ids"][0].tolist() == [e, e] + [e] * 4 + [e, 5, 9, 17] + [e] * 4 + [e, 1, 2, 3, 4, 40]
    assert b["stream_vision"][0].tolist() == [-1, -1, 0, 1, 2, 3] + [-1] * 4 + [4, 5, 6, 7] + [-1] * 6
    assert b["stream_segment"][0].tolist() == [-1, -1] + [0] * 8 + [1] * 10
    assert b["stream_targets"][0].tolist() == [I, I, I, I, I, I, 5, 9, 17, e, I, I, I, I, 1, 2, 3, 4, 40, e]
    assert b["stream_pos"].tolist() == [0, 1] + list(range(2 + TINY_STREAM_OFFSET, 2 + TINY_STREAM_OFFSET + 18))
    assert tiny_recall_batch["answer_targets"][1].tolist() == [I, I, 43, 44, e, I]


def test_losses_equal_the_objective_computed_by_hand(tiny_scene_batch, tiny_recall_batch, tiny_text_batch):
    model = _model().eval()
    batch = {**tiny_scene_batch, **tiny_recall_batch, **tiny_text_batch}
    with torch.no_grad():
        out = model(batch)
        s, r, t = _scene_reference(model, batch), _recall_reference(model, batch), _text_reference(model)
        assert torch.isclose(out["cm"], s["cm"], atol=1e-5)
        assert torch.isclose(out["similarity"], s["similarity"], atol=1e-5)
        assert torch.isclose(out["mem"], s["mem"], rtol=1e-5)
        assert s["n"] == 3 + 1 + 5 + 1 + 2 + 1 + 4 + 1 and r["n"] == 4 + 3 and t["n"] == 5 + 3
        assert torch.isclose(out["lm_scene"], s["nll"] / s["n"], atol=1e-5)
        assert torch.isclose(out["lm_recall"], r["nll"] / r["n"], atol=1e-5)
        assert torch.isclose(out["lm_text"], t["nll"] / t["n"], atol=1e-5)
        lm = (s["nll"] + r["nll"] + t["nll"]) / (s["n"] + r["n"] + t["n"])  # per target token, all tasks
        assert torch.isclose(out["lm"], lm, atol=1e-5)
        assert torch.isclose(out["loss"], lm + 1.5 * s["cm"] + 0.1 * s["mem"], atol=1e-5)
        assert torch.isclose(model(batch, cm_weight=3.0)["loss"], lm + 3.0 * s["cm"] + 0.1 * s["mem"], atol=1e-5)
        # recall_weight adds the recall answers' mean loss once more
        model.config.recall_weight = 2.0
        assert torch.isclose(model(batch)["loss"], lm + 1.5 * s["cm"] + 0.1 * s["mem"] + 2.0 * r["nll"] / r["n"],
                             atol=1e-5)
        model.config.recall_weight = 0.0
        # the scene task alone
        alone = model(tiny_scene_batch)
        assert torch.isclose(alone["lm"], s["nll"] / s["n"], atol=1e-5) and alone["lm_recall"] == 0


def test_recall_sinks_are_unconditioned_and_the_write_order_matters(tiny_scene_batch, tiny_recall_batch):
    """The answer stream's sinks enter with no conditioning, as `DecoderSession` feeds them when the
    robot answers; and the memory is written in order (older episodes fade), so reversing the
    order changes the loss."""
    model = _model().eval()
    with torch.no_grad():
        lm = model({**tiny_scene_batch, **tiny_recall_batch})["lm_recall"]
        ref = _recall_reference(model, tiny_recall_batch)
        assert torch.isclose(lm, ref["nll"] / ref["n"], atol=1e-5)
        order = tiny_recall_batch["recall_order"]
        flipped = torch.stack([torch.cat([row[row >= 0].flip(0), row[row < 0]]) for row in order])
        other = model({**tiny_scene_batch, **tiny_recall_batch, "recall_order": flipped})["lm_recall"]
        assert abs(float(other - lm)) > 1e-6


@pytest.mark.parametrize("kw", [{}, {"conditioning": "concat", "fusion_pooling": "learned"},
                                {"memory_read": "cosine", "memory_init": "zero", "memory_write_usage": 50.0,
                                 "recall_weight": 1.0}])
def test_backward_reaches_every_parameter(tiny_scene_batch, tiny_recall_batch, tiny_text_batch, kw):
    model = _model(**kw).train()
    out = model({**tiny_scene_batch, **tiny_recall_batch, **tiny_text_batch})
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    # γ of a BitLinear whose output is L2-normalised (the InfoNCE heads) cancels out: its gradient
    # is zero up to rounding, exactly zero on some CPUs. Everything else must get a gradient.
    invariant = {"fusion.text_head.scale", "fusion.vision_head.scale"}
    params = dict(model.named_parameters())
    dead = [n for n, p in params.items() if n not in invariant and (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []
    for n in invariant:
        assert params[n].grad.abs().item() < 1e-5 * max(1.0, params["fusion.text_head.weight"].grad.abs().max().item()), n


def test_gradient_checkpointing_gives_same_loss_and_grads(tiny_scene_batch, tiny_recall_batch):
    grads = []
    for gc in (False, True):
        model = _model(gradient_checkpointing=gc).train()
        torch.manual_seed(5)  # the write subset draw
        loss = model({**tiny_scene_batch, **tiny_recall_batch})["loss"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_memory_off_means_zero_read(tiny_scene_batch, tiny_recall_batch):
    model = _model(memory_enabled=False).eval()
    with torch.no_grad():
        out = model({**tiny_scene_batch, **tiny_recall_batch})
        assert out["mem"] == 0
        assert torch.equal(model.read_memory(model.memory.M0, torch.randn(2, 32)), torch.zeros(2, 32))
        assert torch.equal(model.read_memory(model.memory.M0.expand(2, -1, -1), torch.randn(2, 32)), torch.zeros(2, 32))
        ref = _recall_reference(model, tiny_recall_batch, memory=False)
        assert torch.isclose(out["lm_recall"], ref["nll"] / ref["n"], atol=1e-5)
        # so the episodes cannot matter to the answer
        other = dict(tiny_recall_batch, recall_vision=torch.randn_like(tiny_recall_batch["recall_vision"]))
        assert torch.equal(model({**tiny_scene_batch, **other})["lm_recall"], out["lm_recall"])


def test_autocast_keeps_logits_and_losses_fp32(tiny_scene_batch, tiny_recall_batch):
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({**tiny_scene_batch, **tiny_recall_batch})
        logits = model.decode(tiny_scene_batch["stream_ids"], prefix=model.vision_prefix(torch.randn(2, 4, 32)))
    assert logits.dtype == torch.float32 and logits.shape[1] == 4 + tiny_scene_batch["stream_ids"].shape[1]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.decoder.head.weight.grad is not None


def test_left_padding_is_rejected(tiny_scene_batch):
    batch = dict(tiny_scene_batch, caption_mask=tiny_scene_batch["caption_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        _model()(batch)


def test_vision_prefix_by_hand_and_rejects_a_non_square_grid():
    model = _model().eval()
    V = torch.randn(2, 4, 32)
    with torch.no_grad():
        assert torch.allclose(model.vision_prefix(V), _prefix_by_hand(model, V), atol=1e-6)
        V9 = torch.randn(1, 9, 32)  # a 3×3 grid: token 5 is row 1, column 2
        ln = model.prefix_norm
        ref5 = F.layer_norm(V9[0, 5], (32,), ln.weight, ln.bias, ln.eps) + model.prefix_row.weight[1] + model.prefix_col.weight[2]
        assert torch.allclose(model.vision_prefix(V9)[0, 5], ref5, atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        model.vision_prefix(torch.randn(1, 6, 32))
    with pytest.raises(ValueError, match="square grid"):
        model.vision_prefix(torch.randn(1, 17 * 17, 32))  # side 17 > vision_grid_max = 16


def test_parameter_count_default_config():
    """Recomputed from the component shapes (BitLinear: weight + γ, no bias; LayerNorm: 2·n)."""
    c = BitMarConfig()
    d, V, C, K, r = c.d_model, c.vocab_size, c.memory_dim, c.memory_slots, c.mlp_ratio
    bitlinear = lambda i, o: i * o + 1
    ln = lambda n: 2 * n
    block = ln(d) + bitlinear(d, 3 * d) + bitlinear(d, d) + ln(d) + bitlinear(d, r * d) + bitlinear(r * d, d)
    parts = {
        "wte": V * d,
        "text_encoder": c.max_text_len * d + c.n_encoder_layers * block + ln(d),
        "vision": bitlinear(c.vision_feature_dim, c.vision_hidden) + bitlinear(c.vision_hidden, C),
        "fusion": c.n_fusion_queries * C + ln(C) + 4 * bitlinear(C, C) + ln(C) + 2 * bitlinear(C, C),
        "memory": K * C + K * C + 1,  # M0, W_w (full precision, no bias), read_log_scale
        "decoder": c.n_decoder_layers * (bitlinear(2 * C, d) + block) + ln(d) + bitlinear(d, V),  # no position table
        "vision_prefix": ln(C) + 2 * c.vision_grid_max * d,
    }
    model = BitMar(c)
    got = model.parameter_breakdown()
    assert got["decoder.head"] == V * d + 1  # ternary weights + γ
    assert {k: v for k, v in got.items() if k != "decoder.head"} == parts
    assert model.num_parameters() == sum(parts.values())
