"""The build's Beam stages. Each is a `PTransform` named verb-noun; the logic it
runs per element lives in plain functions elsewhere (`crawl`, `selection`,
`images`, `pairing`, `rows`) so tests call it without Beam.

Stages that can reject return a dict of PCollections: the stage's output under
its own name and reject rows under ``"rejects"``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from pairmill import crawl, pairing, rows, selection, urls
from pairmill.records import CrawlRecord, reject_row
from pairmill.rejects import NO_IMAGE_DATA, Rejection

REJECTS = "rejects"
NAMESPACE = "pairmill"


def _reject(record: CrawlRecord, rejection: Rejection):
    Metrics.counter(NAMESPACE, f"rejected_{rejection.reason}").inc()
    return beam.pvalue.TaggedOutput(REJECTS, reject_row(record, rejection))


class _ReadSplit(beam.DoFn):
    def __init__(self):
        self.records_in = Metrics.counter(NAMESPACE, "records_in")

    def process(self, split: crawl.Split):
        for item in crawl.read_split(split):
            self.records_in.inc()
            if isinstance(item, tuple):
                yield _reject(*item)
            else:
                yield item


class ReadCrawl(beam.PTransform):
    """Crawl files -> one `CrawlRecord` per input row (+ rejects for unreadable rows).

    Args:
      files: crawl files already expanded by `crawl.expand_inputs`.
      input_format: auto, table, documents or img2dataset (`crawl.INPUT_FORMATS`).
      page_column: img2dataset's page URL column (None tries the usual names).
    """

    def __init__(
        self, files: list[str], input_format: str = "auto", page_column: str | None = None
    ):
        super().__init__()
        self.files = files
        self.input_format = input_format
        self.page_column = page_column

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self.files)
            | "Splits" >> beam.FlatMap(crawl.list_splits, self.input_format, self.page_column)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadSplit()).with_outputs(REJECTS, main="records")
        )


class _AssignEpisode(beam.DoFn):
    def process(self, record: CrawlRecord):
        result = selection.assign_episode(record)
        if isinstance(result, Rejection):
            yield _reject(record, result)
        else:
            yield result


class GroupIntoEpisodes(beam.PTransform):
    """Key records by episode, cap each episode, and drop URL duplicates.

    Hot-key safe: only (image id, record key) pairs reach the per-episode
    combiner, which holds at most `cap` of them; records are then joined to the
    decision by their own unique key.

    Args:
      cap: --max-images-per-episode.
    """

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def expand(self, records):
        keyed = records | "Key" >> beam.ParDo(_AssignEpisode()).with_outputs(
            REJECTS, main="records"
        )
        selections = (
            keyed.records
            | "Light" >> beam.Map(lambda r: (r.episode_id, (r.image_id, r.key)))
            | "Select" >> beam.CombinePerKey(_SelectCombineFn(self.cap))
        )
        winners = selections | "Winners" >> beam.FlatMap(
            lambda kv: ((key, True) for key in kv[1].winners)
        )
        cutoffs = (
            selections
            | "Overfull" >> beam.Filter(lambda kv: kv[1].cutoff is not None)
            | "Cutoffs" >> beam.Map(lambda kv: (kv[0], kv[1].cutoff))
        )
        by_key = keyed.records | "ByKey" >> beam.Map(lambda r: (r.key, r))
        decided = (
            {"record": by_key, "winner": winners}
            | "Join" >> beam.CoGroupByKey()
            | "Decide"
            >> beam.ParDo(_ApplySelection(), beam.pvalue.AsDict(cutoffs)).with_outputs(
                REJECTS, main="records"
            )
        )
        rejects = (keyed[REJECTS], decided[REJECTS]) | "Rejects" >> beam.Flatten()
        return {"records": decided.records, REJECTS: rejects}


class _SelectCombineFn(selection.SelectEpisodeImages, beam.CombineFn):
    """The plain selection logic as a Beam CombineFn (lifted: bounded per hot page)."""


class _ApplySelection(beam.DoFn):
    def process(self, element, cutoffs):
        _, joined = element
        is_winner = bool(list(joined["winner"]))
        for record in joined["record"]:
            rejection = selection.selection_outcome(
                record, is_winner, cutoffs.get(record.episode_id)
            )
            yield record if rejection is None else _reject(record, rejection)


class _LoadBytes(beam.DoFn):
    """Loads a batch of records: inline bytes pass, paths are read, URLs are fetched."""

    def __init__(self, max_bytes: int, fetch_config):
        self.max_bytes, self.fetch_config = max_bytes, fetch_config
        self.fetcher = None

    def setup(self):
        if self.fetch_config is not None:
            from pairmill.fetch import Fetcher

            self.fetcher = Fetcher(self.fetch_config)
        self.fetched = Metrics.counter(NAMESPACE, "fetched")

    def teardown(self):
        if self.fetcher is not None:
            self.fetcher.close()

    def process(self, batch: list[CrawlRecord]):
        to_fetch = []
        for record in batch:
            if record.image is None and record.image_path is None:
                to_fetch.append(record)
            else:
                yield self._hashed(record)
        if not to_fetch:
            return
        if self.fetcher is None:
            for record in to_fetch:
                yield _reject(
                    record, Rejection(NO_IMAGE_DATA, "no image bytes or path (--no-fetch)")
                )
            return
        # Consume every result: the fetcher yields each item exactly once, in any order.
        for index, result in self.fetcher.fetch(
            (i, record.image_url) for i, record in enumerate(to_fetch)
        ):
            record = to_fetch[index]
            if isinstance(result, Rejection):
                yield _reject(record, result)
            else:
                self.fetched.inc()
                record.image = result
                yield self._hashed(record)

    def _hashed(self, record: CrawlRecord):
        result = selection.load_bytes(record, self.max_bytes)
        return _reject(record.without_bytes(), result) if isinstance(result, Rejection) else result


class LoadImageBytes(beam.PTransform):
    """Give every record its bytes: inline bytes pass, `image_path` is read, and records
    with only an `image_url` are fetched over HTTP(S), concurrently per batch.

    Args:
      max_bytes: the largest file or body read.
      fetch_config: a `pairmill.fetch.FetchConfig`, or None to reject URL-only records.
    """

    def __init__(self, max_bytes: int, fetch_config=None):
        super().__init__()
        self.max_bytes, self.fetch_config = max_bytes, fetch_config

    def expand(self, records):
        return (
            records
            # Batches let one fetcher keep many hosts busy at once.
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=512)
            | "Load"
            >> beam.ParDo(_LoadBytes(self.max_bytes, self.fetch_config)).with_outputs(
                REJECTS, main="records"
            )
        )


class _CountPages(selection.CountPagesUpTo, beam.CombineFn):
    """Distinct pages per content hash, bounded (lifted: a logo on every page is cheap)."""


class _SplitBoilerplate(beam.DoFn):
    def __init__(self, max_pages: int):
        self.max_pages = max_pages

    def process(self, record: CrawlRecord, boilerplate: dict):
        if record.content_sha256 in boilerplate:
            yield _reject(record.without_bytes(), selection.boilerplate(self.max_pages))
        else:
            yield record


class DropBoilerplate(beam.PTransform):
    """Reject, everywhere, images whose bytes appear on more than `max_pages` pages.

    A combiner counts distinct pages per content hash (stopping at max_pages + 1,
    so memory stays bounded for a logo on millions of pages); the hashes over the
    limit reach every worker as a side input, and records are filtered against it
    before any grouping by content, so no group ever holds a boilerplate image's
    thousands of records.

    Args:
      max_pages: --max-pages-per-image.
    """

    def __init__(self, max_pages: int):
        super().__init__()
        self.max_pages = max_pages

    def expand(self, records):
        limit = self.max_pages
        over = (
            records
            | "ContentPage" >> beam.Map(lambda r: (r.content_sha256, r.episode_id))
            | "CountPages" >> beam.CombinePerKey(_CountPages(limit + 1))
            | "OverLimit" >> beam.Filter(lambda kv: kv[1] > limit)
        )
        return records | "Split" >> beam.ParDo(
            _SplitBoilerplate(limit), beam.pvalue.AsDict(over)
        ).with_outputs(REJECTS, main="records")


class _PickAny(beam.CombineFn):
    """Keeps one value per key: all values of a content hash are the same bytes."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, element):
        return element if accumulator is None else accumulator

    def merge_accumulators(self, accumulators):
        return next((a for a in accumulators if a is not None), None)

    def extract_output(self, accumulator):
        return accumulator


