"""The per-shard cache: an entry is found only for the same bytes under the same salt, holds whole
files or nothing, and keep_only leaves one run's entries."""

from pipelines.core.shard_cache import ShardCache, code_sha256


def test_an_entry_is_reused_only_for_the_same_bytes_and_salt(tmp_path):
    shard = tmp_path / "part-00000.parquet"
    shard.write_bytes(b"rows")
    out = tmp_path / "work" / "analysed-00000.parquet"
    out.parent.mkdir()
    out.write_bytes(b"analysis")
    cache = ShardCache(tmp_path / "cache", salt="rules and code")
    key = cache.key(shard)
    assert cache.fetch(key, {"analysed.parquet": out}) is None
    cache.store(key, {"analysed.parquet": out}, {"rows": [1, 2]})
    out.unlink()
    assert cache.fetch(key, {"analysed.parquet": out}) == {"rows": [1, 2]} and out.read_bytes() == b"analysis"
    assert ShardCache(tmp_path / "cache", salt="other rules").key(shard) != key
    shard.write_bytes(b"rows, changed")
    assert cache.key(shard) != key


def test_keep_only_removes_other_entries_and_half_written_ones(tmp_path):
    cache = ShardCache(tmp_path, salt="s")
    source = tmp_path / "file"
    source.write_bytes(b"x")
    for key in ("a" * 64, "b" * 64):
        cache.store(key, {"f": source}, key)
    (tmp_path / f".{'c' * 64}.123.tmp").mkdir()  # a writer killed mid-store
    cache.keep_only(["a" * 64, "gone"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a" * 64, "file"]


def test_the_code_hash_is_stable():
    assert code_sha256() == code_sha256() and len(code_sha256()) == 64
