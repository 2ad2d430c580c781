"""Reject reasons: every input record that is not an accepted image ends as one."""

from __future__ import annotations

from dataclasses import dataclass

# Reading and keying
MALFORMED = "malformed_record"  # a row that cannot be parsed (bad JSON line, bad base64…)
MISSING_FIELD = "missing_field"  # page_url or image_url absent or empty
BAD_PAGE_URL = "bad_page_url"  # page_url cannot be parsed into an episode key
NO_IMAGE_DATA = "no_image_data"  # neither inline bytes nor a path
# Episode-level selection
CAPPED = "capped"  # beyond --max-images-per-episode
DUPLICATE = "duplicate"  # same image URL or same content earlier in the episode
# Loading bytes
FETCH_ERROR = "fetch_error"  # image_path could not be read
# Decoding and validation
EMPTY = "empty"  # zero bytes
DECODE_ERROR = "decode_error"  # not an image, truncated, or unsupported format
TOO_LARGE = "too_large"  # more pixels than the decompression-bomb limit
TOO_SMALL = "too_small"  # shorter side below --min-side
BAD_ASPECT = "bad_aspect"  # long side / short side above --max-aspect

ALL_REASONS = (
    MALFORMED,
    MISSING_FIELD,
    BAD_PAGE_URL,
    NO_IMAGE_DATA,
    CAPPED,
    DUPLICATE,
    FETCH_ERROR,
    EMPTY,
    DECODE_ERROR,
    TOO_LARGE,
    TOO_SMALL,
    BAD_ASPECT,
)


@dataclass(frozen=True)
class Rejection:
    """Why one record was not accepted.

    Args:
      reason: one of the constants above.
      detail: a short human-readable explanation (an exception message, sizes…).
    """

    reason: str
    detail: str = ""