@dataclass
class DecodedContent:
    """One decoded unique content and the records (one per episode) that show it.

    Args:
      content_sha256: hash of the original bytes.
      decoded: the `images.DecodedImage` without its pixels.
      members: light records, one per episode.
    """

    content_sha256: str
    decoded: Any
    members: list[CrawlRecord]


class _DecodeContent(beam.DoFn):
    def __init__(self, decode_config, encoder: str):
        self.decode_config, self.encoder = decode_config, encoder

    def setup(self):
        from functools import partial

        from pairmill.encoders import get_preset, preprocess

        preset = get_preset(self.encoder)
        self.prepare = partial(preprocess, preset=preset)
        self.prepare_min_side = preset.resize_size
        self.decoded = Metrics.counter(NAMESPACE, "decoded_contents")

    def process(self, element):
        from dataclasses import replace

        from pairmill.images import decode_image

        content, joined = element
        data = next(iter(joined["bytes"]))
        kept, duplicates = selection.first_per_episode(joined["members"])
        kept_url = {record.episode_id: record.image_url for record in kept}
        for record in duplicates:
            yield _reject(record, selection.content_duplicate(kept_url[record.episode_id]))
        result = decode_image(
            data, self.decode_config, self.prepare, prepare_min_side=self.prepare_min_side
        )
        if isinstance(result, Rejection):
            for record in kept:
                yield _reject(record, result)
            return
        self.decoded.inc()
        pixels = result.pixels
        yield DecodedContent(content, replace(result, pixels=None), kept), pixels


