"""Shards: ingest cuts a source into Parquet shards of data.shard_bytes on average, in path order, a
table's rows in their order; readers stream them back; a rewrite leaves no shard of the last run."""

import hashlib

import pyarrow.parquet as pq

from pipelines.core.params import load_params
from pipelines.core.shards import (
    MAX_SHARD_FACTOR,
    ShardWriter,
    ends_shard,
    iter_documents,
    list_shards,
    read_documents,
    shard_name,
)
from pipelines.stages import ingest


def test_the_writer_cuts_shards_where_the_documents_draw_and_keeps_the_order(tmp_path):
    records = [{"path": f"f{i:03d}.py", "content": b"x" * 100} for i in range(250)]
    with ShardWriter(tmp_path, shard_bytes=1000) as shards:
        shards.extend(records)
    sizes = [pq.ParquetFile(p).metadata.num_rows * 100 for p in list_shards(tmp_path)]
    assert [p.name for p in list_shards(tmp_path)] == [shard_name(i) for i in range(len(sizes))]
    assert 12 <= len(sizes) <= 50 and max(sizes) <= MAX_SHARD_FACTOR * 1000  # 25 on average
    # each shard ends at a document that draws an end, or at the cap
    ends, row = [], 0
    for size in sizes[:-1]:
        row += size // 100
        ends.append(row - 1)
    assert all(ends_shard(records[i]["path"], 100, 1000) or sizes[n] == 3000 for n, i in enumerate(ends))
    assert read_documents(tmp_path) == records
    assert [r["path"] for r in iter_documents(tmp_path, columns=["path"], batch_rows=3)] == [
        r["path"] for r in records
    ]
    with ShardWriter(tmp_path, shard_bytes=100_000) as shards:  # a rewrite with fewer shards
        shards.extend(records[:5])
    assert len(list_shards(tmp_path)) == 1 and read_documents(tmp_path) == records[:5]


def test_a_changed_document_leaves_the_other_shards_byte_for_byte_as_they_were(tmp_path):
    """The boundaries come from each document's own draw: a file that grows, one added and one
    removed rewrite their own shards only, and curate reuses its analysis of the rest."""
    records = [{"path": f"m{i:03d}.py", "content": f"v = {i}\n".encode() * (10 + i % 7)} for i in range(400)]

    def shard_hashes(recs, folder):
        with ShardWriter(folder, shard_bytes=2000) as shards:
            shards.extend(recs)
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in list_shards(folder)]

    before = shard_hashes(records, tmp_path / "a")
    changed = list(records)
    changed[100] = {**changed[100], "content": changed[100]["content"] * 3}
    changed.insert(250, {"path": "m250a.py", "content": b"w = 1\n" * 20})
    del changed[320]
    after = shard_hashes(changed, tmp_path / "b")
    assert len(before) >= 15
    assert len(set(after) - set(before)) <= 6, "each change rewrites its own shards, two at most"


def test_ingest_streams_a_folder_into_shards_in_path_order(tmp_path):
    src = tmp_path / "src"
    for i in range(30):
        (src / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 3}" / f"mod_{i:02d}.py").write_text(f"x = {i}\n" * 200)
    params = load_params(
        tmp_path / "none.yaml",
        overrides=[f"data.source={src}", f"data.raw_dir={tmp_path / 'raw'}", "data.shard_bytes=5000"],
    )
    summary = ingest.run(params)
    paths = [r["path"] for r in iter_documents(tmp_path / "raw", columns=["path"])]
    assert paths == sorted(paths) and len(paths) == 30
    assert summary["shards"] == len(list_shards(tmp_path / "raw")) > 3
    params = params.model_copy(update={"data": params.data.model_copy(update={"max_documents": 7})})
    assert ingest.run(params)["documents"] == 7
    assert [r["path"] for r in iter_documents(tmp_path / "raw", columns=["path"])] == paths[:7]


def test_a_table_is_read_in_batches_in_row_order(tmp_path, monkeypatch):
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(25)))
    monkeypatch.setattr(ingest, "TABLE_BATCH_ROWS", 4)
    rows = list(ingest.iter_table_rows(table, "text"))
    assert [r["content"] for r in rows] == [f"row {i}".encode() for i in range(25)]
    assert [r["path"] for r in rows] == [f"{table}#{i}" for i in range(25)]
