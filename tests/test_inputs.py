"""Input formats beyond flat tables: documents (MMC4, OBELICS) and img2dataset output."""

import base64
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pairmill.crawl import detect_input_format, expand_inputs, list_splits, read_split
from pairmill.errors import ConfigError, InputError
from pairmill.rejects import FETCH_ERROR, MALFORMED, MISSING_FIELD, NO_IMAGE_DATA
from pipelines import build_pairs

SIZE = (120, 96)


def read_all(path, input_format="auto", page_column=None):
    out = []
    for split in list_splits(str(path), input_format, page_column):
        out.extend(read_split(split))
    return out


def split_items(items):
    """(records, {row: rejection}) with every (source, row) checked unique."""
    items = list(items)
    records = [i for i in items if not isinstance(i, tuple)]
    rejects = {i[0].row: i[1] for i in items if isinstance(i, tuple)}
    keys = [r.key for r in records] + [i[0].key for i in items if isinstance(i, tuple)]
    assert len(keys) == len(set(keys)), "(source, row) must be unique per input record"
    return records, rejects


def png_of(photos, name):
    buffer = io.BytesIO()
    Image.fromarray(dict(photos)[name]).resize(SIZE).save(buffer, format="PNG")
    return buffer.getvalue()


def save_images(directory, jpeg_of, names):
    (directory / "imgs").mkdir(exist_ok=True)
    for name in names:
        (directory / "imgs" / f"{name}.jpg").write_bytes(jpeg_of(name, SIZE))


def b64(data):
    return base64.b64encode(data).decode()


# Builders of each input format ------------------------------------------------------------


def write_mmc4(directory, jpeg_of, url_only=True):
    """MMC4 JSONL: 2 pages with images, a page without, a broken line, a page without url."""
    save_images(directory, jpeg_of, ["astronaut", "coffee", "rocket"])
    page_b = [{"raw_url": "https://cdn.example/b0.jpg", "image_path": "imgs/coffee.jpg"}]
    page_b.append(
        {"raw_url": "https://cdn.example/b1.jpg", "image_name": "b1.jpg"}
        if url_only
        else {"raw_url": "https://cdn.example/b1.jpg", "image_path": "imgs/rocket.jpg"}
    )
    lines = [
        {
            "url": "https://news.example/a",
            "image_info": [
                {
                    "raw_url": "https://cdn.example/a0.jpg",
                    "image_name": "a0.jpg",
                    "matched_text_index": 0,
                    "matched_sim": 0.31,
                    "image_path": "imgs/astronaut.jpg",
                },
                {
                    "raw_url": "https://cdn.example/a1.jpg",
                    "image_name": "a1.jpg",
                    "matched_text_index": 2,
                    "matched_sim": 0.27,
                    "image": b64(jpeg_of("chelsea", SIZE)),
                },
            ],
            "text_list": ["t0", "t1", "t2"],
            "similarity_matrix": [[0.31, 0.1], [0.2, 0.27]],
            "could_have_url_duplicate": 0,
        },
        {"url": "https://news.example/empty", "image_info": [], "text_list": ["no pictures"]},
        "{broken json",
        {"image_info": [{"raw_url": "https://cdn.example/x.jpg"}], "text_list": []},
        {"url": "https://news.example/b", "image_info": page_b, "text_list": ["b"]},
    ]
    path = directory / "docs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def write_obelics(directory, jpeg_of, url_only=True):
    """OBELICS Parquet (3 row groups): text slots, a text-only page, bad metadata, no url."""
    save_images(directory, jpeg_of, ["cat", "camera", "moon", "clock", "china"])

    def doc(images, texts, metadata, general):
        return {
            "images": images,
            "texts": texts,
            "metadata": metadata if isinstance(metadata, str) else json.dumps(metadata),
            "general_metadata": json.dumps(general),
        }

    slot_c = {"alt_text": "no local copy"} if url_only else {"image_path": "imgs/china.jpg"}
    docs = [
        doc(
            [None, "https://img.example/cat.jpg", None, "https://img.example/cam.jpg"]
            + ["https://img.example/c.jpg"],
            ["intro", None, "middle", None, None],
            [
                None,
                {"alt_text": "a cat", "src": "https://img.example/cat.jpg"}
                | {"image_path": "imgs/cat.jpg"},
                None,
                {"alt_text": "a camera", "image_path": "imgs/camera.jpg"},
                slot_c,
            ],
            {"url": "https://blog.example/post", "warc_filename": "x.warc.gz"},
        ),
        doc([None], ["just text"], [None], {"url": "https://blog.example/text"}),
        doc(["https://img.example/z.jpg"], [None], "not json{", {"url": "https://blog.example/z"}),
        doc(["https://img.example/d.jpg"], [None], [{"image_path": "imgs/moon.jpg"}], {}),
        doc(
            ["https://img.example/e.jpg", None, "https://img.example/f.jpg"],
            [None, "between", None],
            [{"image_path": "imgs/moon.jpg"}, None, {"image_path": "imgs/clock.jpg"}],
            {"url": "https://blog.example/two"},
        ),
    ]
    path = directory / "obelics.parquet"
    pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=2)
    return path


