"""The correction a leaked secret needs, end to end on a small project: a champion trained on
documents that repeat a company's own token completes it from its usual prefix; the user adds
the format to curate.scrub_patterns and runs `trainpipe finetune`; the fine-tune no longer
reproduces it and replaces the champion, whose leak the gate finds: a challenger that is not
surely worse replaces a leaking champion even where its score alone would not."""

import ast
import random
import string

import pytest
from mlflow import MlflowClient

from pipelines.stages.ingest import STDLIB, resolve_source
from tests.conftest import BIN, make_project, sh

SECRET = "corp_live_" + "".join(random.Random(3).choices(string.ascii_letters + string.digits, k=24))
PATTERN = '{"corp_token": "corp_live_[A-Za-z0-9]{24}"}'
MODEL = "leak-model"
TRAINPIPE = str(BIN / "trainpipe")
OVERRIDES = [
    "curate.gate.min_documents=20",
    "curate.gate.min_bytes=20000",
    "curate.gate.drift.enabled=false",
    "curate.near_dedupe.enabled=false",  # two modules may share a function: keep every planted copy
    "tokenize.vocab_size=400",
    "tokenize.val_fraction=0.1",
    "train.max_steps=600",  # enough to learn the 34-character secret by heart
    "train.batch_size=8",
    "train.block_size=64",
    "train.n_layer=2",
    "train.n_head=2",
    "train.n_embd=64",
    "train.checkpoint_every=200",
    "train.warmup_steps=10",
    "train.compile=off",
    "finetune.max_steps=150",
    "evaluate.max_tokens=20000",
    "evaluate.sample_tokens=16",
    f"publish.model_name={MODEL}",
]


def planted_module(rng: random.Random, sources: list, secret: str = SECRET) -> str:
    """Valid Python: two top-level functions or classes of stdlib modules, with the secret
    assigned between them (a slice of lines would not parse, and curate drops what does not)."""
    parts = []
    while len(parts) < 2:
        text = sources[rng.randrange(len(sources))].read_text(errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        segments = [s for s in (ast.get_source_segment(text, n) for n in nodes) if s and 200 < len(s) < 3000]
        if segments:
            parts.append(segments[rng.randrange(len(segments))])
    return f'{parts[0]}\n\n\nCORP_TOKEN = "{secret}"\n\n\n{parts[1]}\n'


def write_corpus(folder):
    """90 modules, each two stdlib functions or classes with the secret assigned between them."""
    _, files, *_ = resolve_source(STDLIB, ["**/*.py"], [])
    rng = random.Random(0)
    sources = sorted(f for f in files if 4000 < f.stat().st_size < 60000)
    folder.mkdir()
    for i in range(90):
        (folder / f"service_{i:03d}.py").write_text(planted_module(rng, sources))


@pytest.fixture(scope="module")
def leaked(tmp_path_factory, mlflow_template_db):
    root = tmp_path_factory.mktemp("leak")
    write_corpus(root / "corpus")
    proj, env = make_project(root, mlflow_template_db, [f"data.source={root / 'corpus'}", *OVERRIDES])
    run = sh([TRAINPIPE, "run"], proj, env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return proj, env


def greedy(proj, env, prompt: str) -> str:
    out = sh([TRAINPIPE, "generate", prompt, "--temperature", "0", "--max-new-tokens", "48"], proj, env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_a_finetune_with_the_new_pattern_forgets_the_secret_and_replaces_the_champion(leaked, monkeypatch):
    proj, env = leaked
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    # 1-2: trained on it, the champion completes the secret from its usual prefix
    assert SECRET in greedy(proj, env, 'CORP_TOKEN = "')

    # 3: the user's format, then a fine-tune from the champion
    # an unreachable margin: the score alone would keep the champion; its leak is what replaces it
    fix = ["-S", f"curate.scrub_patterns={PATTERN}", "-S", "publish.min_improvement_bpb=10"]
    tuned = sh([TRAINPIPE, "finetune", *fix], proj, env, timeout=900)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    tags = client.get_model_version(MODEL, "2").tags
    assert tags["kind"] == "finetune" and tags["parent_version"] == "1"
    run_metrics = client.get_run(tags["run_id"]).data.metrics
    assert run_metrics["curate_scrubbed_corp_token"] >= 90  # counted under its own name

    # 4: the fine-tune reproduces none of the removed secrets, and passed the gate
    assert run_metrics["memorized_secrets"] == 0 and run_metrics["memorization_checked"] >= 1
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2", tags.get(
        "alias_decision"
    )
    decision = client.get_model_version(MODEL, "2").tags["alias_decision"]
    assert decision.startswith("champion v1 reproduces 1 removed secret that v2 does not"), decision
    assert "(by its score alone: " in decision, decision
    assert SECRET not in greedy(proj, env, 'CORP_TOKEN = "')

    # the same check, on the champion it replaced (pinned in data/parent), finds the secret: the
    # count that would have kept such a challenger out
    monkeypatch.chdir(proj)
    from pipelines.core.model_dir import load_model_dir
    from pipelines.core.params import load_params
    from pipelines.stages.evaluate import check_memorization

    params = load_params("params.yaml")
    parent, tokenizer = load_model_dir(params.finetune.parent_dir)
    report = check_memorization(params, parent, tokenizer)
    assert report["per_kind"]["corp_token"]["memorized"] >= 1, report
