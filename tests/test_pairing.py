import numpy as np
import pytest

from pairmill.pairing import pair_episode, pair_id, similarity_matrix


def unit(*values):
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_hand_computed_similarities_and_band():
    # Angles chosen so cosines are known: a·b = cos 60° = 0.5, a·c = cos 0 = 1, b·c = 0.5,
    # a·d = cos 90° = 0.
    a, b = unit(1, 0), unit(0.5, np.sqrt(3) / 2)
    c, d = unit(1, 0), unit(0, 1)
    images = [("a", a), ("b", b), ("c", c), ("d", d)]
    pairs = {(p.cond_image_id, p.target_image_id): p for p in pair_episode("ep", images, 0.3, 0.9)}
    assert len(pairs) == 6  # 4 choose 2
    expected = {
        ("a", "b"): 0.5,
        ("a", "c"): 1.0,
        ("a", "d"): 0.0,
        ("b", "c"): 0.5,
        ("b", "d"): np.sqrt(3) / 2,
        ("c", "d"): 0.0,
    }
    for key, value in expected.items():
        assert pairs[key].similarity == pytest.approx(value, abs=1e-6)
    kept = {key for key, p in pairs.items() if p.kept}
    assert kept == {("a", "b"), ("b", "c"), ("b", "d")}


def test_band_edges_are_inclusive():
    a, b = unit(1, 0), unit(0.5, np.sqrt(3) / 2)
    sim = float(similarity_matrix(np.stack([a, b]))[0, 1])
    assert pair_episode("ep", [("a", a), ("b", b)], sim, sim)[0].kept


def test_similarity_is_the_rounded_dot_product_and_symmetric(rng):
    emb = rng.normal(size=(20, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = similarity_matrix(emb)
    assert sims.dtype == np.float32
    assert np.array_equal(sims, sims.T)
    exact = emb.astype(np.float64) @ emb.astype(np.float64).T
    assert np.array_equal(sims, exact.astype(np.float32))


def test_order_of_images_does_not_matter(rng):
    emb = rng.normal(size=(8, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    images = [(f"img{i}", emb[i]) for i in range(8)]
    first = pair_episode("ep", images, -1, 1, max_pairs=5)
    second = pair_episode("ep", images[::-1], -1, 1, max_pairs=5)
    assert first == second
    assert sum(p.kept for p in first) == 5


def test_max_pairs_samples_only_in_band_pairs(rng):
    emb = rng.normal(size=(10, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    images = [(f"i{i}", emb[i]) for i in range(10)]
    uncapped = pair_episode("ep", images, 0.0, 1.0)
    capped = pair_episode("ep", images, 0.0, 1.0, max_pairs=3)
    in_band = {p.pair_id for p in uncapped if p.kept}
    chosen = {p.pair_id for p in capped if p.kept}
    assert len(chosen) == min(3, len(in_band)) and chosen <= in_band


def test_single_image_has_no_pairs():
    assert pair_episode("ep", [("a", unit(1, 0))], 0, 1) == []


def test_pair_id_is_unordered():
    assert pair_id("ep", "a", "b") == pair_id("ep", "b", "a")