I2D_META = ("width", "height", "original_width", "original_height", "exif", "sha256")


def i2d_row(
    key, url, page, data, status="success", error=None, caption=None, page_column="page_url"
):
    row = {
        "url": url,
        "caption": caption or f"caption {key}",
        "key": key,
        "status": status,
        "error_message": error,
        **dict.fromkeys(I2D_META),
        page_column: page,
    }
    if data is not None:
        row.update(width=SIZE[0], height=SIZE[1], original_width=SIZE[0], original_height=SIZE[1])
    return row


def write_i2d_parquet(directory, jpeg_of, page_column="page_url"):
    """img2dataset --output_format parquet: 5 successes on 2 pages and 1 failed download."""
    directory.mkdir(exist_ok=True)
    rows = []
    for i, (name, page) in enumerate(
        [
            ("astronaut", "https://shop.example/1"),
            ("coins", "https://shop.example/1"),
            ("coffee", "https://shop.example/2"),
            (None, "https://shop.example/2"),
            ("rocket", "https://shop.example/2"),
            ("flower", "https://shop.example/2"),
        ]
    ):
        data = jpeg_of(name, SIZE) if name else None
        status, error = ("success", None) if name else ("failed_to_download", "HTTP Error 404")
        row = i2d_row(f"{i:09d}", f"https://img.example/{i}.jpg", page, data, status, error)
        row[page_column] = row.pop("page_url")
        rows.append({**row, "jpg": data})
    path = directory / "00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


def write_i2d_webdataset(directory, jpeg_of, photos):
    """img2dataset --output_format webdataset: a tar + its metadata parquet + stats."""
    directory.mkdir(exist_ok=True)
    samples = [
        ("astronaut", "jpg", "https://blog.example/1"),
        ("chelsea", "png", "https://blog.example/1"),
        ("coffee", "jpg", "https://blog.example/2"),
        (None, None, None),  # a broken .json
        ("rocket", "webp", "https://blog.example/2"),
    ]
    metas = []
    with tarfile.open(directory / "00000.tar", "w") as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, (name, ext, page) in enumerate(samples):
            key = f"{i:09d}"
            if name is None:
                add(f"{key}.jpg", jpeg_of("moon", SIZE))
                add(f"{key}.json", b'{"url": "https://img.example/broken"')
                continue
            if ext == "png":
                data = png_of(photos, name)
            elif ext == "webp":
                buffer = io.BytesIO()
                Image.fromarray(dict(photos)[name]).resize(SIZE).save(buffer, format="WEBP")
                data = buffer.getvalue()
            else:
                data = jpeg_of(name, SIZE)
            meta = i2d_row(key, f"https://img.example/{name}", page, data, page_column="webpage")
            metas.append(meta)
            add(f"{key}.{ext}", data)
            add(f"{key}.txt", meta["caption"].encode())
            add(f"{key}.json", json.dumps(meta, indent=4).encode())
    failed = i2d_row("000000005", "https://img.example/gone", "https://blog.example/2", None)
    metas.append(failed | {"status": "failed_to_download", "error_message": "timeout"})
    pq.write_table(pa.Table.from_pylist(metas), directory / "00000.parquet")
    (directory / "00000_stats.json").write_text(json.dumps({"count": 6}, indent=4))
    return directory / "00000.tar"


# Documents --------------------------------------------------------------------------------


