import tracemalloc

import pytest

from pairmill.records import CrawlRecord
from pairmill.rejects import (
    BAD_PAGE_URL,
    CAPPED,
    DUPLICATE,
    EMPTY,
    FETCH_ERROR,
    FILE_TOO_LARGE,
    MISSING_FIELD,
)
from pairmill.selection import (
    SelectEpisodeImages,
    assign_episode,
    first_per_episode,
    load_bytes,
    selection_outcome,
)
from pairmill.urls import image_id


def record(row, page="https://a.example/p", url=None, data=b"x", path=None):
    r = CrawlRecord("crawl.parquet", row, page, url or f"https://cdn/{row}.jpg", data, path)
    return assign_episode(r)


def run_combiner(fn, elements, chunks=1):
    """Feed elements through `chunks` accumulators and merge them, as combiner lifting does."""
    accumulators = []
    for c in range(chunks):
        acc = fn.create_accumulator()
        for element in elements[c::chunks]:
            acc = fn.add_input(acc, element)
        accumulators.append(acc)
    return fn.extract_output(fn.merge_accumulators(accumulators))


def test_assign_episode_rejects_missing_and_bad_urls():
    assert assign_episode(CrawlRecord("f", 0, None, "u")).reason == MISSING_FIELD
    assert assign_episode(CrawlRecord("f", 0, "p", None)).reason == MISSING_FIELD
    assert assign_episode(CrawlRecord("f", 0, "no scheme", "u")).reason == BAD_PAGE_URL
    ok = assign_episode(CrawlRecord("f", 0, "HTTPS://A.example/p#x", "https://cdn/1.jpg"))
    assert ok.canonical_page_url == "https://a.example/p" and ok.episode_id and ok.image_id


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_cap_keeps_the_smallest_url_hashes_whatever_the_order(chunks):
    records = [record(i) for i in range(50)]
    elements = [(r.image_id, r.key) for r in records]
    selection = run_combiner(SelectEpisodeImages(10), elements, chunks)
    expected = sorted(records, key=lambda r: r.image_id)[:10]
    assert set(selection.winners) == {r.key for r in expected}
    assert selection.cutoff == expected[-1].image_id
    # every record is kept, capped or (here none) a duplicate
    outcomes = [selection_outcome(r, r.key in selection.winners, selection.cutoff) for r in records]
    assert sum(o is None for o in outcomes) == 10
    assert all(o.reason == CAPPED for o in outcomes if o is not None)


def test_url_duplicates_keep_the_first_record():
    records = [record(i, url="https://cdn/same.jpg") for i in range(5)] + [record(9)]
    selection = run_combiner(SelectEpisodeImages(64), [(r.image_id, r.key) for r in records], 2)
    assert selection.cutoff is None
    assert set(selection.winners) == {records[0].key, records[-1].key}
    outcome = selection_outcome(records[3], False, None)
    assert outcome.reason == DUPLICATE


def test_cap_counts_distinct_urls_not_records():
    # 1000 copies of one URL plus 3 other images: nothing is capped at cap 4.
    records = [record(i, url="https://cdn/spacer.gif") for i in range(1000)]
    records += [record(2000 + i) for i in range(3)]
    selection = run_combiner(SelectEpisodeImages(4), [(r.image_id, r.key) for r in records], 5)
    assert selection.cutoff is None and len(selection.winners) == 4


def test_hot_page_of_100k_images_is_capped_in_bounded_memory():
    fn = SelectEpisodeImages(64)
    ep = record(0).episode_id
    tracemalloc.start()
    acc = fn.create_accumulator()
    for i in range(100_000):
        acc = fn.add_input(acc, (image_id(ep, f"https://cdn/{i}.jpg"), ("f", i)))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    selection = fn.extract_output(acc)
    assert len(selection.winners) == 64 and selection.cutoff is not None
    assert peak < 2 * 2**20, f"accumulator grew to {peak} bytes"


def test_content_duplicates_keep_one_per_episode_in_image_id_order():
    a = [record(i, page="https://a.example/p") for i in range(3)]
    b = [record(10 + i, page="https://b.example/q") for i in range(2)]
    kept, duplicates = first_per_episode(a[::-1] + b)
    assert {r.episode_id for r in kept} == {a[0].episode_id, b[0].episode_id}
    assert len(duplicates) == 3
    assert min(a, key=lambda r: r.image_id) in kept


def test_load_bytes_reads_paths_and_hashes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    loaded = load_bytes(record(0, data=None, path=str(path)), max_bytes=100)
    assert loaded.image == b"hello" and len(loaded.content_sha256) == 64
    assert load_bytes(record(1, data=None, path=str(tmp_path / "missing")), 100).reason == (
        FETCH_ERROR
    )
    assert load_bytes(record(2, data=None, path=str(path)), max_bytes=3).reason == FILE_TOO_LARGE
    assert load_bytes(record(3, data=b""), 100).reason == EMPTY


def test_page_counter_stops_at_its_limit_whatever_the_merges():
    from pairmill.selection import CountPagesUpTo

    fn = CountPagesUpTo(11)
    accumulators = []
    for chunk in range(50):
        acc = fn.create_accumulator()
        for page in range(chunk * 1000, chunk * 1000 + 1000):
            acc = fn.add_input(acc, f"page{page}")
        assert len(acc) <= 11
        accumulators.append(acc)
    assert fn.extract_output(fn.merge_accumulators(accumulators)) == 11
    few = fn.add_input(fn.add_input(fn.create_accumulator(), "a"), "a")
    assert fn.extract_output(fn.merge_accumulators([few, {"b"}])) == 2
