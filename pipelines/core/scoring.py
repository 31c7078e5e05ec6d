"""What names a held-out score, readable without torch: the evaluate stage's report files, the
fields of its score key and the hash of the scoring code.

publish checks a score against them on every run, an unchanged one included; importing the scorer
(pipelines.stages.evaluate, and torch with it) only for that cost an unchanged `trainpipe run` 2.2 s on
this machine. pipelines.stages.evaluate, which scores, takes them from here.
"""

import ast
from pathlib import Path

from pipelines.core.data import sha256_hex

METRICS_FILE = "metrics.json"  # DVC metrics: `dvc exp show` and `dvc metrics diff` tabulate every key
EVALUATION_FILE = "evaluation.json"  # the score's identity (hashes, settings): text, kept out of the tables
PER_DOCUMENT_FILE = "per_document.json"  # each validation document's bits and bytes: the paired gate
MEMORIZATION_FILE = (
    "memorization.json"  # the memorization check, per kind: what the gate cites when it refuses
)
# What a score depends on besides the weights; two scores compare only when all are equal.
SCORE_KEY_FIELDS = (
    "val_set_sha256",
    "score_max_tokens",
    "score_context",
    "score_bf16",
    "scoring_code_sha256",
)
SCORER_FILE, SCORER = Path(__file__).parents[1] / "stages" / "evaluate.py", "score_texts"
MODEL_FILE = Path(__file__).with_name("model.py")


def scoring_code_sha256() -> str:
    """The code that turns weights and texts into a score: evaluate.score_texts and the model's
    forward pass (pipelines/core/model.py), both DVC dependencies of the evaluate stage, so `dvc repro`
    re-scores after an edit to either. An edit to either makes earlier scores incomparable.
    The texts are those inspect.getsource gives for the imported function and module (a test
    holds them equal), read from the files so that torch need not be imported."""
    return sha256_hex(function_source(SCORER_FILE.read_text(), SCORER) + MODEL_FILE.read_text())


def function_source(module_text: str, name: str) -> str:
    """A top-level function's lines, its decorators included, as inspect.getsource gives them."""
    for node in ast.parse(module_text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "".join(module_text.splitlines(keepends=True)[first - 1 : node.end_lineno])
    raise LookupError(f"no function {name}() in the scoring code")
