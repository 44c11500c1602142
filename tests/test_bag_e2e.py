"""End to end, as on the robot's replay path: a rosbag2 made by the project's generator is replayed
(another OS process) into the node (a third), and the store, the description stream and the query
service are checked against the bag's own captions; a restart must give the same answers."""
from __future__ import annotations

import json

import pytest

import ros_helpers  # noqa: F401
from node_harness import Harness, NodeProcess, frame_message, replay_bag, write_tiny_checkpoint
from ros_helpers import REPO

pytestmark = [pytest.mark.ros, pytest.mark.slow]


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    from bitmar_ros.bag_tools import make_demo_bag
    return make_demo_bag(tmp_path_factory.mktemp("bag") / "demo", n_scenes=4, frames_per_scene=4, fps=8.0,
                         seed=3, photos=True)


def test_replayed_bag_becomes_episodes_descriptions_and_answers(bag, tmp_path):
    from bitmar_ros.bag_tools import demo_scenes

    sidecar = [json.loads(line) for line in (bag / "scenes.jsonl").read_text().splitlines() if line.strip()]
    captions = [s["caption"] for s in sidecar]
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    store = tmp_path / "store"
    h = Harness()
    node = NodeProcess(ckpt, store, "describe_rate_hz:=4.0", "max_new_tokens:=6")
    try:
        h.wait_connected(node)
        replay_bag(bag)
        h.wait(lambda: len(h.episodes) >= len(captions), 120, "one episode per caption in the bag")
        assert [e.caption for e in h.episodes] == captions
        h.wait(lambda: any(d.is_final for d in h.descriptions), 60, "a complete description")
        streams = {}
        for d in h.descriptions:
            streams.setdefault(d.stream_id, []).append(d)
        complete = [s for s in streams.values() if s[-1].is_final]
        for s in complete:
            assert [d.token_index for d in s] == list(range(len(s)))
            assert s[-1].text == "".join(d.text_delta for d in s)

        items = demo_scenes(4, 3, 224, 224, photos=True)
        assert [it["caption"] for it in items] == captions
        answers = []
        for it in items:
            resp = h.ask(it["caption"], k=3, image=frame_message(it["image"], h))
            assert resp.success, resp.message
            assert resp.episodes[0].caption == it["caption"]
            answers.append([(e.id, round(e.score, 5)) for e in resp.episodes])
        node.stop()
        node = NodeProcess(ckpt, store, "describe_rate_hz:=0.0")
        h.wait_connected(node)
        again = [[(e.id, round(e.score, 5)) for e in h.ask(it["caption"], k=3, image=frame_message(it["image"], h)).episodes]
                 for it in items]
        assert again == answers
    finally:
        node.stop()
        h.close()


def test_bundled_demo_bag_is_what_the_generator_makes(tmp_path):
    """data/demo_bag is committed for the README's main command; it must not drift from its generator."""
    from bitmar_ros.bag_tools import make_demo_bag

    fresh = make_demo_bag(tmp_path / "demo_bag")
    for name in ("demo_bag.mcap", "metadata.yaml", "scenes.jsonl"):
        assert (fresh / name).read_bytes() == (REPO / "data" / "demo_bag" / name).read_bytes(), name
