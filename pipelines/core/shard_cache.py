"""Per-shard results kept from one run of a stage to the next, keyed by everything that makes them.

    cache = ShardCache(folder, salt)                 # salt: the settings and code the work depends on
    key = cache.key(shard)                           # the salt and the shard's bytes
    reused = cache.fetch(key, {"analysed.parquet": work / "analysed-00003.parquet"})
    if reused is None:
        ...                                          # do the work, write the files
        cache.store(key, {"analysed.parquet": work / "analysed-00003.parquet"}, value)
    cache.keep_only(keys_of_this_run)                # the cache holds one run's entries, no more

An entry is a folder named by its key: the files (hard links where the file system allows, so
storing costs no copy) and value.pickle. It is written under a temporary name and renamed, so a
killed writer leaves a whole entry or none, and two writers of one key keep the first. A key is
a sha256 of the salt and of the shard file, so an entry is only ever reused for the same bytes
under the same settings and code; whatever else changed, the key changes and the entry is not found.
"""

import hashlib
import os
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path

from pipelines.core.data import sha256_file

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the package `pipelines`
VALUE_FILE = "value.pickle"


def code_sha256() -> str:
    """Every .py file of the project's package, by path and content: any edit to the code changes
    it (more than the work depends on, never less)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _place(source: Path, target: Path) -> None:
    """target becomes a copy of source (a hard link where it can), replacing it whole."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class ShardCache:
    def __init__(self, folder: str | Path, salt: str):
        self.folder = Path(folder)
        self.salt = salt

    def key(self, shard: str | Path) -> str:
        return hashlib.sha256(f"{self.salt}\0{sha256_file(shard)}".encode()).hexdigest()

    def fetch(self, key: str, files: dict[str, Path]):
        """The stored value, with each stored file placed at its given path; None if no whole entry."""
        entry = self.folder / key
        try:
            value = pickle.loads((entry / VALUE_FILE).read_bytes())
            for name, target in files.items():
                _place(entry / name, target)
        except FileNotFoundError:  # not stored, or removed by keep_only meanwhile
            return None
        return value

    def store(self, key: str, files: dict[str, Path], value) -> None:
        entry = self.folder / key
        if entry.is_dir():
            return
        tmp = self.folder / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, source in files.items():
            _place(source, tmp / name)
        (tmp / VALUE_FILE).write_bytes(pickle.dumps(value))
        try:
            os.rename(tmp, entry)
        except OSError:  # another worker stored the same key first
            shutil.rmtree(tmp, ignore_errors=True)

    def keep_only(self, keys: Iterable[str]) -> None:
        """Remove every entry (and a killed writer's temporary folder) but those of keys."""
        keep = set(keys)
        if self.folder.is_dir():
            for entry in self.folder.iterdir():
                if entry.name not in keep:
                    shutil.rmtree(entry, ignore_errors=True)
