"""The run directory: preparing it, and writing `manifest.json` after the pipeline ran.

The driver never reads shards back: shard rows, bytes and sha256 come from the
report the writers produced, counts from the data the pipeline counted.
"""

from __future__ import annotations

import json
import time
from typing import Any

import schemas
from pairmill import __version__
from pairmill.errors import ConfigError
from pairmill.rows import REPORT_NAME
from pairmill.shards import get_writer, write_bytes, write_shard

TABLES = {"pairs": "pair", "images": "image", "similarities": "similarity", "rejects": "reject"}
REPORT = REPORT_NAME
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _fs(out: str):
    import fsspec

    return fsspec.core.url_to_fs(out)


def prepare_output(out: str, overwrite: bool) -> None:
    """Refuse to mix runs in one directory; with `overwrite`, clear the old run first."""
    fs, path = _fs(out)
    existing = [name for name in (*TABLES, MANIFEST, REPORT) if fs.exists(f"{path}/{name}")]
    if existing and not overwrite:
        raise ConfigError(
            f"{out} already holds a run ({existing[0]}): pass --overwrite or another --out"
        )
    for name in existing:
        fs.rm(f"{path}/{name}", recursive=True)
    fs.makedirs(path, exist_ok=True)


def read_report(out: str) -> dict[str, Any]:
    fs, path = _fs(out)
    with fs.open(f"{path}/{REPORT}", "rb") as handle:
        return json.loads(handle.read())


def finish_run(
    out: str,
    config: dict[str, Any],
    encoder: dict[str, Any],
    seconds: float,
    runner: str,
    pair_format: str,
    pair_options: dict[str, Any] | None = None,
    from_run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write empty shards for empty tables, then `manifest.json`; return the manifest."""
    from pairmill.config import schema_ids

    report = read_report(out)
    shards = report["shards"]
    ids = schema_ids(bool(config.get("store_tokens")))
    for table in TABLES:
        if not any(s["table"] == table for s in shards):
            fmt, options = _format_of(table, pair_format, pair_options)
            info = write_shard(out, table, 0, 1, [], schemas.load(ids[table]), fmt, options)
            shards.append(info.to_dict())
    counts = _counts(report["counts"])
    counts["top_reject_domains"] = report.get("lists", {}).get("top_reject_domains", [])
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "pairmill_version": __version__,
        "created_unix": int(time.time()),
        "runner": runner,
        "config": config,
        "encoder": encoder,
        "thresholds": {"low": config["low"], "high": config["high"]},
        "counts": counts,
        "reconciled": counts["records_in"] == counts["images"] + counts["rejected"],
        "from_run": from_run,
        "tables": _tables(shards, pair_format, pair_options, ids),
        "timing": {
            "seconds": round(seconds, 3),
            "images_per_second": round(counts["images"] / seconds, 2) if seconds > 0 else None,
            "records_per_second": round(counts["records_in"] / seconds, 2) if seconds > 0 else None,
        },
    }
    fs, path = _fs(out)
    write_bytes(f"{out.rstrip('/')}/{MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode())
    fs.rm(f"{path}/{REPORT}")
    return manifest


def check_reconciled(manifest: dict[str, Any], out: str) -> None:
    """Raise if the run lost or double-counted records (the manifest is written first)."""
    from pairmill.errors import PairmillError

    if not manifest["reconciled"]:
        counts = manifest["counts"]
        raise PairmillError(
            f"counts do not reconcile: {counts['records_in']} records in, {counts['images']} "
            f"images + {counts['rejected']} rejects; see {out}/manifest.json"
        )


def _counts(raw: dict[str, int]) -> dict[str, Any]:
    rejects = {
        key.split(".", 1)[1]: value
        for key, value in sorted(raw.items())
        if key.startswith("rejects.")
    }
    return {
        "records_in": raw.get("records_in", 0),
        "images": raw.get("images", 0),
        "rejected": sum(rejects.values()),
        "rejects": rejects,
        "unique_images": raw.get("unique_images", 0),
        "episodes": raw.get("episodes", 0),
        "candidate_pairs": raw.get("candidate_pairs", 0),
        "kept_pairs": raw.get("kept_pairs", 0),
        "funnel": _funnel(raw, rejects),
    }


def _funnel(raw: dict[str, int], rejects: dict[str, int]) -> dict[str, int]:
    """How many records survive each stage, read -> kept.

    read: input records; selected: after the episode cap and URL dedup; loaded:
    with bytes (inline, read from image_path, or fetched); decoded: bytes that
    decoded as an image, whether or not the size filters then accepted it;
    accepted: images; paired: images on a page with at least one other image;
    in_kept_pairs: images in at least one kept pair; kept_pairs: pairs written.
    """
    images = raw.get("images", 0)
    return {
        "read": raw.get("records_in", 0),
        "selected": raw.get("selected", raw.get("records_in", 0)),
        "loaded": raw.get("loaded", images),
        "decoded": images + sum(rejects.get(r, 0) for r in ("too_small", "bad_aspect")),
        "accepted": images,
        "paired": raw.get("paired_images", 0),
        "in_kept_pairs": raw.get("images_in_kept_pairs", 0),
        "kept_pairs": raw.get("kept_pairs", 0),
    }


def _format_of(table: str, pair_format: str, pair_options: dict[str, Any] | None):
    """Pairs use the chosen format; the other tables are always Parquet."""
    if table == "pairs":
        return pair_format, dict(pair_options or {})
    return "parquet", {}


def _tables(
    shards: list[dict[str, Any]],
    pair_format: str,
    pair_options: dict[str, Any] | None,
    ids: dict[str, str],
) -> dict[str, Any]:
    tables = {}
    for table in TABLES:
        mine = sorted((s for s in shards if s["table"] == table), key=lambda s: s["path"])
        fmt, options = _format_of(table, pair_format, pair_options)
        tables[table] = {
            "format": fmt,
            "options": options,
            "extension": get_writer(fmt, **options).extension,
            "schema": ids[table],
            "rows": sum(s["rows"] for s in mine),
            "bytes": sum(s["bytes"] for s in mine),
            "shards": [{k: s[k] for k in ("path", "rows", "bytes", "sha256")} for s in mine],
        }
    return tables


def load_manifest(run_dir: str) -> dict[str, Any]:
    """Read a run's manifest; a clear error if the directory holds no run."""
    from pairmill.errors import InputError

    fs, path = _fs(run_dir)
    target = f"{path}/{MANIFEST}"
    if not fs.exists(target):
        raise InputError(f"{run_dir} is not a pairmill run: no {MANIFEST}")
    with fs.open(target, "rb") as handle:
        return json.loads(handle.read())
