"""bitmar-train end to end on a tiny model and a handful of generated scenes: the loss goes down,
checkpoints reload exactly, a resumed run continues bit-for-bit, torchrun keeps ranks in sync."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bitmar_core.inference.checkpoint import load_checkpoint
from bitmar_core.data.scenes import generate_scene, split_seed
from bitmar_core.inference.tokenizer import GPT2Tokenizer, tokenizer_for
from bitmar_core.training.train import build_optimizer, flatten_state, load_recipe, main, scene_cache, unflatten_state

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = dict(d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, mlp_ratio=2, max_text_len=64,
                  vision_hidden=16, memory_slots=8, memory_dim=16, n_fusion_queries=2, sink_tokens=2, window=30,
                  tie_embeddings=True)
TEXT = ("The quick brown fox jumps over the lazy dog.\n\nA robot reads the scene and remembers what it saw.\n\n"
        "Ternary weights take one of three values.\n\nMemory slots are written softly and read by content.\n")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """8 train and 4 validation scenes with real EfficientNet-Lite0 features (built once)."""
    d = tmp_path_factory.mktemp("scene_cache")
    scene_cache(d, 8, "train")
    scene_cache(d, 4, "validation")
    return d


def write_recipe(path: Path, cache_dir: Path, **sections) -> Path:
    text_file = path.parent / "corpus.txt"
    text_file.write_text(TEXT)
    recipe = {
        "model": dict(TINY_MODEL),
        "data": {"cache_dir": str(cache_dir), "scenes": {"n": 8}, "text": str(text_file), "text_items": 2,
                 "caption_max_tokens": 48, "text_max_tokens": 16, "scenes_per_stream": 2, "val_scenes": 4,
                 "val_batches": 1, "probe_size": 4},
        "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "t0": 100, "log_every": 1,
                  "eval_every": 2, "save_every": 2, "num_threads": 1},
        "controller": {"min_steps": 1},
    }
    for k, v in sections.items():
        recipe[k].update(v)
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_overfits_a_repeated_batch_and_the_checkpoint_reloads_exactly(tmp_path, cache_dir):
    # 8 scenes in streams of 2, 8 streams, captions only: every step sees the same 8 scenes.
    cfg = write_recipe(tmp_path / "r.yaml", cache_dir, data={"scenes": {"n": 8}, "text_items": 0},
                       train={"steps": 12, "lr": 1e-2, "batch_size": 8, "eval_every": 100, "save_every": 100})
    run = tmp_path / "run"
    assert main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    rows = metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    lm = [float(r["lm"]) for r in rows]
    assert lm[-1] < lm[0] - 1.0, lm  # starts at ln(50257) ≈ 10.8
    assert abs(lm[0] - math.log(50257)) < 0.5

    # The packed deployable file and the FP32 training checkpoint give the same logits.
    packed = load_checkpoint(run / "model_packed.safetensors")
    fp32 = load_checkpoint(run / "checkpoint" / "model.safetensors")
    ids = torch.tensor([GPT2Tokenizer().encode("There is a red circle in the top left.")])
    prefix = torch.randn(1, 16, 16)
    with torch.no_grad():
        assert torch.equal(packed.decode(ids, prefix=prefix), fp32.decode(ids, prefix=prefix))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["packed_bytes"] == (run / "model_packed.safetensors").stat().st_size
    assert 0.0 < summary["zero_fraction"] < 1.0
    for name in ("memory_activations.png", "zero_fraction.png", "losses.png"):
        assert (run / name).stat().st_size > 1000, name
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, cache_dir):
    cfg = write_recipe(tmp_path / "r.yaml", cache_dir, model={"vision_dropout": 0.1},
                       train={"steps": 5, "save_every": 3, "eval_every": 2})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--config", str(cfg), "--run-dir", str(straight)]) == 0
    assert main(["--config", str(cfg), "--run-dir", str(resumed), "--steps", "3"]) == 0
    state = json.loads((resumed / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["data"]["rng"]["state"]  # the data stream's generator was saved
    assert main(["--run-dir", str(resumed), "--resume", str(resumed / "checkpoint"), "--steps", "5"]) == 0
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == ["1", "2", "3", "4", "5"]
    for step in (3, 4):  # step 4 is the first after the resume
        for key in ("loss", "lm", "lm_scene", "cm", "mem", "similarity"):
            assert float(b[step][key]) == pytest.approx(float(a[step][key]), rel=1e-6, abs=1e-7), (step + 1, key)
    pa = load_checkpoint(straight / "checkpoint" / "model.safetensors").state_dict()
    pb = load_checkpoint(resumed / "checkpoint" / "model.safetensors").state_dict()
    assert all(torch.allclose(pa[k], pb[k], atol=1e-7) for k in pa)


@pytest.mark.slow
def test_a_second_stage_starts_from_the_first_stages_weights(tmp_path, cache_dir):
    """train.init_from: every tensor the stages share is carried over exactly; what the new memory
    addressing adds (key map, write sharpness) or redefines (write addresses, read sharpness) is
    initialised afresh; an empty initial memory replaces the learned M0; a packed file is refused."""
    first = tmp_path / "first"
    assert main(["--config", str(write_recipe(tmp_path / "a.yaml", cache_dir, train={"steps": 2})),
                 "--run-dir", str(first)]) == 0
    source = first / "checkpoint" / "model.safetensors"
    stage2 = {"memory_read": "cosine", "memory_init": "zero", "memory_write_usage": 50.0}
    cfg = write_recipe(tmp_path / "b.yaml", cache_dir, model=stage2,
                       train={"steps": 1, "init_from": str(source), "lr": 1e-12, "warmup_steps": 0})
    from bitmar_core.training.train import init_from_checkpoint
    model = init_from_checkpoint(source, {**TINY_MODEL, **stage2})
    before = load_checkpoint(source).state_dict()
    after = model.state_dict()
    redefined = {"memory.write_proj.weight", "memory.read_log_scale", "memory.M0"}
    for k, v in before.items():
        if k not in redefined:
            assert torch.equal(after[k], v), k
    assert torch.equal(after["memory.M0"], torch.zeros_like(before["memory.M0"]))
    assert torch.equal(after["memory.key_proj.weight"], torch.eye(16))
    assert model.config.memory_read == "cosine" and model.config.vocab_size == load_checkpoint(source).config.vocab_size
    second = tmp_path / "second"
    assert main(["--config", str(cfg), "--run-dir", str(second)]) == 0
    assert load_checkpoint(second / "checkpoint" / "model.safetensors").config.memory_init == "zero"
    with pytest.raises(ValueError, match="packed"):
        init_from_checkpoint(first / "model_packed.safetensors", {**TINY_MODEL, **stage2})
    with pytest.raises(FileNotFoundError, match="init_from"):
        init_from_checkpoint(tmp_path / "missing.safetensors", TINY_MODEL)


def test_optimizer_state_flattens_to_tensors_and_json():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    tensors = {}
    meta = json.loads(json.dumps(flatten_state("optimizer", opt.state_dict(), tensors)))
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    back = unflatten_state(meta, tensors)
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]
    assert set(back["state"]) == set(ref["state"])
    for i, s in ref["state"].items():
        for k, v in s.items():
            assert torch.equal(back["state"][i][k], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back)  # integer keys survive the JSON round trip


def test_auto_optimizer_is_torch_adamw_on_cpu(tiny_model):
    recipe = load_recipe(None, ["train.weight_decay=0.1"])
    opt = build_optimizer(tiny_model, recipe.train, torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(tiny_model.decoder.layers[0].attn.qkv.weight) in decayed
    assert id(tiny_model.wte.weight) not in decayed and id(tiny_model.memory.M0) not in decayed


@pytest.mark.slow
def test_vocabulary_subset_run_records_its_tokens(tmp_path, cache_dir):
    """vocab_subset: the head's rows are the GPT-2 tokens of the training captions (+ the grammar's
    further scenes and the recall texts), recorded in the checkpoint; every training caption
    round-trips through the checkpoint's tokenizer, and the loss starts near ln(rows)."""
    cfg = write_recipe(tmp_path / "r.yaml", cache_dir, model={"vocab_subset": True},
                       data={"text_items": 0, "vocab_extra_scenes": 50},
                       train={"steps": 2, "eval_every": 100, "save_every": 100})
    run = tmp_path / "run"
    assert main(["--config", str(cfg), "--run-dir", str(run)]) == 0
    model = load_checkpoint(run / "model_packed.safetensors")
    tok = tokenizer_for(model)
    gpt2 = GPT2Tokenizer()
    captions = [generate_scene(split_seed("train", i)).caption for i in range(8)]
    assert model.config.vocab_size == len(tok.token_ids) < 1000 and model.config.eos_id == tok.eos_id == 0
    assert tok.token_ids[0] == gpt2.eos_id and tok.token_ids[1:] == sorted(tok.token_ids[1:])
    for c in captions:
        assert tok.decode(tok.encode(c)) == c
    rows = metrics(run)
    assert abs(float(rows[0]["lm"]) - math.log(model.config.vocab_size)) < 0.5


