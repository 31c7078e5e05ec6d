"""What every tier shares: a fresh project (a clone-like copy with small params), a real MLflow
registry on SQLite in tmp_path, a tiny model dir, a free loopback port, and stopping a server's
whole process group."""

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines
from pipelines.core.code_scope import own_code_scope
from pipelines.core.data import EOT, TOKENIZER_FILE, write_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "e2e-model"
# A small project's params: a slice of the stdlib, a tiny model, minutes on 2 cores.
SMALL = [
    "data.max_documents=150",
    "curate.gate.min_documents=20",
    "curate.gate.min_bytes=100000",
    "tokenize.vocab_size=400",
    "tokenize.val_fraction=0.1",
    "train.max_steps=60",
    "train.batch_size=8",
    "train.block_size=64",
    "train.n_layer=2",
    "train.n_head=2",
    "train.n_embd=64",
    "train.checkpoint_every=20",
    "train.warmup_steps=10",
    "train.compile=off",  # auto compiles on a CPU: 10-50 s of inductor per training, not what these test
    "evaluate.max_tokens=20000",
    "evaluate.sample_tokens=16",
    f"publish.model_name={MODEL}",
]


def load_pyfunc(model_uri: str, **kwargs):
    """mlflow.pyfunc.load_model in this process, as the endpoint loads a version: in a code scope of
    its own. MLflow's loader leaves the version's code dir (a `pipelines` package of the inference
    modules only) first on sys.path; a later stage in this test process would then spawn workers
    that import half the project from it."""
    import mlflow

    with own_code_scope():
        return mlflow.pyfunc.load_model(model_uri, **kwargs)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    """No test may leave another `pipelines` package on sys.path (see load_pyfunc): the test files
    that run after it on the same xdist worker would fail in ways that point elsewhere."""
    checkout = Path(pipelines.__file__).resolve().parents[1]
    foreign = [p for p in sys.path if p and Path(p, "pipelines").is_dir() and Path(p).resolve() != checkout]
    if foreign:
        sys.path[:] = [p for p in sys.path if p not in foreign]
        pytest.fail(f"{item.nodeid} left {foreign} on sys.path: load models with conftest.load_pyfunc")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a server started with start_new_session=True and everything it started (MLflow's
    server runs uvicorn through a shell): SIGTERM to the group, SIGKILL if it outlives timeout_s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tracked_copy(proj: Path, overrides: list[str]) -> Path:
    """This project's git-tracked files (tests aside) as a fresh git repository with one commit
    and `overrides` written into params.yaml: what a clone of the project would be."""
    repo = REPO
    files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        if not name.startswith("tests/"):
            (proj / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, proj / name)
    from pipelines.core.params import save_overrides

    save_overrides(proj / "params.yaml", overrides)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        subprocess.run(["git", *args], cwd=proj, check=True)
    return proj


SNIPPETS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import os\n\n\ndef list_files(path):\n    return sorted(os.listdir(path))\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "with open('data.txt') as fh:\n    lines = [line.strip() for line in fh]\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
]