class DecodeImages(beam.PTransform):
    """Drop same-content duplicates within a page and decode each unique content once.

    Bytes are deduplicated by a combiner (one copy per content hash, whatever
    the number of pages showing it); light records are grouped beside them.
    Output: (DecodedContent, encoder input pixels) for `EmbedImages`.

    Args:
      decode_config: `images.DecodeConfig`.
      encoder: preset name (for its preprocessing).
    """

    def __init__(self, decode_config, encoder: str):
        super().__init__()
        self.decode_config, self.encoder = decode_config, encoder

    def expand(self, records):
        data = (
            records
            | "Bytes" >> beam.Map(lambda r: (r.content_sha256, r.image))
            | "OneCopy" >> beam.CombinePerKey(_PickAny())
        )
        members = records | "Members" >> beam.Map(lambda r: (r.content_sha256, r.without_bytes()))
        return (
            {"bytes": data, "members": members}
            | "Group" >> beam.CoGroupByKey()
            | "Decode"
            >> beam.ParDo(_DecodeContent(self.decode_config, self.encoder)).with_outputs(
                REJECTS, main="decoded"
            )
        )


class _ExpandMembers(beam.DoFn):
    def __init__(self, encoder: str):
        self.encoder = encoder
        self.images = Metrics.counter(NAMESPACE, "images")

    def process(self, element):
        content, prediction = element
        embedding, tokens = prediction if isinstance(prediction, tuple) else (prediction, None)
        vector = np.asarray(embedding, dtype=np.float32)
        # Once per content, not once per page showing it.
        as_list = vector.tolist()
        stored_sha256 = hashlib.sha256(content.decoded.data).hexdigest()
        token_fields = rows.token_fields(tokens) if tokens is not None else None
        for record in content.members:
            self.images.inc()
            row = rows.image_row(record, content.decoded, as_list, stored_sha256, token_fields)
            yield beam.pvalue.TaggedOutput("light", (record.episode_id, (record.image_id, vector)))
            yield record.episode_id, row


