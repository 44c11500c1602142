"""BitMar training forward: eq. 4 recomputed by hand; gradients reach every parameter."""
import pytest
import torch
import torch.nn.functional as F

from bitmar_core.config import BitMarConfig
from bitmar_core.model import BitMar

from conftest import tiny_config_dict


def _model(**kw):
    torch.manual_seed(0)
    return BitMar(BitMarConfig(**tiny_config_dict(write_fraction=1.0, **kw)))


def test_losses_equal_the_objective_computed_by_hand(tiny_batch):
    model = _model().eval()
    cfg = model.config
    with torch.no_grad():
        out = model(tiny_batch)
        ids, mask, hv = tiny_batch["input_ids"], tiny_batch["attention_mask"].bool(), tiny_batch["has_vision"]
        Z = model.encode_text(ids, mask)
        V = model.compress_vision(tiny_batch["vision"])
        # InfoNCE over the 3 image–caption items, both directions
        t = F.normalize(model.fusion.text_head(torch.stack([Z[b][mask[b]].mean(0) for b in range(3)])), dim=-1)
        v = F.normalize(model.fusion.vision_head(V[:3].mean(1)), dim=-1)
        sim = t @ v.T / cfg.infonce_temperature
        cm = -0.5 * (sim.log_softmax(1).diag().mean() + sim.log_softmax(0).diag().mean())
        assert torch.isclose(out["cm"], cm, atol=1e-5)
        assert torch.isclose(out["similarity"], (t * v).sum(-1).mean(), atol=1e-5)
        assert torch.isclose(out["similarity"], model.cross_modal_similarity(Z[:3], mask[:3], V[:3]), atol=1e-5)
        # memory: all 3 image items written with q_ep = fuse(caption, V); L_mem = ||ΔM||²
        M0 = model.memory.M0
        q_ep = model.fuse(Z[:3], mask[:3], V[:3])
        w_w = torch.softmax(q_ep @ model.memory.write_proj.weight.T, dim=-1)
        M = M0 + cfg.memory_alpha * w_w.T @ q_ep
        assert torch.isclose(out["mem"], ((M - M0) ** 2).sum(), rtol=1e-5)
        # decoder: read with the image only; text-only item reads with q = 0
        q_desc = torch.cat([model.fuse(None, None, V[:3]), torch.zeros(1, 32)])
        M_r = torch.softmax(q_desc @ M.T, dim=-1) @ M
        lm_terms = []
        for b in range(4):
            cap = ids[b][mask[b]].tolist()
            seq = torch.tensor([[63] + cap + [63]])
            logits = model.decode(seq[:, :-1], torch.cat([q_desc[b:b + 1], M_r[b:b + 1]], -1))
            lm_terms.append(F.cross_entropy(logits[0], seq[0, 1:], reduction="none"))
        lm = torch.cat(lm_terms).mean()
        assert torch.isclose(out["lm"], lm, atol=1e-4)
        assert torch.isclose(out["loss"], lm + 1.5 * cm + 0.1 * out["mem"], atol=1e-4)
        assert torch.isclose(model(tiny_batch, cm_weight=3.0)["loss"], lm + 3.0 * cm + 0.1 * out["mem"], atol=1e-4)


def test_text_only_batch_has_only_lm_loss(tiny_batch):
    model = _model().eval()
    batch = {"input_ids": tiny_batch["input_ids"], "attention_mask": tiny_batch["attention_mask"]}
    with torch.no_grad():
        out = model(batch)
    assert out["cm"] == 0 and out["mem"] == 0 and torch.isclose(out["loss"], out["lm"])


@pytest.mark.parametrize("kw", [{}, {"conditioning": "concat", "fusion_pooling": "learned"}])
def test_backward_reaches_every_parameter(tiny_batch, kw):
    model = _model(**kw).train()
    out = model(tiny_batch)
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


def test_gradient_checkpointing_gives_same_loss_and_grads(tiny_batch):
    grads = []
    for gc in (False, True):
        model = _model(gradient_checkpointing=gc).train()
        torch.manual_seed(5)  # the write subset draw
        loss = model(tiny_batch)["loss"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_memory_off_means_zero_read(tiny_batch):
    model = _model(memory_enabled=False).eval()
    with torch.no_grad():
        out = model(tiny_batch)
        assert out["mem"] == 0
        assert torch.equal(model.read_memory(model.memory.M0, torch.randn(2, 32)), torch.zeros(2, 32))


def test_left_padding_is_rejected(tiny_batch):
    batch = dict(tiny_batch, attention_mask=tiny_batch["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        _model()(batch)


def test_parameter_count_default_config():
    model = BitMar(BitMarConfig())
    parts = model.parameter_breakdown()
    assert parts["wte"] == 50257 * 128
    assert parts["decoder.head"] == 50257 * 128 + 1  # ternary weights + γ
    assert sum(v for k, v in parts.items() if k != "decoder.head") == model.num_parameters() == 15_509_293


def test_autocast_keeps_logits_and_losses_fp32(tiny_batch):
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tiny_batch)
        logits = model.decode(tiny_batch["input_ids"])
    assert logits.dtype == torch.float32
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.decoder.head.weight.grad is not None


def test_position_offset_training_decodes_at_a_clamped_stream_offset():
    """With position_offset_prob=1 the LM loss equals decoding the same tokens at the offset drawn
    from the same RNG state (positions clamped at S+W-1), computed here by hand."""
    import torch.nn.functional as F

    from bitmar_core.config import BitMarConfig
    from bitmar_core.model import BitMar
    from conftest import tiny_config_dict

    cfg = BitMarConfig(**tiny_config_dict(position_offset_prob=1.0, memory_enabled=False))
    torch.manual_seed(0)
    model = BitMar(cfg).train()
    ids = torch.randint(0, cfg.vocab_size - 1, (2, 5), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(7)
    lm = model(batch)["lm"]

    torch.manual_seed(7)
    assert float(torch.rand(())) < 1.0
    start = int(torch.randint(0, cfg.max_positions, ()))
    inputs, targets, tmask = model._decoder_tokens(ids, torch.ones_like(ids).bool())
    cond = model.condition(torch.zeros(2, cfg.memory_dim), torch.zeros(2, cfg.memory_dim))
    logits = model.decode(inputs, cond, start=start)
    ref = F.cross_entropy(logits[tmask], targets[tmask])
    assert torch.allclose(lm, ref)
    # and it differs from decoding at position 0 whenever the offset is non-zero
    if start:
        assert not torch.allclose(F.cross_entropy(model.decode(inputs, cond)[tmask], targets[tmask]), ref)