def make_model_dir(
    path: str | Path,
    seed: int = 0,
    block_size: int = 32,
    n_layer: int = 1,
    n_embd: int = 32,
    eot: bool = True,
) -> Path:
    """Write a tiny untrained model dir as the train stage does: weights, config.json, tokenizer.json.
    eot=False leaves the end-of-text token out: every completion then runs to max_new_tokens."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipelines.core.model import GPT, GPTConfig
    from pipelines.core.model_dir import save_model_dir

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOT] if eot else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SNIPPETS * 4, trainer)
    tok.save(str(path / TOKENIZER_FILE))
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=tok.get_vocab_size(), block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd
    )
    save_model_dir(path, GPT(config))
    return path


# The documents write_metrics says were scored: 12 of unequal length, the same in every call
METRICS_DOC_BYTES = [100 + 50 * i for i in range(12)]


def write_metrics(
    reports_dir: str | Path,
    val_bits_per_byte: float,
    val_set_sha256: str = "a" * 64,
    model_dir: str | Path | None = None,
    doc_bits_per_byte: list[float] | None = None,
    memorized_secrets: int = 0,
    spans_sha256: str | None = None,
) -> Path:
    """A metrics.json and evaluation.json as the evaluate stage writes them, for the weights in
    model_dir (default: the models/ folder beside reports_dir), with the score key of an uncapped fp32 score; and its
    per_document.json. Each document scores val_bits_per_byte, or doc_bits_per_byte[i]; the
    total is then what these add up to. Two models written with flat scores differ by the same
    amount on every document: a bootstrap interval of zero width at the difference. The
    memorization check found memorized_secrets of 10 (email), in the spans file of sha256
    spans_sha256 (None: no spans file)."""
    from pipelines.core.data import read_json, sha256_file
    from pipelines.stages.evaluate import EVALUATION_FILE, PER_DOCUMENT_FILE, score_key, scoring_code_sha256

    model_dir = Path(model_dir) if model_dir else Path(reports_dir).parent / "models"
    settings = {
        "val_set_sha256": val_set_sha256,
        "score_max_tokens": None,
        "score_context": read_json(model_dir / "config.json")["block_size"],
        "score_bf16": False,
        "scoring_code_sha256": scoring_code_sha256(),
    }
    rates = doc_bits_per_byte or [val_bits_per_byte] * len(METRICS_DOC_BYTES)
    documents = [
        {"path": f"pkg/mod{i}.py", "sha256": f"{i:064x}", "bits": rate * n, "bytes": n}
        for i, (rate, n) in enumerate(zip(rates, METRICS_DOC_BYTES, strict=True))
    ]
    if doc_bits_per_byte:
        val_bits_per_byte = sum(d["bits"] for d in documents) / sum(METRICS_DOC_BYTES)
    weights_sha = sha256_file(model_dir / "model.safetensors")
    path = Path(reports_dir) / "metrics.json"
    write_json(
        path,
        {
            "val_bits_per_byte": val_bits_per_byte,
            "xz_bits_per_byte": 1.79,
            "gzip_bits_per_byte": 1.87,
            "val_documents": len(METRICS_DOC_BYTES),
            "val_bytes": sum(METRICS_DOC_BYTES),
            "memorized_secrets": memorized_secrets,
            "memorization_checked": 10,
        },
    )
    write_json(
        Path(reports_dir) / EVALUATION_FILE,
        {
            "weights_sha256": weights_sha,
            **settings,
            "score_key": score_key(settings),
            "val_loss": val_bits_per_byte * 2.5,
            "memorization_spans_sha256": spans_sha256,
        },
    )
    write_json(
        Path(reports_dir) / "memorization.json",
        {
            "weights_sha256": weights_sha,
            "memorized_secrets": memorized_secrets,
            "checked_secrets": 10,
            "per_kind": {"email": {"checked": 10, "memorized": memorized_secrets}},
        },
    )
    write_json(
        Path(reports_dir) / PER_DOCUMENT_FILE,
        {"weights_sha256": weights_sha, "score_key": score_key(settings), "documents": documents},
    )
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path / "models")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An MLflow SQLite DB with its migrations already run (~5 s), made once per session."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def copy_mlflow_db(template: Path, dest_dir: Path) -> str:
    """Copy the template DB into dest_dir and return its tracking URI."""
    db = dest_dir / "mlflow.db"
    shutil.copy(template, db)
    # The default experiment stores an absolute artifact path: point it at dest_dir, not the template.
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(dest_dir / "mlruns" / "0"),),
        )
    conn.close()
    return f"sqlite:///{db}"


@pytest.fixture
def mlflow_env(tmp_path, monkeypatch, mlflow_template_db) -> str:
    """A fresh MLflow tracking DB and registry in tmp_path; cwd is tmp_path (artifacts go to mlruns/)."""
    uri = copy_mlflow_db(mlflow_template_db, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: nothing to send
    monkeypatch.chdir(tmp_path)
    # mlflow.set_experiment (called by an in-process train or flow in an earlier test) leaves a
    # process-wide active experiment of another database: start each test on this one's default.
    import mlflow

    mlflow.set_experiment(experiment_id="0")
    return uri


SMOKE_TAGS = ("smoke_test", "smoke_test_key", "smoke_tested_at")


@pytest.fixture(scope="session")
def smoked_model_source(tmp_path_factory, mlflow_template_db) -> tuple[str, dict]:
    """A served model as a local dir (a version's artifacts, downloaded) and the smoke-test tags
    it earned when published: versions registered from this one source are the same model, so
    they carry the same result without each spending a fresh process on it."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.commands.promotion import publish_model
    from pipelines.core.params import Params

    root = tmp_path_factory.mktemp("smoked")
    with pytest.MonkeyPatch.context() as mp:
        uri = copy_mlflow_db(mlflow_template_db, root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        make_model_dir(root / "models")
        write_metrics(root / "reports", 2.0)
        version = publish_model(Params())["version"]
        name = Params().publish.model_name
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(root / "model"))
        tags = MlflowClient(uri).get_model_version(name, version).tags
    return local, {key: tags[key] for key in SMOKE_TAGS}


def make_project(root: Path, template_db: Path, overrides: list[str] = SMALL) -> tuple[Path, dict]:
    """A fresh clone-like copy of the project (tracked files only) with small params, and the
    environment that points its commands at its own MLflow database and Prefect home."""
    proj = tracked_copy(root / "proj", overrides)
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=copy_mlflow_db(template_db, root),
        PREFECT_HOME=str(root / "prefect"),
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(proj),  # the copy's code, as a clone's editable install would give
        # the tiny training lasts a second or two, not 10 s; a UI chart draws a line from 2 samples
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2",
    )
    env.pop("MLFLOW_RUN_ID", None)
    return proj, env


def sh(args: list[str], proj: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=proj, env=env, capture_output=True, text=True, timeout=timeout)


def trainpipe(proj, env, *args) -> subprocess.CompletedProcess:
    return sh([str(BIN / "trainpipe"), *args], proj, env)
