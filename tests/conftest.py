"""Shared fixtures: a tiny BitMar (d=32, vocab 64, S=2, W=6) so every test runs in milliseconds."""
import os

import pytest
import torch

from bitmar_core.model.config import BitMarConfig
from bitmar_core.model.bitmar import BitMar

torch.set_num_threads(1)


def tiny_config_dict(**overrides) -> dict:
    d = dict(vocab_size=64, eos_id=63, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
             max_text_len=16, backbone="precomputed", vision_feature_dim=12, vision_hidden=16,
             vision_dropout=0.0, n_fusion_queries=2, memory_slots=8, memory_dim=32,
             sink_tokens=2, window=6)
    d.update(overrides)
    return d


@pytest.fixture
def tiny_config() -> BitMarConfig:
    return BitMarConfig(**tiny_config_dict())


@pytest.fixture
def tiny_model(tiny_config) -> BitMar:
    torch.manual_seed(0)
    return BitMar(tiny_config).eval()


@pytest.fixture
def tiny_batch(tiny_config) -> dict:
    """4 items: 3 image–caption pairs (one with padding) and 1 text-only line."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny_config.vocab_size - 1, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "vision": torch.randn(4, tiny_config.vision_feature_dim, 3, 3, generator=g),
            "has_vision": torch.tensor([True, True, True, False])}

# launch_testing files are run by `launch_test` on a robot (tests/launch/), not collected here:
# `launch` is not installable from PyPI.
collect_ignore = ["launch"]


# --------------------------------------------------------------------------- training batches
# Built by hand in the layout of `bitmar_core.data.streams` (see its docstring), for the tiny
# config: eos 63, S=2 sinks, N=4 vision tokens per scene (a 3×3 grid pooled to 2×2).
IGNORE = -100
TINY_EOS, TINY_S, TINY_N = 63, 2, 4
TINY_CAPTIONS = [[5, 9, 17], [1, 2, 3, 4, 40], [33, 7], [60, 61, 0, 12]]
TINY_STREAMS = [[0, 1], [2, 3]]  # the episodes each scene stream describes, in order
TINY_STREAM_OFFSET = 9  # the stream after the sinks starts at stream index S + 9
TINY_RECALL_CAPTIONS = [[10, 11], [12, 13, 14], [15, 16, 17, 18], [19, 20], [21, 22, 23]]
TINY_RECALL_ORDER = [[2, 0, 1], [4, 3]]  # write order of the episodes into each item's memory
TINY_CUES = [[30, 31, 32], [33, 34]]
TINY_ANSWERS = [[40, 41, 42], [43, 44]]
TINY_TEXTS = [[50, 51, 52, 53], [54, 55]]


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


@pytest.fixture
def tiny_scene_batch(tiny_config) -> dict:
    """Two scene streams of two scenes: [eos]×S | V_e (N slots) eos caption_e | ... ; targets are
    each caption and its closing eos; sinks have segment −1; the stream is padded at the end."""
    eos, S, N = TINY_EOS, TINY_S, TINY_N
    g = torch.Generator().manual_seed(11)
    ids, vis, seg, tgt = [], [], [], []
    for episodes in TINY_STREAMS:
        i, v, s, t = [eos] * S, [-1] * S, [-1] * S, [IGNORE] * S
        for e in episodes:
            cap = TINY_CAPTIONS[e]
            i += [eos] * N + [eos] + cap
            v += [e * N + n for n in range(N)] + [-1] * (1 + len(cap))
            s += [e] * (N + 1 + len(cap))
            t += [IGNORE] * N + cap + [eos]
        ids.append(i), vis.append(v), seg.append(s), tgt.append(t)
    L = max(len(r) for r in ids)
    return {"caption_ids": _pad(TINY_CAPTIONS, eos),
            "caption_mask": _pad([[1] * len(c) for c in TINY_CAPTIONS], 0).bool(),
            "vision": torch.randn(len(TINY_CAPTIONS), tiny_config.vision_feature_dim, 3, 3, generator=g),
            "stream_ids": _pad(ids, eos), "stream_vision": _pad(vis, -1), "stream_segment": _pad(seg, -1),
            "stream_targets": _pad(tgt, IGNORE),
            "stream_pos": torch.cat([torch.arange(S), S + TINY_STREAM_OFFSET + torch.arange(L - S)])}


@pytest.fixture
def tiny_recall_batch(tiny_config) -> dict:
    """Two recall items: 3 and 2 episodes written in TINY_RECALL_ORDER, a cue each, and the answer
    stream [eos]×S eos answer with targets answer + eos."""
    eos, S = TINY_EOS, TINY_S
    g = torch.Generator().manual_seed(12)
    ans_in = [[eos] * S + [eos] + a for a in TINY_ANSWERS]
    ans_tgt = [[IGNORE] * S + a + [eos] for a in TINY_ANSWERS]
    answer_ids = _pad(ans_in, eos)
    return {"recall_ids": _pad(TINY_RECALL_CAPTIONS, eos),
            "recall_mask": _pad([[1] * len(c) for c in TINY_RECALL_CAPTIONS], 0).bool(),
            "recall_vision": torch.randn(len(TINY_RECALL_CAPTIONS), tiny_config.vision_feature_dim, 3, 3, generator=g),
            "recall_order": _pad(TINY_RECALL_ORDER, -1),
            "cue_ids": _pad(TINY_CUES, eos), "cue_mask": _pad([[1] * len(c) for c in TINY_CUES], 0).bool(),
            "answer_ids": answer_ids, "answer_targets": _pad(ans_tgt, IGNORE),
            "answer_pos": torch.arange(answer_ids.shape[1])}


@pytest.fixture
def tiny_text_batch() -> dict:
    """Two text-only rows: [eos]×S eos text, targets text + eos."""
    eos, S = TINY_EOS, TINY_S
    ids = _pad([[eos] * S + [eos] + t for t in TINY_TEXTS], eos)
    return {"text_ids": ids, "text_targets": _pad([[IGNORE] * S + t + [eos] for t in TINY_TEXTS], IGNORE),
            "text_pos": torch.arange(ids.shape[1])}


# --------------------------------------------------------------------------- PostgreSQL (fleet store)
class PgCluster:
    """A real PostgreSQL 16 + pgvector server (the ``pgserver`` wheel) in a temp dir, an admin
    connection, and a least-privilege login role (no superuser, no CREATEDB/CREATEROLE) that
    owns each test database; the admin creates the ``vector`` extension in it."""

    ROLE, PASSWORD = "bitmar_robot", "s3cret-pw"

    def __init__(self, root) -> None:
        import pgserver
        self._pgserver = pgserver
        self.root = root
        self.server = pgserver.get_server(root, cleanup_mode="stop")
        self._n = 0
        self.admin(f"CREATE ROLE {self.ROLE} LOGIN PASSWORD '{self.PASSWORD}' NOSUPERUSER NOCREATEDB NOCREATEROLE")

    @property
    def socket_dir(self) -> str:
        return str(self.server.get_postmaster_info().socket_dir)

    def admin(self, sql: str, dbname: str = "postgres") -> None:
        import psycopg
        with psycopg.connect(f"host={self.socket_dir} user=postgres dbname={dbname}", autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """A fresh database owned by the role, with pgvector; returns the role's DSN (password in it)."""
        self._n += 1
        name = f"bitmar_t{self._n}"
        self.admin(f"CREATE DATABASE {name} OWNER {self.ROLE}")
        self.admin("CREATE EXTENSION vector", dbname=name)
        return f"postgresql://{self.ROLE}:{self.PASSWORD}@/{name}?host={self.socket_dir}"

    def stop(self) -> None:
        from pgserver._commands import pg_ctl
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.server.cleanup()


@pytest.fixture(scope="session")
def pg_cluster():
    import shutil
    import tempfile
    # Not under pytest's 0700 tmp dirs: run as root, pgserver runs PostgreSQL as its own user,
    # which must reach the data directory (pg_ctl stop/start in the restart tests).
    root = tempfile.mkdtemp(prefix="bitmar-pg-")
    os.chmod(root, 0o755)
    cluster = PgCluster(os.path.join(root, "data"))
    yield cluster
    cluster.close()
    shutil.rmtree(root, ignore_errors=True)
