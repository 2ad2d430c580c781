"""Shared fixtures: real photographs and a sample crawl made from them."""

from __future__ import annotations

import io

import numpy as np
import pytest


@pytest.fixture(scope="session")
def photos():
    from pairmill.sample import real_photos

    return real_photos()


@pytest.fixture(scope="session")
def jpeg_of(photos):
    """Encode a named real photo (optionally resized) as JPEG bytes."""
    from PIL import Image

    by_name = dict(photos)

    def encode(name: str, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
        image = Image.fromarray(by_name[name])
        if size:
            image = image.resize(size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    return encode


@pytest.fixture(scope="session")
def sample_crawl(tmp_path_factory):
    from pairmill.sample import make_sample_crawl

    return make_sample_crawl(tmp_path_factory.mktemp("crawl"), pages=6, images_per_page=6)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def one_torch_thread():
    """Training tests run torch on one thread: two OpenMP threads on a shared 2-core
    machine spin against each other and run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
