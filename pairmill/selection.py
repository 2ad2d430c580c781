"""Keying records into episodes, capping each episode and dropping duplicates.

The cap is hot-key safe: a `CombineFn` keeps, per episode, only the N smallest
image-URL hashes (and the first record of each), so a page with 100k images is
reduced in bounded memory by combiner lifting before anything is grouped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from pairmill import urls
from pairmill.records import CrawlRecord
from pairmill.rejects import (
    BAD_PAGE_URL,
    BOILERPLATE,
    CAPPED,
    DUPLICATE,
    EMPTY,
    FETCH_ERROR,
    FILE_TOO_LARGE,
    MISSING_FIELD,
    Rejection,
)

RecordKey = tuple[str, int]


def assign_episode(record: CrawlRecord) -> CrawlRecord | Rejection:
    """Set the canonical page URL, episode id and image id, or say why not."""
    missing = [name for name in ("page_url", "image_url") if not getattr(record, name)]
    if missing:
        return Rejection(MISSING_FIELD, f"missing {' and '.join(missing)}")
    try:
        canonical = urls.canonicalize_url(record.page_url)
    except urls.BadUrl as exc:
        return Rejection(BAD_PAGE_URL, str(exc))
    record.canonical_page_url = canonical
    record.episode_id = urls.episode_id(canonical)
    record.image_id = urls.image_id(record.episode_id, record.image_url)
    return record


@dataclass(frozen=True)
class EpisodeSelection:
    """What the cap keeps of one episode.

    Args:
      winners: the record kept for each selected image URL (the first in input order).
      cutoff: the largest selected URL hash when the episode had more distinct
        URLs than the cap (records above it are capped), else None.
    """

    winners: tuple[RecordKey, ...]
    cutoff: str | None


class SelectEpisodeImages:
    """CombineFn over (image_id, record key) of one episode, bounded by the cap.

    The accumulator maps image id (a hash of the URL, so a deterministic random
    order) to the smallest record key seen for it, holding at most `cap`
    ids, plus whether any id was dropped. Add, merge and extract are all
    O(cap) in memory whatever the episode's size.
    """

    def __init__(self, cap: int):
        self.cap = cap

    def create_accumulator(self):
        return ({}, False)

    def add_input(self, accumulator, element):
        chosen, overflow = accumulator
        image_id, key = element
        known = chosen.get(image_id)
        if known is not None:
            if key < known:
                chosen[image_id] = key
            return accumulator
        chosen[image_id] = key
        if len(chosen) > self.cap:
            del chosen[max(chosen)]
            overflow = True
        return (chosen, overflow)

    def merge_accumulators(self, accumulators):
        merged: dict[str, RecordKey] = {}
        overflow = False
        for chosen, dropped in accumulators:
            overflow = overflow or dropped
            for image_id, key in chosen.items():
                known = merged.get(image_id)
                if known is None or key < known:
                    merged[image_id] = key
        if len(merged) > self.cap:
            keep = sorted(merged)[: self.cap]
            merged = {image_id: merged[image_id] for image_id in keep}
            overflow = True
        return (merged, overflow)

    def extract_output(self, accumulator) -> EpisodeSelection:
        chosen, overflow = accumulator
        cutoff = max(chosen) if overflow and chosen else None
        return EpisodeSelection(tuple(sorted(chosen.values())), cutoff)

    def compact(self, accumulator):
        return accumulator


def selection_outcome(record: CrawlRecord, is_winner: bool, cutoff: str | None) -> Rejection | None:
    """None if the record survives the cap and URL dedup, else why it does not."""
    if is_winner:
        return None
    if cutoff is not None and record.image_id > cutoff:
        return Rejection(CAPPED, "beyond --max-images-per-episode for this page")
    return Rejection(DUPLICATE, "same image URL as an earlier record of this page")


def load_bytes(record: CrawlRecord, max_bytes: int) -> CrawlRecord | Rejection:
    """Make sure the record holds its bytes (reading image_path if needed) and hash them."""
    if record.image is None:
        import fsspec

        try:
            with fsspec.open(record.image_path, "rb") as handle:
                data = handle.read(max_bytes + 1)
        except Exception as exc:  # any filesystem error is this record's problem only
            return Rejection(FETCH_ERROR, f"cannot read {record.image_path}: {exc}"[:300])
        if len(data) > max_bytes:
            return Rejection(
                FILE_TOO_LARGE, f"{record.image_path} is larger than {max_bytes} bytes"
            )
        record.image = data
    if not record.image:
        return Rejection(EMPTY, "zero bytes")
    record.content_sha256 = hashlib.sha256(record.image).hexdigest()
    return record


def first_per_episode(
    members: Iterable[CrawlRecord],
) -> tuple[list[CrawlRecord], list[CrawlRecord]]:
    """Split records of one content hash into (kept, duplicates): one kept per episode.

    The kept record of an episode is the one with the smallest image id, the
    same order the cap uses, so the outcome does not depend on arrival order.
    """
    best: dict[str, CrawlRecord] = {}
    duplicates: list[CrawlRecord] = []
    for record in members:
        current = best.get(record.episode_id)
        if current is None:
            best[record.episode_id] = record
        elif (record.image_id, record.key) < (current.image_id, current.key):
            duplicates.append(current)
            best[record.episode_id] = record
        else:
            duplicates.append(record)
    kept = sorted(best.values(), key=lambda r: (r.episode_id, r.image_id))
    return kept, duplicates


def content_duplicate(kept_url: str) -> Rejection:
    """The rejection of a record whose bytes repeat another image of its page."""
    return Rejection(DUPLICATE, f"same content as {kept_url} on this page"[:300])


class CountPagesUpTo:
    """CombineFn logic: distinct pages showing one content hash, counted up to a limit.

    Stops collecting at `limit` pages, so a logo on a million pages costs
    O(limit) memory; the result says "at least `limit`".
    """

    def __init__(self, limit: int):
        self.limit = limit

    def create_accumulator(self):
        return set()

    def add_input(self, pages: set, episode: str):
        if len(pages) < self.limit:
            pages.add(episode)
        return pages

    def merge_accumulators(self, accumulators):
        merged: set = set()
        for pages in accumulators:
            for episode in pages:
                if len(merged) >= self.limit:
                    return merged
                merged.add(episode)
        return merged

    def extract_output(self, pages: set) -> int:
        return len(pages)


def boilerplate(max_pages: int) -> Rejection:
    """The rejection of an image shown on more than `max_pages` pages."""
    return Rejection(
        BOILERPLATE,
        f"the same bytes appear on more than {max_pages} pages (--max-pages-per-image): "
        "a logo, icon, banner or placeholder",
    )
