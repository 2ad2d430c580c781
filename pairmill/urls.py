"""Page-URL canonicalisation: variants of one web page become one episode key."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}

# Click and campaign trackers: they name the visit, not the page.
TRACKING_PARAMS = frozenset(
    {
        "fbclid",
        "gclid",
        "gclsrc",
        "dclid",
        "gbraid",
        "wbraid",
        "msclkid",
        "yclid",
        "twclid",
        "ttclid",
        "li_fat_id",
        "igshid",
        "mc_cid",
        "mc_eid",
        "_ga",
        "_gl",
        "_hsenc",
        "_hsmi",
        "mkt_tok",
        "oly_anon_id",
        "oly_enc_id",
        "vero_id",
        "rb_clickid",
        "s_cid",
        "spm",
    }
)
TRACKING_PREFIXES = ("utm_", "pk_", "hsa_")

_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


class BadUrl(ValueError):
    """The string cannot be read as an absolute URL with a host."""


def is_tracking_param(name: str) -> bool:
    """True for query parameters that identify a click rather than the page."""
    lowered = name.lower()
    return lowered in TRACKING_PARAMS or lowered.startswith(TRACKING_PREFIXES)


def _normalise_escapes(text: str) -> str:
    # %7e and %7E are the same byte; upper-case escapes so variants compare equal.
    return _PERCENT_ESCAPE.sub(lambda m: m.group(0).upper(), text)


def canonicalize_url(url: str) -> str:
    """Return the canonical form of a page URL.

    Scheme and host lower-cased, default port and fragment dropped, tracking
    parameters (``utm_*``, ``fbclid``, ``gclid``, …) dropped, the remaining query
    parameters sorted, an empty path written as ``/``. Raises ``BadUrl`` for a
    string with no scheme or no host.
    """
    if not isinstance(url, str):
        raise BadUrl(f"not a string: {type(url).__name__}")
    text = url.strip()
    if not text:
        raise BadUrl("empty URL")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:  # bad port, bad IPv6 literal
        raise BadUrl(f"{exc}: {text[:200]}") from exc
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if not scheme or not host:
        raise BadUrl(f"no scheme or host: {text[:200]}")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host
    if parts.username is not None:
        userinfo = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{userinfo}@{host}"
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        netloc = f"{netloc}:{port}"
    path = _normalise_escapes(parts.path) or "/"
    query_items = [
        (key, value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if not is_tracking_param(key)
    ]
    query_items.sort()
    query = urlencode(query_items, quote_via=quote, safe="/:@!$'()*,;")
    return urlunsplit((scheme, netloc, path, _normalise_escapes(query), ""))


def stable_hash(*parts: str, length: int = 16) -> str:
    """A short hex id from the SHA-1 of the parts (stable across runs and machines)."""
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return digest[:length]


def episode_id(canonical_page_url: str) -> str:
    """The episode key of a canonical page URL."""
    return stable_hash(canonical_page_url)


def image_id(episode: str, image_url: str) -> str:
    """The id of one image within an episode (unique once URL duplicates are dropped)."""
    return stable_hash(episode, image_url.strip())


def domain(url: str) -> str:
    """The host of a URL, lower-cased, without a leading ``www.``; '' if none."""
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""
    return host[4:] if host.startswith("www.") else host


__all__ = [
    "BadUrl",
    "canonicalize_url",
    "domain",
    "episode_id",
    "image_id",
    "is_tracking_param",
    "stable_hash",
]
