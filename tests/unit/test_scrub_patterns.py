"""Secret formats of one's own (curate.scrub_patterns): validated at load, scrubbed and counted as the
built-in kinds are, and the scrubbed spans curate records for the memorization check.

Secrets are built at run time (CORP + body), so that no literal here looks like a live one."""

import hashlib
import json
import random
from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml

from pipelines.core.data import write_documents
from pipelines.core.errors import ConfigError
from pipelines.core.params import CurateParams, load_params, save_overrides
from pipelines.core.scrub import Span, scrub_spans, scrub_text
from pipelines.core.shards import list_shards, read_documents
from pipelines.core.spans import SPANS_FILE, read_spans
from pipelines.stages import curate

CORP = "corp_live_"
CORP_PATTERN = "corp_live_[A-Za-z0-9]{24}"
PATTERNS = {"corp_token": CORP_PATTERN}


def corp_token(seed: int) -> str:
    rng = random.Random(seed)
    return CORP + "".join(
        rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24)
    )


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- validation: at params load, exit 2, one line naming the pattern --------------------------


@pytest.mark.parametrize(
    ("patterns", "says"),
    [
        (
            {"corp_token": "corp_live_[A-Z"},
            "pattern corp_token 'corp_live_[A-Z' is not a valid regular expression",
        ),
        ({"corp_token": "x(?P<a"}, "pattern corp_token 'x(?P<a' is not a valid regular expression"),
        ({"corp_token": "[a-z]*"}, "pattern corp_token '[a-z]*' matches the empty string"),
        ({"corp_token": "x|"}, "pattern corp_token 'x|' matches the empty string"),
        ({"corp_token": r"\b"}, "pattern corp_token '\\\\b' matches the empty string"),
        ({"corp_token": "(?=corp)"}, "pattern corp_token '(?=corp)' matches the empty string"),
        ({"corp_token": "key=(?P<secret>\\w*)"}, "matches the empty string"),  # the replaced group, empty
        ({"Corp": "x"}, "pattern name 'Corp' must be lower-case letters"),
        ({"corp-token": "x"}, "pattern name 'corp-token' must be lower-case letters"),
        ({"email": "x"}, "pattern name 'email' is a built-in kind"),
        ({"ok": CORP_PATTERN, "bad": "("}, "pattern bad '(' is not a valid regular expression"),
    ],
)
def test_a_bad_pattern_is_a_one_line_config_error_naming_it(patterns, says):
    with pytest.raises(ConfigError) as err:
        load_params("params.yaml", ["curate.scrub_patterns=" + json.dumps(patterns)])
    assert err.value.exit_code == 2
    message = str(err.value)
    assert says in message and "curate.scrub_patterns" in message and "\n" not in message


@pytest.mark.parametrize(
    "patterns",
    [
        PATTERNS,
        {"a": "x", "b": r"(?i)secret_[0-9a-f]{8}"},
        {"key": "key=(?P<secret>\\w+)"},
        {"opt": "(?P<secret>y)?x"},
    ],
)
def test_good_patterns_load(patterns):
    assert (
        load_params("params.yaml", ["curate.scrub_patterns=" + json.dumps(patterns)]).curate.scrub_patterns
        == patterns
    )


