"""The values that flow through a build: crawl records, image rows and reject rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pairmill.rejects import Rejection


@dataclass(slots=True)
class CrawlRecord:
    """One crawled image, as read from the input and enriched stage by stage.

    Args:
      source: the input file the record came from.
      row: its 0-based row in that file.
      page_url: the page the image was found on, as crawled.
      image_url: the image's URL (a name: never opened as a local path).
      image: inline image bytes, if the crawl carries them.
      image_path: an fsspec path to the bytes, if not inline.
      extra: the crawl's other columns.
      canonical_page_url: set when keyed.
      episode_id: set when keyed (hash of the canonical page URL).
      image_id: set when keyed (hash of episode id and image URL).
      content_sha256: set once the bytes are loaded (hash of the original bytes).
    """

    source: str
    row: int
    page_url: str | None
    image_url: str | None
    image: bytes | None = None
    image_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    canonical_page_url: str | None = None
    episode_id: str | None = None
    image_id: str | None = None
    content_sha256: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        """Where the record came from; unique per input record and ordered like the input."""
        return (self.source, self.row)

    def without_bytes(self) -> CrawlRecord:
        """A light copy carrying everything but the image bytes."""
        return CrawlRecord(
            self.source,
            self.row,
            self.page_url,
            self.image_url,
            None,
            self.image_path,
            self.extra,
            self.canonical_page_url,
            self.episode_id,
            self.image_id,
            self.content_sha256,
        )


def reject_row(record: CrawlRecord, rejection: Rejection) -> dict[str, Any]:
    """The rejects-table row for a record (schema ``reject_v1``)."""
    return {
        "image_url": _text_or_none(record.image_url),
        "page_url": _text_or_none(record.page_url),
        "episode_id": record.episode_id,
        "reason": rejection.reason,
        "detail": (rejection.detail or "")[:500],
        "source": record.source,
        "row": record.row,
    }


def extra_json(extra: dict[str, Any]) -> str:
    """The crawl's other columns as a stable JSON object (keys sorted)."""
    return json.dumps(extra, sort_keys=True, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)