class EmbedImages(beam.PTransform):
    """Embed each decoded content once (batched `RunInference`) and give every
    record its image row.

    Output: {"images": (episode_id, image row), "light": (episode_id, (image_id, embedding))}.

    Args:
      handler: an `EncoderModelHandler`.
      encoder: preset name recorded in the rows.
    """

    def __init__(self, handler, encoder: str):
        super().__init__()
        self.handler, self.encoder = handler, encoder

    def expand(self, decoded):
        embedded = decoded | "Encode" >> RunInference(KeyedModelHandler(self.handler))
        return embedded | "Rows" >> beam.ParDo(_ExpandMembers(self.encoder)).with_outputs(
            "light", main="images"
        )


class _PairEpisode(beam.DoFn):
    def __init__(self, low: float, high: float, max_pairs: int | None):
        self.low, self.high, self.max_pairs = low, high, max_pairs
        self.candidates = Metrics.counter(NAMESPACE, "candidate_pairs")
        self.kept = Metrics.counter(NAMESPACE, "kept_pairs")

    def process(self, element):
        episode, images = element
        images = list(images)
        in_kept_pairs = set()
        for candidate in pairing.pair_episode(episode, images, self.low, self.high, self.max_pairs):
            self.candidates.inc()
            yield pairing.similarity_row(candidate)
            if candidate.kept:
                self.kept.inc()
                in_kept_pairs.update((candidate.cond_image_id, candidate.target_image_id))
                yield beam.pvalue.TaggedOutput("pairs", (episode, candidate))
        # The funnel's episode-level counts, as (name, n) for the run report.
        yield beam.pvalue.TaggedOutput("stats", ("episodes", 1))
        if len(images) >= 2:
            yield beam.pvalue.TaggedOutput("stats", ("paired_images", len(images)))
        if in_kept_pairs:
            yield beam.pvalue.TaggedOutput("stats", ("images_in_kept_pairs", len(in_kept_pairs)))


class PairWithinEpisodes(beam.PTransform):
    """Group light values (ids and embeddings, never bytes) per episode and pair them.

    Output: {"similarities": rows, "pairs": (episode_id, Candidate), "stats": (name, n)
    counts per episode: episodes, paired_images (in episodes of two or more),
    images_in_kept_pairs}.

    Args:
      low, high: the similarity band.
      max_pairs: --max-pairs-per-episode.
    """

    def __init__(self, low: float, high: float, max_pairs: int | None):
        super().__init__()
        self.low, self.high, self.max_pairs = low, high, max_pairs

    def expand(self, light):
        return (
            light
            | "Group" >> beam.GroupByKey()
            | "Pair"
            >> beam.ParDo(_PairEpisode(self.low, self.high, self.max_pairs)).with_outputs(
                "pairs", "stats", main="similarities"
            )
        )


class _WritePairShard(beam.DoFn):
    def __init__(self, out, schema_id, fmt, encoder, options):
        self.out, self.schema_id, self.fmt = out, schema_id, fmt
        self.encoder, self.options = encoder, options

    def process(self, element, plan):
        import schemas
        from pairmill.shards import episode_pair_rows, write_shard

        index, groups = element
        pair_rows = [row for group in groups for row in episode_pair_rows(*group, self.encoder)]
        pair_rows.sort(key=lambda row: _sort_key(row, "pair_id"))
        schema = schemas.load(self.schema_id)
        info = write_shard(
            self.out, "pairs", index, plan, pair_rows, schema, self.fmt, self.options
        )
        yield info.to_dict()