def test_the_stage_exits_2_with_one_line_naming_the_pattern(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        curate.main(
            ["--params", str(tmp_path / "absent.yaml"), "-S", 'curate.scrub_patterns={"corp_token": "a*"}']
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("trainpipe curate:") and "pattern corp_token 'a*'" in err


@pytest.mark.parametrize(
    "override",
    [
        'curate.scrub_patterns={"corp_token": "corp_live_[A-Za-z0-9]{24}"}',  # JSON
        "curate.scrub_patterns={corp_token: 'corp_live_[A-Za-z0-9]{24}'}",  # Hydra's, as DVC reads it
        "curate.scrub_patterns.corp_token='corp_live_[A-Za-z0-9]{24}'",  # one name
    ],
)
def test_a_mapping_override_is_written_to_params_yaml_as_dvc_reads_it(override, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text())
    assert save_overrides(path, [override]).curate.scrub_patterns == PATTERNS
    assert parse_yaml(path.read_text(), str(path))["curate"]["scrub_patterns"] == PATTERNS
    # a mapping set whole replaces the one before (Hydra alone would merge the two)
    save_overrides(path, ['curate.scrub_patterns={"other": "x{3}"}'])
    assert load_params(path).curate.scrub_patterns == {"other": "x{3}"}
    save_overrides(path, ["curate.scrub_patterns={}"])
    assert load_params(path).curate.scrub_patterns == {}


# --- scrubbing and counting ----------------------------------------------------------------------


def test_a_pattern_of_ones_own_is_scrubbed_and_counted_under_its_name():
    token = corp_token(1)
    text = f'API = "{token}"\nother = "{corp_token(2)}"\ncontact = "guido@python.org"\n'
    assert scrub_text(text) == (
        text.replace("guido@python.org", "<EMAIL>"),
        {"email": 1},
    )  # unknown to the built-ins
    scrubbed, counts = scrub_text(text, PATTERNS)
    assert scrubbed == 'API = "<CORP_TOKEN>"\nother = "<CORP_TOKEN>"\ncontact = "<EMAIL>"\n'
    assert counts == {"corp_token": 2, "email": 1}
    # scrub_secrets off leaves the built-in rules out, not one's own
    assert scrub_text(text, PATTERNS, builtin=False) == (
        'API = "<CORP_TOKEN>"\nother = "<CORP_TOKEN>"\ncontact = "guido@python.org"\n',
        {"corp_token": 2},
    )


def test_a_secret_group_replaces_only_itself_and_ones_own_formats_win_over_the_built_ins():
    assert scrub_text("login: corp=hunter22!", {"corp_login": r"corp=(?P<secret>\S+)"}) == (
        "login: corp=<CORP_LOGIN>",
        {"corp_login": 1},
    )
    # an OpenAI-shaped key of one's own format is counted under its name, not api_key
    key = "sk-corp-" + "a1B2" * 8
    assert scrub_text(f"k = '{key}'", {"corp_key": r"sk-corp-[A-Za-z0-9]{32}"}) == (
        "k = '<CORP_KEY>'",
        {"corp_key": 1},
    )
    assert scrub_text(f"k = '{key}'")[1] == {"api_key": 1}


SPAN_TEXTS = [
    "",
    "nothing secret here\n",
    f'a = "{corp_token(3)}"; b = "{corp_token(3)}"\nmail guido@python.org, barry@python.org\n',
    # a private-key block around a token of one's own: one span, the whole block; a password around one
    f"x\n-----BEGIN RSA PRIVATE KEY-----\n{corp_token(4)}\nMIIEow\n-----END RSA PRIVATE KEY-----\ny {corp_token(5)}\nexport DB_PASSWORD=x{corp_token(8)}\n",
    # a credential in a URL, a password, an AWS key pair, a JWT, all on a few lines
    "db = 'postgres://bob:pa55word@db.internal:5432/x'\npassword = 'hunter2hunter2'\n"
    "AWS_ACCESS_KEY_ID=AKIA" + "ABCDEFGHIJKLMNOP" + "\nsecret = '" + "aB3/" * 10 + "'\n"
    "tok = 'eyJ" + "hbGciOiJI" + ".eyJ" + "zdWIiOiIx" + ".abcdefghij'\n",
    f"<CORP_TOKEN> literal, then {corp_token(6)}<EMAIL>{corp_token(7)}",
]


@pytest.mark.parametrize("text", SPAN_TEXTS)
def test_spans_put_each_removed_text_back_where_its_placeholder_stands(text):
    """The scrubbed text with each span's placeholder replaced by its removed text is the original:
    offsets, kinds and removed texts are all right, whatever rules ran and in what order."""
    scrubbed, counts, spans = scrub_spans(text, PATTERNS)
    assert scrubbed == scrub_text(text, PATTERNS)[0]
    rebuilt, done = [], 0
    for span in spans:
        placeholder = f"<{span.kind.upper()}>"
        assert scrubbed.startswith(placeholder, span.offset) and span.offset >= done and span.removed
        rebuilt += [scrubbed[done : span.offset], span.removed]
        done = span.offset + len(placeholder)
    assert "".join(rebuilt) + scrubbed[done:] == text
    assert len(spans) <= sum(counts.values())  # a placeholder taken into another's is one span, two counts


def test_a_placeholder_taken_in_by_a_later_match_is_part_of_its_span():
    token = corp_token(4)
    # one's own pattern runs first; the .env password rule then takes its placeholder in
    scrubbed, counts, spans = scrub_spans(f"x\nexport DB_PASSWORD=pre{token}\n", PATTERNS)
    assert scrubbed == "x\nexport DB_PASSWORD=<PASSWORD>\n" and counts == {"corp_token": 1, "password": 1}
    assert [(s.offset, s.kind, s.removed) for s in spans] == [(21, "password", "pre" + token)]
    # a match that cuts into a placeholder takes all of it
    patterns = {"a_name": "tok_[0-9]{4}", "b_name": "NAME>[a-z]+"}
    scrubbed, counts, spans = scrub_spans("1 tok_1234xyz 2 tok_5678 3", patterns)
    assert scrubbed == "1 <B_NAME> 2 <A_NAME> 3" and counts == {"a_name": 2, "b_name": 1}
    assert [(s.offset, s.kind, s.removed) for s in spans] == [
        (2, "b_name", "tok_1234xyz"),
        (13, "a_name", "tok_5678"),
    ]
    # a private-key block is scrubbed before one's own patterns: a token inside goes with it
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{token}\n-----END RSA PRIVATE KEY-----"
    assert scrub_spans(f"x\n{block}\n", PATTERNS)[1:] == ({"private_key": 1}, [Span(2, "private_key", block)])


# --- the curate stage: counts per name, the spans file -----------------------------------------


def python_file(i: int, secret: str | None = None) -> str:
    body = "".join(f"def function_{i}_{k}(value):\n    return value * {k} + {i}\n\n\n" for k in range(6))
    if secret:
        body += f'API_TOKEN = "{secret}"  # the service key\n'
    return f'"""Module {i}, contact guido@python.org."""\n\n' + body


def stage_params(tmp_path, *overrides: str):
    from pipelines.core.data import write_json
    from pipelines.stages import inputs

    params = load_params(
        tmp_path / "nonexistent.yaml",
        overrides=[
            f"data.raw_dir={tmp_path / 'raw'}",
            f"data.curated_dir={tmp_path / 'curated'}",
            f"data.quarantine_dir={tmp_path / 'quarantine'}",
            f"data.inputs_dir={tmp_path / 'inputs'}",
            f"curate.reports_dir={tmp_path / 'reports'}",
            "curate.gate.min_documents=5",
            "curate.gate.min_bytes=1000",
            "curate.gate.drift.enabled=false",
            *overrides,
        ],
    )
    write_json(Path(params.data.inputs_dir) / inputs.CHAMPION_FILE, inputs.champion_reference(params)[0])
    return params


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A raw snapshot of 12 modules, every third with the same planted token, one with another."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-registry.db'}")
    secrets = {i: corp_token(0) for i in range(0, 12, 3)} | {5: corp_token(1)}
    records = [
        {"path": f"pkg/mod_{i:02d}.py", "content": python_file(i, secrets.get(i)).encode()} for i in range(12)
    ]
    # a dropped document (too short) with the token: its quarantined copy must lose it too
    records.append({"path": "pkg/short.py", "content": f"K = '{corp_token(0)}'\n".encode()})
    write_documents(records, tmp_path / "raw")
    return secrets


@pytest.mark.parametrize("workers", [1, 2])  # the same spans, in the same order, either way
def test_curate_counts_ones_own_kind_and_records_spans_without_the_secrets(tmp_path, planted, workers):
    params = stage_params(
        tmp_path, "curate.scrub_patterns=" + json.dumps(PATTERNS), f"curate.workers={workers}"
    )
    summary = curate.run(params)

    assert summary["scrubbed"] == {
        "private_key": 0, "api_key": 0, "token": 0, "credentials": 0, "password": 0, "email": 12, "corp_token": 5,
    }  # fmt: skip
    assert summary["rules"]["scrub_patterns"] == PATTERNS
    spans_path = tmp_path / "reports" / SPANS_FILE
    raw_spans = spans_path.read_text()
    # no secret anywhere curate writes: the spans file, the curated table, the quarantine
    for secret in set(planted.values()) | {"guido@python.org"}:
        assert secret not in raw_spans
        for folder in ("curated", "quarantine"):
            for shard in list_shards(tmp_path / folder):
                assert secret.encode() not in shard.read_bytes()
    spans = read_spans(spans_path)
    texts = {d["path"]: d["text"] for d in read_documents(tmp_path / "curated")}
    corp = [s for s in spans if s["kind"] == "corp_token"]
    assert [(s["path"], s["sha256"], s["length"]) for s in corp] == [
        (f"pkg/mod_{i:02d}.py", sha(secret), 34) for i, secret in sorted(planted.items())
    ]
    assert len([s for s in spans if s["kind"] == "email"]) == 12
    for span in spans:
        assert set(span) == {"path", "offset", "kind", "length", "sha256"}
        assert texts[span["path"]].startswith(f"<{span['kind'].upper()}>", span["offset"])
    assert [(s["path"], s["offset"]) for s in spans] == sorted((s["path"], s["offset"]) for s in spans)


def test_curate_explains_a_document_scrubbed_by_ones_own_pattern(tmp_path, planted):
    params = stage_params(tmp_path, "curate.scrub_patterns=" + json.dumps(PATTERNS))
    curate.run(params)
    explained = curate.explain("pkg/mod_03.py", params)
    assert "1 corp_token -> <CORP_TOKEN>" in explained and "1 email -> <EMAIL>" in explained


def test_curate_without_patterns_keeps_the_built_in_counts(tmp_path, planted):
    summary = curate.run(stage_params(tmp_path))
    assert "corp_token" not in summary["scrubbed"] and summary["scrubbed"]["email"] == 12
    assert {s["kind"] for s in read_spans(tmp_path / "reports" / SPANS_FILE)} == {"email"}


def test_curate_params_default_has_no_patterns():
    assert CurateParams().scrub_patterns == {}