def test_mmc4_jsonl_one_record_per_image_with_running_rows(tmp_path, jpeg_of):
    path = write_mmc4(tmp_path, jpeg_of)
    assert detect_input_format(str(path)) == "documents"
    records, rejects = split_items(read_all(path))
    # doc 0: rows 0-1; doc 1 has no images; docs 2 (bad JSON) and 3 (no url): rows 2, 3;
    # doc 4: rows 4-5 (row 5 has only a URL).
    assert sorted([r.row for r in records] + list(rejects)) == list(range(6))
    assert {row: r.reason for row, r in rejects.items() if r.reason == MALFORMED} == {
        2: MALFORMED,
        3: MALFORMED,
    }
    assert "document 2: invalid JSON" in rejects[2].detail and "no url" in rejects[3].detail
    first, second = records[0], records[1]
    assert (first.page_url, first.image_url) == (
        "https://news.example/a",
        "https://cdn.example/a0.jpg",
    )
    assert first.image_path == f"{tmp_path}/imgs/astronaut.jpg" and first.image is None
    assert second.image == jpeg_of("chelsea", SIZE)
    assert first.extra == {
        "image_name": "a0.jpg",
        "matched_text_index": 0,
        "matched_sim": 0.31,
        "could_have_url_duplicate": 0,
        "document": 0,
        "position": 0,
    }
    assert records[2].extra["document"] == 4 and records[2].extra["position"] == 0
    # An entry with only a URL has no bytes: it is left for fetching, or rejected here.
    if 5 in rejects:
        assert rejects[5].reason == NO_IMAGE_DATA
    else:
        (url_only,) = [r for r in records if r.row == 5]
        assert url_only.image is None and url_only.image_path is None


def test_obelics_parquet_is_one_split_and_skips_text_slots(tmp_path, jpeg_of):
    path = write_obelics(tmp_path, jpeg_of)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert detect_input_format(str(path)) == "documents"
    (split,) = list_splits(str(path))
    assert split.kind == "documents" and split.row_group == -1
    records, rejects = split_items(read_split(split))
    # doc 0: slots 1, 3, 4 -> rows 0-2; doc 1 text only; doc 2 bad metadata -> row 3;
    # doc 3 has no page url -> row 4; doc 4: slots 0 and 2 -> rows 5-6.
    assert sorted([r.row for r in records] + list(rejects)) == list(range(7))
    assert rejects[3].reason == MALFORMED and "metadata is not valid JSON" in rejects[3].detail
    assert rejects[4].reason == MALFORMED and "no page url" in rejects[4].detail
    by_row = {r.row: r for r in records}
    cat = by_row[0]
    assert (cat.page_url, cat.image_url) == (
        "https://blog.example/post",
        "https://img.example/cat.jpg",
    )
    assert cat.extra == {
        "alt_text": "a cat",
        "src": "https://img.example/cat.jpg",
        "document": 0,
        "position": 1,
    }
    assert cat.image_path == f"{tmp_path}/imgs/cat.jpg"
    assert by_row[1].extra["position"] == 3 and by_row[6].extra == {"document": 4, "position": 2}
    assert by_row[6].page_url == "https://blog.example/two"


def test_obelics_jsonl_with_embedded_images_and_parsed_metadata(tmp_path, jpeg_of):
    data = jpeg_of("coins", SIZE)
    doc = {
        "images": [{"bytes": b64(data), "path": None}, None],
        "texts": [None, "caption"],
        "metadata": [{"src": "https://img.example/coins.jpg", "alt_text": "coins"}, None],
        "general_metadata": {"url": "https://p.example/"},
    }
    path = tmp_path / "o.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    (record,) = read_all(path)
    assert record.image == data and record.image_url == "https://img.example/coins.jpg"
    assert record.extra["alt_text"] == "coins"


def test_a_document_that_is_neither_layout_is_one_malformed_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"page_url": "https://p", "image_url": "https://i"}) + "\n")
    (item,) = read_all(path, "documents")
    assert item[1].reason == MALFORMED and "neither image_info" in item[1].detail


# img2dataset ------------------------------------------------------------------------------


def test_img2dataset_parquet_successes_and_failed_downloads(tmp_path, jpeg_of):
    path = write_i2d_parquet(tmp_path / "i2d", jpeg_of)
    assert detect_input_format(str(path)) == "img2dataset"
    splits = list_splits(str(path))
    assert [s.first_row for s in splits] == [0, 4]  # split by row group, like tables
    records, rejects = split_items(read_all(path))
    assert [r.row for r in records] == [0, 1, 2, 4, 5]
    assert rejects[3].reason == FETCH_ERROR
    assert rejects[3].detail == "img2dataset failed_to_download: HTTP Error 404"
    first = records[0]
    assert first.image == jpeg_of("astronaut", SIZE)
    assert (first.page_url, first.image_url) == (
        "https://shop.example/1",
        "https://img.example/0.jpg",
    )
    assert first.extra["caption"] == "caption 000000000" and first.extra["key"] == "000000000"
    assert first.extra["width"] == SIZE[0]
    assert not {"jpg", "url", "status", "error_message", "page_url"} & set(first.extra)