class WritePairShards(beam.PTransform):
    """Write the pairs table from image rows and kept candidates; output: shard infos.

    No pair row is ever shuffled: each episode goes to one shard (a hash of its episode
    id), carrying the image rows in its kept pairs (each image's bytes once, not once per
    pair it is in) and its kept candidates; the shard's writer builds the pair rows
    (`rows.pair_row`), sorts them by pair id and writes them, so the same input gives the
    same files. The shard count follows the table's size as in `WriteShards`, planned from
    light values only (per image the bytes a pair row copies from it, per pair its ids), so
    rows holding image bytes never wait on a total computed from themselves. Shards hold
    whole episodes: --shard-size-mb and --shard-rows are targets that one large episode
    alone can exceed, and a shard no episode hashes to is not written (as in `WriteShards`).

    Input: (image rows, (episode_id, kept `Candidate`)).

    Args:
      out: the run directory.
      schema_id: ``pair_v1``, or ``pair_v2`` when the image rows carry tokens.
      fmt: writer format.
      encoder: preset name written into each row.
      shard_rows, shard_size_mb: sizing targets.
      options: writer options (e.g. ``{"compression": "gzip"}`` for TFRecord).
    """

    def __init__(self, out, schema_id, fmt, encoder, shard_rows, shard_size_mb, options=None):
        super().__init__()
        self.out, self.schema_id, self.fmt, self.encoder = out, schema_id, fmt, encoder
        self.shard_rows, self.shard_size_mb = shard_rows, shard_size_mb
        self.options = dict(options or {})

    def expand(self, inputs):
        from pairmill.shards import episode_pair_plan, pair_side_sizes, shard_count, shard_index

        images, kept = inputs
        encoder, shard_rows, shard_size_mb = self.encoder, self.shard_rows, self.shard_size_mb
        sizes = images | "Sizes" >> beam.Map(
            lambda row: (row["episode_id"], (row["image_id"], pair_side_sizes(row)))
        )
        plan = (
            {"sizes": sizes, "pairs": kept}
            | "PlanGroup" >> beam.CoGroupByKey()
            | "EpisodeSize"
            >> beam.Map(lambda kv: episode_pair_plan(kv[1]["sizes"], kv[1]["pairs"], encoder))
            | "Total" >> beam.CombineGlobally(_SumPairs())
            | "Plan" >> beam.Map(lambda t: shard_count(t[0], t[1], shard_rows, shard_size_mb))
        )
        keyed = images | "ByEpisode" >> beam.Map(lambda row: (row["episode_id"], row))
        groups = (
            {"images": keyed, "pairs": kept}
            | "Group" >> beam.CoGroupByKey()
            | "Episodes" >> beam.FlatMap(_episode_group)
            | "Assign"
            >> beam.Map(lambda kv, n: (shard_index(kv[0], n), kv[1]), beam.pvalue.AsSingleton(plan))
        )
        return (
            groups
            | "ToShards" >> beam.GroupByKey()
            | "Write"
            >> beam.ParDo(
                _WritePairShard(self.out, self.schema_id, self.fmt, self.encoder, self.options),
                beam.pvalue.AsSingleton(plan),
            )
        )


def _episode_group(element):
    from pairmill.shards import episode_pair_group

    episode, joined = element
    group = episode_pair_group(joined["images"], joined["pairs"])
    if group is not None:
        yield episode, group


class _WriteShard(beam.DoFn):
    def __init__(self, out, table, schema_id, fmt, id_field, options):
        self.out, self.table, self.schema_id = out, table, schema_id
        self.fmt, self.id_field, self.options = fmt, id_field, options

    def process(self, element, plan):
        import schemas
        from pairmill.shards import write_shard

        index, shard_rows = element
        ordered = sorted(shard_rows, key=lambda row: _sort_key(row, self.id_field))
        schema = schemas.load(self.schema_id)
        info = write_shard(
            self.out, self.table, index, plan, ordered, schema, self.fmt, self.options
        )
        yield info.to_dict()


