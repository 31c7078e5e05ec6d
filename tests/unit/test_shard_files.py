"""Shards: ingest cuts a source into Parquet shards of about data.shard_bytes, in path order, a
table's rows in their order; readers stream them back; a rewrite leaves no shard of the last run."""

import pyarrow.parquet as pq

from pipelines.core.params import load_params
from pipelines.core.shards import ShardWriter, iter_documents, list_shards, read_documents, shard_name
from pipelines.stages import ingest


def test_the_writer_cuts_shards_at_the_size_and_keeps_the_order(tmp_path):
    records = [{"path": f"f{i:03d}.py", "content": b"x" * 100} for i in range(25)]
    with ShardWriter(tmp_path, shard_bytes=1000) as shards:
        shards.extend(records)
    assert [p.name for p in list_shards(tmp_path)] == [shard_name(i) for i in range(3)]
    assert [pq.ParquetFile(p).metadata.num_rows for p in list_shards(tmp_path)] == [10, 10, 5]
    assert read_documents(tmp_path) == records
    assert [r["path"] for r in iter_documents(tmp_path, columns=["path"], batch_rows=3)] == [
        r["path"] for r in records
    ]
    with ShardWriter(tmp_path, shard_bytes=10_000) as shards:  # a rewrite with fewer shards
        shards.extend(records[:5])
    assert len(list_shards(tmp_path)) == 1 and read_documents(tmp_path) == records[:5]


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