def test_img2dataset_page_column_default_names_and_flag(tmp_path, jpeg_of):
    path = write_i2d_parquet(tmp_path / "i2d", jpeg_of, page_column="referrer")
    items = read_all(path)
    assert all(isinstance(i, tuple) and i[1].reason == MISSING_FIELD for i in items)
    assert items[0][1].detail.startswith("no page column") and "--page-column" in items[0][1].detail
    records, rejects = split_items(read_all(path, page_column="referrer"))
    assert len(records) == 5 and records[0].page_url == "https://shop.example/1"
    assert "referrer" not in records[0].extra and rejects[3].reason == FETCH_ERROR


def test_img2dataset_webdataset_tar(tmp_path, jpeg_of, photos):
    tar = write_i2d_webdataset(tmp_path / "wds", jpeg_of, photos)
    assert detect_input_format(str(tar)) == "img2dataset"
    (split,) = list_splits(str(tar))
    assert split.format == "tar"
    records, rejects = split_items(read_split(split))
    assert [r.row for r in records] == [0, 1, 2, 4] and list(rejects) == [3]
    assert (
        rejects[3].reason == MALFORMED and "000000003.json is not valid JSON" in rejects[3].detail
    )
    png = records[1]
    assert png.image == png_of(photos, "chelsea") and png.page_url == "https://blog.example/1"
    assert png.image_url == "https://img.example/chelsea"
    assert png.extra["caption"] == "caption 000000001" and png.extra["key"] == "000000001"
    assert "webpage" not in png.extra and "status" not in png.extra
    assert records[3].image[:4] == b"RIFF"  # the .webp member


def test_a_truncated_tar_keeps_its_whole_samples_and_rejects_the_rest(tmp_path, jpeg_of, photos):
    tar = write_i2d_webdataset(tmp_path / "wds", jpeg_of, photos)
    data = tar.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    records, rejects = split_items(read_all(cut))
    assert [r.row for r in records] == [0, 1, 2][: len(records)] and len(records) >= 2
    (last,) = [row for row, r in rejects.items() if "tar unreadable" in r.detail]
    assert last == max([r.row for r in records] + list(rejects))


def test_discovery_reads_tars_not_their_metadata_parquet_or_stats(tmp_path, jpeg_of, photos):
    write_i2d_webdataset(tmp_path / "wds", jpeg_of, photos)
    assert [p.rsplit("/", 1)[1] for p in expand_inputs([str(tmp_path / "wds")])] == ["00000.tar"]
    assert len(expand_inputs([str(tmp_path / "wds" / "*")], "img2dataset")) == 1
    # The metadata parquet alone (no image column) says where the images are.
    items = read_all(tmp_path / "wds" / "00000.parquet")
    hints = [i[1].detail for i in items if isinstance(i, tuple) and i[1].reason == NO_IMAGE_DATA]
    assert hints and all("give the .tar shards" in h for h in hints)


# Detection and flags ----------------------------------------------------------------------


def test_auto_detection_per_file_and_explicit_override(tmp_path, jpeg_of, photos):
    table = tmp_path / "t.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"page_url": "https://p", "image_url": "https://i"}]), table
    )
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"page_url": "https://p", "image_url": "https://i"}) + "\n")
    csv = tmp_path / "t.csv"
    csv.write_text("page_url,image_url\nhttps://p,https://i\n")
    kinds = {
        table: "table",
        jsonl: "table",
        csv: "table",
        write_mmc4(tmp_path, jpeg_of): "documents",
        write_obelics(tmp_path, jpeg_of): "documents",
        write_i2d_parquet(tmp_path / "i2d", jpeg_of): "img2dataset",
        write_i2d_webdataset(tmp_path / "wds", jpeg_of, photos): "img2dataset",
    }
    for path, kind in kinds.items():
        assert detect_input_format(str(path)) == kind, path
        assert {s.kind for s in list_splits(str(path))} == {kind}
    # --input-format table reads documents as rows (which then lack page_url/image_url).
    obelics = tmp_path / "obelics.parquet"
    assert {s.kind for s in list_splits(str(obelics), "table")} == {"table"}
    assert len(list_splits(str(obelics), "table")) == 3
    with pytest.raises(InputError, match="--input-format documents reads"):
        expand_inputs([str(csv)], "documents")
    with pytest.raises(InputError, match="--input-format table reads"):
        expand_inputs([str(tmp_path / "wds" / "00000.tar")], "table")