def _sort_key(row: dict, id_field: str):
    return (row.get(id_field) or "", row.get("source") or "", row.get("row") or 0)


class WriteShards(beam.PTransform):
    """Write one table as `<table>/<table>-00000-of-0000N.<ext>`; output: shard infos.

    Rows go to shards by a hash of `id_field` and are sorted within a shard, so
    the same rows give the same files. The shard count follows the table's size.

    Args:
      out: the run directory.
      table: pairs, images, similarities or rejects.
      schema_id: e.g. ``pair_v1``.
      fmt: writer format.
      id_field: the row id used for sharding and ordering.
      shard_rows, shard_size_mb: sizing targets.
      options: writer options (e.g. ``{"compression": "gzip"}`` for TFRecord).
    """

    def __init__(
        self, out, table, schema_id, fmt, id_field, shard_rows, shard_size_mb, options=None
    ):
        super().__init__()
        self.out, self.table, self.schema_id, self.fmt = out, table, schema_id, fmt
        self.id_field, self.shard_rows, self.shard_size_mb = id_field, shard_rows, shard_size_mb
        self.options = dict(options or {})

    def expand(self, table_rows):
        from pairmill.shards import row_size, shard_count, shard_index

        shard_rows, shard_size_mb, id_field = self.shard_rows, self.shard_size_mb, self.id_field
        plan = (
            table_rows
            | "Size" >> beam.Map(lambda row: (1, row_size(row)))
            | "Total" >> beam.CombineGlobally(_SumPairs())
            | "Plan" >> beam.Map(lambda t: shard_count(t[0], t[1], shard_rows, shard_size_mb))
        )
        return (
            table_rows
            | "Assign"
            >> beam.Map(
                lambda row, n: (shard_index(_row_id(row, id_field), n), row),
                beam.pvalue.AsSingleton(plan),
            )
            | "Group" >> beam.GroupByKey()
            | "Write"
            >> beam.ParDo(
                _WriteShard(
                    self.out, self.table, self.schema_id, self.fmt, self.id_field, self.options
                ),
                beam.pvalue.AsSingleton(plan),
            )
        )


def _row_id(row: dict, id_field: str) -> str:
    value = row.get(id_field)
    return value if value else f"{row.get('source')}#{row.get('row')}"


class _SumPairs(beam.CombineFn):
    def create_accumulator(self):
        return (0, 0)

    def add_input(self, acc, element):
        return (acc[0] + element[0], acc[1] + element[1])

    def merge_accumulators(self, accumulators):
        return tuple(map(sum, zip(*accumulators, strict=False))) if accumulators else (0, 0)

    def extract_output(self, acc):
        return acc


class ReadRunTable(beam.PTransform):
    """Rows of one table of an earlier run, read by Parquet row group.

    Args:
      urls: the table's shard files (from that run's manifest).
    """

    def __init__(self, urls: list[str]):
        super().__init__()
        self.urls = urls

    def expand(self, pbegin):
        return (
            pbegin
            | "Shards" >> beam.Create(self.urls)
            | "RowGroups" >> beam.FlatMap(rows.table_splits)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(rows.read_table_split)
        )


