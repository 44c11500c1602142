"""extract_features: features.npy rows equal the backbone on those images; captions line up."""
import json

import cv2
import numpy as np
import pytest
import torch

from bitmar_core.inference.backbones import EfficientNetLite0Backbone
from bitmar_core.data.datasets import ImageCaptionDataset
from bitmar_core.data.scenes import Scene, generate_scene, make_scene, render_scene, split_seed
from bitmar_core.data.extract_features import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Backbone:
    return EfficientNetLite0Backbone()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generated_scenes_round_trip(tmp_path, effnet):
    out = tmp_path / "out"
    assert main(["--generate-scenes", "4", "--split", "validation", "--seed", "3", "--batch-size", "3",
                 "--threads", "1", "--out", str(out)]) == 0
    feats = np.load(out / "features.npy", mmap_mode="r")
    assert feats.shape == (4, 1280, 7, 7) and feats.dtype == np.float16
    captions, scenes = _rows(out / "captions.jsonl"), _rows(out / "scenes.jsonl")
    images = []
    for i in range(4):
        seed = split_seed("validation", 3 + i)
        image, scene = make_scene(seed)
        images.append(image)
        assert captions[i] == {"caption": scene.caption, "feature_index": i, "scene_seed": seed}
        assert scenes[i] == json.loads(json.dumps(scene.to_dict()))
        np.testing.assert_array_equal(render_scene(Scene.from_dict(scenes[i])), image)
    ref = effnet.encode(images).numpy()
    np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    assert np.abs(ref).max() > 0.5  # not a degenerate all-zero map
    meta = json.loads((out / "meta.json").read_text())
    assert meta["feature_dim"] == 1280 and meta["grid_size"] == [7, 7]
    # what was written is what training reads
    ds = ImageCaptionDataset(out / "captions.jsonl")
    assert ds[2]["caption"] == generate_scene(split_seed("validation", 5)).caption
    np.testing.assert_array_equal(ds[2]["vision"].numpy(), feats[2].astype(np.float32))


def test_image_folder_shares_features_between_captions_of_one_image(tmp_path, effnet):
    imgs = {"a.png": make_scene(1, size=150)[0], "sub/b.png": make_scene(2, size=300)[0]}
    for name, img in imgs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    rows = [{"image": "sub/b.png", "caption": "first"}, {"image": "a.png", "caption": "second"},
            {"image": "sub/b.png", "caption": "third", "source": "kept"}]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["--images", str(tmp_path), "--captions", str(tmp_path / "caps.jsonl"), "--out", str(out)])
    written = _rows(out / "captions.jsonl")
    assert [r["feature_index"] for r in written] == [0, 1, 0]
    assert written[2]["source"] == "kept"
    feats = np.load(out / "features.npy")
    assert feats.shape == (2, 1280, 7, 7)
    ref = effnet.encode([imgs["sub/b.png"], imgs["a.png"]]).numpy()  # PNG is lossless
    np.testing.assert_allclose(feats.astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_bad_arguments_are_reported(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "--captions" in capsys.readouterr().err
    (tmp_path / "caps.jsonl").write_text('{"image": "gone.png", "caption": "x"}\n')
    with pytest.raises(FileNotFoundError, match="gone.png"):
        main(["--images", str(tmp_path), "--captions", str(tmp_path / "caps.jsonl"), "--out", str(tmp_path / "o")])
