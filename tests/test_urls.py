import pytest

from pairmill.urls import BadUrl, canonicalize_url, domain, episode_id, image_id


@pytest.mark.parametrize(
    "variant",
    [
        "https://example.com/gallery?id=3&lang=en",
        "HTTPS://EXAMPLE.COM/gallery?lang=en&id=3",
        "https://example.com:443/gallery?id=3&lang=en#photos",
        "https://example.com/gallery?utm_source=x&utm_medium=y&id=3&lang=en",
        "https://Example.com/gallery?fbclid=abc&id=3&gclid=1&lang=en",
        "  https://example.com/gallery?id=3&lang=en&mc_cid=9  ",
        "https://example.com./gallery?id=3&lang=en",
    ],
)
def test_variants_of_one_page_are_one_episode(variant):
    assert canonicalize_url(variant) == "https://example.com/gallery?id=3&lang=en"
    assert episode_id(canonicalize_url(variant)) == episode_id(
        canonicalize_url("https://example.com/gallery?id=3&lang=en")
    )


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://example.com", "http://example.com/"),
        ("http://example.com:80/a", "http://example.com/a"),
        ("http://example.com:8080/a", "http://example.com:8080/a"),
        ("https://example.com:80/a", "https://example.com:80/a"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("https://example.com/a%7ex", "https://example.com/a%7Ex"),
        ("https://example.com/?b=&a=1", "https://example.com/?a=1&b="),
        ("https://example.com/Path/Case", "https://example.com/Path/Case"),
        ("https://user:pw@Example.com/a", "https://user:pw@example.com/a"),
    ],
)
def test_canonical_forms(url, expected):
    assert canonicalize_url(url) == expected


def test_different_pages_stay_different():
    a = canonicalize_url("https://example.com/gallery?id=3")
    b = canonicalize_url("https://example.com/gallery?id=4")
    c = canonicalize_url("http://example.com/gallery?id=3")
    assert len({a, b, c}) == 3


@pytest.mark.parametrize(
    "bad", ["", "   ", "not a url", "/relative/path", "http://", "http://x:99999/"]
)
def test_bad_urls_raise(bad):
    with pytest.raises(BadUrl):
        canonicalize_url(bad)


def test_ids_are_stable_and_short():
    ep = episode_id("https://example.com/")
    assert ep == episode_id("https://example.com/") and len(ep) == 16
    assert image_id(ep, "https://cdn/x.jpg") != image_id(ep, "https://cdn/y.jpg")
    assert domain("https://www.Example.com/x") == "example.com"