class WriteRun(beam.PTransform):
    """Write a run's four tables as shards plus the report the driver turns into the manifest.

    Input: a dict with "images", "similarities" and "rejects" (row dicts), "kept_pairs"
    ((episode_id, kept `Candidate`): the pairs table is built from them and the image
    rows by `WritePairShards`) and "counts" ((name, n) tuples for what the tables cannot
    tell: records_in, unique_images, episodes). Rows per table, kept pairs and rejects per
    reason are counted here.

    Args:
      out: the run directory.
      pair_format, pair_options: the pair shard writer and its options.
      shard_rows, shard_size_mb: sizing targets.
      schema_ids: table -> schema id (`BuildConfig.schema_ids`); default the v1 tables.
      encoder: preset name written into each pair row.
    """

    ID_FIELDS = (
        ("images", "image_id"),
        ("similarities", "pair_id"),
        ("rejects", "reject_id"),
    )

    def __init__(
        self,
        out,
        pair_format,
        pair_options,
        shard_rows,
        shard_size_mb,
        schema_ids=None,
        *,
        encoder: str,
    ):
        super().__init__()
        from pairmill.config import schema_ids as default_ids

        self.out, self.pair_format, self.pair_options = out.rstrip("/"), pair_format, pair_options
        self.shard_rows, self.shard_size_mb = shard_rows, shard_size_mb
        self.schema_ids = schema_ids or default_ids(False)
        self.encoder = encoder

    def expand(self, tables):
        shards = [
            (tables["images"], tables["kept_pairs"])
            | "WritePairs"
            >> WritePairShards(
                self.out,
                self.schema_ids["pairs"],
                self.pair_format,
                self.encoder,
                self.shard_rows,
                self.shard_size_mb,
                self.pair_options,
            )
        ]
        for table, id_field in self.ID_FIELDS:
            shards.append(
                tables[table]
                | f"Write{table.title()}"
                >> WriteShards(
                    self.out,
                    table,
                    self.schema_ids[table],
                    "parquet",
                    id_field,
                    self.shard_rows,
                    self.shard_size_mb,
                )
            )
        counts = (
            tables["counts"],
            tables["rejects"] | "CountRejects" >> beam.Map(lambda r: (f"rejects.{r['reason']}", 1)),
            tables["images"] | "CountImages" >> beam.Map(lambda _: ("images", 1)),
            tables["similarities"]
            | "CountCandidates" >> beam.Map(lambda _: ("candidate_pairs", 1)),
            tables["kept_pairs"] | "CountKept" >> beam.Map(lambda _: ("kept_pairs", 1)),
        ) | "AllCounts" >> beam.Flatten()
        all_shards = tuple(shards) | "AllShards" >> beam.Flatten()
        top_domains = (
            tables["rejects"]
            | "RejectDomain" >> beam.Map(lambda r: urls.domain(r["page_url"] or "") or "(none)")
            | "PerDomain" >> beam.combiners.Count.PerElement()
            | "TopDomains" >> beam.combiners.Top.Of(10, key=lambda kv: (kv[1], kv[0]))
            | "Named" >> beam.Map(lambda top: ("top_reject_domains", [list(kv) for kv in top]))
        )
        return (all_shards, counts, top_domains) | "WriteReport" >> WriteReport(
            f"{self.out}/{rows.REPORT_NAME}"
        )


class WriteReport(beam.PTransform):
    """Collect shard infos, counts and small named lists into one JSON file for the driver.

    Input: (shard infos, (name, n) counts[, (name, list) values ...]).

    Args:
      url: where to write it (inside the run directory).
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url

    def expand(self, inputs):
        shards, counts, *lists = inputs
        tagged_shards = shards | "TagShards" >> beam.Map(lambda info: ("shard", info))
        tagged_lists = [
            pc | f"TagList{i}" >> beam.Map(lambda named: ("list", named))
            for i, pc in enumerate(lists)
        ]
        tagged_counts = (
            counts
            | "SumCounts" >> beam.CombinePerKey(sum)
            | "TagCounts" >> beam.Map(lambda kv: ("count", kv))
        )
        url = self.url
        return (
            (tagged_shards, tagged_counts, *tagged_lists)
            | "Merge" >> beam.Flatten()
            | "All" >> beam.combiners.ToList()
            | "Write" >> beam.Map(lambda items: rows.write_report(url, items))
        )