def test_dotted_overrides_reach_nested_keys_and_name_typos():
    r = load_recipe(REPO / "config" / "train_default.yaml", ["data.scenes.n=64", "train.lr=3e-3", "model.window=60"])
    assert r.data.scenes == {"n": 64, "split": "train", "start": 0, "image_size": 224}
    assert r.train.lr == 3e-3 and r.model["window"] == 60
    assert load_recipe(None, ["data.scenes.n=5"]).data.scene_spec("train")["n"] == 5  # from no scenes at all
    with pytest.raises(ValueError, match=r"data.scenes: unknown key\(s\) \['nn'\]"):
        load_recipe(None, ["data.scenes.nn=64"])
    with pytest.raises(ValueError, match="train.learning_rate"):
        load_recipe(None, ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown section 'trian'"):
        load_recipe(None, ["trian.lr=1"])


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {learning_rate: 1e-3}\n")
    with pytest.raises(ValueError, match="train.learning_rate"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="n_layers"):
        load_recipe(None, ["model.n_layers=3"])
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_recipes_load():
    default = load_recipe(REPO / "config" / "train_default.yaml")
    paper = load_recipe(REPO / "config" / "train_paper.yaml")
    assert default.model["tie_embeddings"] is True and default.model["vocab_subset"] is True
    assert default.data.recall_items > 0 and default.data.scenes_per_stream > 1
    assert paper.train.lr == 2e-4 and paper.train.grad_accum == 2
    assert paper.train.batch_size == paper.data.text_items == 32  # 50:50 captions and text, 128 per step
    assert (paper.train.t0, paper.train.t_mult, paper.train.min_lr_ratio) == (1000, 2, 0.1)
    assert paper.train.precision == "fp16" and paper.train.optimizer == "auto"
    assert paper.data.scenes_per_stream == 1


@pytest.mark.slow
def test_torchrun_two_ranks_stay_identical(tmp_path, cache_dir):
    cfg = write_recipe(tmp_path / "r.yaml", cache_dir, train={"steps": 3, "save_every": 3})
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "bitmar_core.training.train",
                           "--config", str(cfg), "--run-dir", str(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [json.loads((run / f"checksum_rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["checksum"] == sums[1]["checksum"]
    assert all(math.isfinite(s["loss"]["loss"]) for s in sums if s["loss"]) and sums[0]["loss"]
    rows = metrics(run)
    assert len(rows) == 3 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((run / "summary.json").read_text())["world"] == 2
