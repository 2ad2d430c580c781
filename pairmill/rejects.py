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
# Loading bytes (image_path) and fetching (image_url over HTTP)
FETCH_ERROR = "fetch_error"  # image_path could not be read, or a network error
DISALLOWED_URL = "disallowed_url"  # not http(s), or a redirect to another scheme
HTTP_ERROR = "http_error"  # a final non-2xx status (the status is in detail)
TIMEOUT = "timeout"  # connect or read timeout, after the retries
FILE_TOO_LARGE = "file_too_large"  # more bytes than --max-image-bytes
OPTED_OUT = "opted_out"  # X-Robots-Tag: noai / noimageai
BOILERPLATE = "boilerplate"  # the same bytes on more than --max-pages-per-image pages
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
    DISALLOWED_URL,
    HTTP_ERROR,
    TIMEOUT,
    FILE_TOO_LARGE,
    OPTED_OUT,
    BOILERPLATE,
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
