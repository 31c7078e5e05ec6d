"""Table sources are read without a copy outside DVC: the raw rows, secrets included, may live
only in data/raw (a DVC output, never pushed), not as an Arrow table under the user's Hugging Face
cache that nothing ever deletes. Run in a subprocess: datasets reads HF_* at import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "AKIA-ROW-SECRET-7f3e9"


def write_table(path: Path, rows: list[str]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": r, "n": i}) + "\n" for i, r in enumerate(rows)))
    elif path.suffix == ".csv":
        path.write_text("n,text\n" + "".join(f"{i},{r}\n" for i, r in enumerate(rows)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"n": list(range(len(rows))), "text": rows}), path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_table_source_leaves_nothing_in_the_hugging_face_cache(tmp_path, suffix):
    rows = [f"row {i} {SECRET}" for i in range(50)]
    table = tmp_path / f"rows{suffix}"
    write_table(table, rows)
    hf = tmp_path / "hf"
    env = {
        **os.environ,
        "HF_HOME": str(hf),
        "HF_DATASETS_CACHE": str(hf / "datasets"),
        "PYTHONPATH": str(ROOT),
    }
    script = (
        "import json, sys\n"
        "from pipelines.stages.ingest import collect_documents\n"
        "print(json.dumps([[r['path'], r['content'].decode()] for r in collect_documents(sys.argv[1])]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(table)], env=env, capture_output=True, text=True, check=True
    )
    records = json.loads(out.stdout)
    assert records == [[f"{table}#{i}", r] for i, r in enumerate(rows)]  # every row, in the table's order
    written = [p for p in hf.rglob("*") if p.is_file()] if hf.exists() else []
    assert not [p for p in written if p.suffix == ".arrow"]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