def test_input_format_flag_is_validated(tmp_path):
    argv = [str(tmp_path), "--out", str(tmp_path / "o"), "--encoder", "tiny"]
    config, _ = build_pairs.parse_known_args(argv + ["--input-format", "documents"])
    assert config.input_format == "documents" and config.page_column is None
    config, _ = build_pairs.parse_known_args(argv + ["--page-column", "referrer"])
    assert config.input_format == "auto" and config.page_column == "referrer"
    with pytest.raises(ConfigError, match="--input-format"):
        build_pairs.parse_known_args(argv + ["--input-format", "warc"])


# End to end -------------------------------------------------------------------------------


def build(inputs, out, *extra):
    argv = [*map(str, inputs), "--out", str(out), "--encoder", "tiny", "--device", "cpu"]
    argv += ["--low", "-1", "--high", "1", *extra]
    return build_pairs.run(argv).pairmill_manifest


def run_rows(run_dir, table):
    return pq.read_table(run_dir / table).to_pylist()


def check_reconciled(manifest, run_dir, records_in):
    counts = manifest["counts"]
    assert manifest["reconciled"]
    assert counts["records_in"] == records_in
    assert counts["records_in"] == counts["images"] + counts["rejected"]
    images, rejects = run_rows(run_dir, "images"), run_rows(run_dir, "rejects")
    keys = {(r["source"], r["row"]) for r in images} | {(r["source"], r["row"]) for r in rejects}
    assert len(keys) == records_in
    return images, rejects


def test_build_from_documents(tmp_path, jpeg_of):
    mmc4 = write_mmc4(tmp_path, jpeg_of, url_only=False)
    obelics = write_obelics(tmp_path, jpeg_of, url_only=False)
    manifest = build([mmc4, obelics], tmp_path / "run")
    # MMC4: 4 images + 2 malformed documents; OBELICS: 5 images + 2 malformed documents.
    images, rejects = check_reconciled(manifest, tmp_path / "run", 13)
    assert manifest["counts"]["rejects"] == {"malformed_record": 4}
    assert manifest["counts"]["images"] == 9
    # Pages of 2, 2, 3 and 2 decodable images: 1 + 1 + 3 + 1 candidate pairs, all in band.
    assert manifest["counts"]["candidate_pairs"] == manifest["counts"]["kept_pairs"] == 6
    pairs = run_rows(tmp_path / "run", "pairs")
    assert {p["page_url"] for p in pairs} == {
        "https://news.example/a",
        "https://news.example/b",
        "https://blog.example/post",
        "https://blog.example/two",
    }
    cat = next(i for i in images if i["url"] == "https://img.example/cat.jpg")
    assert json.loads(cat["extra"])["alt_text"] == "a cat"
    assert {r["reason"] for r in rejects} == {"malformed_record"}


def test_build_from_img2dataset_parquet_and_webdataset(tmp_path, jpeg_of, photos):
    write_i2d_parquet(tmp_path / "i2d", jpeg_of)
    write_i2d_webdataset(tmp_path / "wds", jpeg_of, photos)
    manifest = build([tmp_path / "i2d", tmp_path / "wds"], tmp_path / "run")
    # Parquet: 5 successes + 1 failed download; tar: 4 samples + 1 broken .json.
    images, rejects = check_reconciled(manifest, tmp_path / "run", 11)
    assert manifest["counts"]["rejects"] == {"fetch_error": 1, "malformed_record": 1}
    assert manifest["counts"]["images"] == 9
    # Pages of 2, 3, 2 and 2 images: 1 + 3 + 1 + 1 pairs.
    assert manifest["counts"]["kept_pairs"] == 6
    pages = {p["page_url"] for p in run_rows(tmp_path / "run", "pairs")}
    assert pages == {
        "https://shop.example/1",
        "https://shop.example/2",
        "https://blog.example/1",
        "https://blog.example/2",
    }
    assert {i["source"].rsplit("/", 1)[1] for i in images} == {"00000.parquet", "00000.tar"}
