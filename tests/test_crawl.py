import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pairmill.crawl import expand_inputs, list_splits, read_split
from pairmill.errors import InputError
from pairmill.rejects import MALFORMED


def read_all(path):
    out = []
    for split in list_splits(str(path)):
        out.extend(read_split(split))
    return out


def test_parquet_row_groups_become_splits_and_rows_keep_their_numbers(tmp_path, jpeg_of):
    data = jpeg_of("astronaut", (80, 80))
    rows = [
        {"page_url": f"https://p/{i}", "image_url": f"https://i/{i}", "image": data, "alt": str(i)}
        for i in range(10)
    ]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    splits = list_splits(str(path))
    assert len(splits) == 4 and [s.first_row for s in splits] == [0, 3, 6, 9]
    records = read_all(path)
    assert [r.row for r in records] == list(range(10))
    assert records[4].image == data and records[4].extra == {"alt": "4"}


def test_jsonl_with_base64_paths_and_bad_lines(tmp_path, jpeg_of):
    data = jpeg_of("coffee", (90, 60))
    (tmp_path / "img.jpg").write_bytes(data)
    lines = [
        json.dumps(
            {
                "page_url": "https://p",
                "image_url": "https://i/1",
                "image": base64.b64encode(data).decode(),
            }
        ),
        json.dumps({"page_url": "https://p", "image_url": "https://i/2", "image_path": "img.jpg"}),
        "{not json",
        "",
        json.dumps({"page_url": "https://p", "image_url": "https://i/3"}),
        json.dumps({"page_url": "https://p", "image_url": "https://i/4", "image": "!!notb64"}),
        json.dumps([1, 2]),
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = read_all(path)
    assert len(items) == 6  # the blank line is not a record
    assert items[0].image == data
    assert items[1].image_path == f"{tmp_path}/img.jpg"
    reasons = [item[1].reason for item in items if isinstance(item, tuple)]
    assert reasons == [MALFORMED, MALFORMED, MALFORMED]
    url_only = items[3]  # no bytes and no path: the pipeline fetches it by URL
    assert url_only.image is None and url_only.image_path is None


def test_csv_extra_columns_are_carried(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("page_url,image_url,image_path,alt\nhttps://p,https://i/1,a.jpg,a cat\n")
    (record,) = read_all(path)
    assert record.extra == {"alt": "a cat"} and record.image_path.endswith("/a.jpg")


def test_image_url_is_never_opened(tmp_path):
    # A crawl row naming a local file as its image URL must not make us read it: reading
    # leaves it URL-only, and the fetcher refuses every scheme but http(s)
    # (tests/test_fetch_pipeline.py checks it ends as disallowed_url).
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"page_url": "https://p", "image_url": "file:///etc/passwd"}))
    (record,) = read_all(path)
    assert record.image is None and record.image_path is None


def test_expand_inputs_globs_dirs_and_missing(tmp_path):
    for name in ("a.jsonl", "b.csv", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.rsplit("/", 1)[1] for p in expand_inputs([str(tmp_path)])] == ["a.jsonl", "b.csv"]
    assert len(expand_inputs([str(tmp_path / "*.jsonl")])) == 1
    with pytest.raises(InputError, match="input not found"):
        expand_inputs([str(tmp_path / "nope.parquet")])
    with pytest.raises(InputError, match="unsupported"):
        expand_inputs([str(tmp_path / "notes.txt")])
