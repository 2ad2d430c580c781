"""The FID Inception network: architecture, local-only weight lookup and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pairmill.errors import WeightsError
from pairmill.train import inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A state dict of the right architecture (seeded random weights), saved to a file."""
    torch.manual_seed(0)
    model = inception.build_fid_inception()
    path = tmp_path_factory.mktemp("inception") / "fid_inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_features_are_2048_d_and_deterministic(weights, photos, one_torch_thread):
    from PIL import Image

    features = inception.InceptionFeatures(weights, batch_size=2)
    images = np.stack([np.asarray(Image.fromarray(p).resize((56, 40))) for _, p in photos[:3]])
    first = features(images)
    assert first.shape == (3, 2048) and first.dtype == np.float64
    np.testing.assert_array_equal(first, features(images))
    assert np.isfinite(first).all()
    assert np.abs(first[0] - first[1]).max() > 1e-3 * np.abs(first).max()
    with pytest.raises(ValueError, match="uint8"):
        features(images.astype(np.float32))


def test_pooling_branches_follow_the_fid_graph(one_torch_thread):
    torch.manual_seed(0)
    model = inception.build_fid_inception().eval()
    # 1008 classes, as the TF graph; no auxiliary head.
    assert model.fc.out_features == 1008 and model.AuxLogits is None
    x = torch.randn(1, 1280, 8, 8)
    block = model.Mixed_7b
    padded_free = block.branch_pool(
        F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    )
    with torch.no_grad():
        torch.testing.assert_close(block._forward(x)[-1], padded_free.detach())
    x = torch.randn(1, 2048, 8, 8)
    block = model.Mixed_7c
    with torch.no_grad():
        maxed = block.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        torch.testing.assert_close(block._forward(x)[-1], maxed)


def test_weights_are_found_locally_only(weights, tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert inception.find_weights() is None
    with pytest.raises(WeightsError, match="not found"):
        inception.find_weights(tmp_path / "missing.pth")
    monkeypatch.setenv(inception.ENV, str(weights))
    assert inception.find_weights() == weights
    monkeypatch.delenv(inception.ENV)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights.read_bytes())
    assert inception.find_weights() == cached
    # The hub file name promises a sha256 prefix; these bytes do not have it.
    with pytest.raises(WeightsError, match="sha256"):
        inception.InceptionFeatures(cached)


def test_a_foreign_state_dict_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="not the FID Inception"):
        inception.InceptionFeatures(path)
