"""The curate stage's parts on small inputs: the newer filters at their thresholds, secret
scrubbing, near-duplicate detection, the gate's tiers and the drift checks."""

import math

import pytest

from pipelines.core import dedupe, quality, scrub
from pipelines.core.params import CurateParams, DriftParams
from pipelines.stages import data_gate as gate

RULES = CurateParams(
    max_mean_line_length=10,
    max_encoded_fraction=0.5,
    max_encoded_run=100,
    prose_min_words=5,
    prose_mean_word_length=(3, 6),
    prose_max_symbol_ratio=0.2,
    prose_min_alpha_words=0.8,
)
B64 = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3"  # 80 chars


# --- filters: just inside and just outside each threshold ------------------------------------


@pytest.mark.parametrize(
    "check, path, text, expected",
    [
        (quality.long_mean_line, "a.py", "a" * 10 + "\n" + "b" * 9, None),  # 20 chars / 2 lines = 10
        (quality.long_mean_line, "a.py", "a" * 10 + "\n" + "b" * 10, "long_mean_line"),  # 10.5
        (quality.encoded_data, "a.py", B64 + "\n" + "x = 1 " * 14, None),  # 80 of 165: under half
        (quality.encoded_data, "a.py", B64 + "\n" + "x = 1 " * 13, "encoded_data"),  # 80 of 159
        (quality.encoded_data, "a.py", "s = '" + "a1" * 50 + "'\n" + "y = 2\n" * 100, None),  # a run of 100
        (quality.encoded_data, "a.py", "s = '" + "a1" * 51 + "'\n" + "y = 2\n" * 100, "encoded_data"),
        (quality.encoded_data, "a.py", "b = [" + ", ".join(["0xff"] * 8) + "]\n" + "z = 3\n" * 20, None),
        (quality.encoded_data, "a.py", "b = [" + ", ".join(["0xff"] * 40) + "]\n", "encoded_data"),
        (quality.encoded_data, "a.py", "u = '" + "\\u00e9" * 30 + "'\n", "encoded_data"),
        (quality.prose_too_few_words, "a.txt", "word " * 5, None),
        (quality.prose_too_few_words, "a.txt", "word " * 4, "prose_too_few_words"),
        (quality.prose_too_few_words, "a.py", "x", None),  # code is not judged as prose
        (quality.prose_word_length, "a.txt", "abc " * 5, None),
        (quality.prose_word_length, "a.txt", "ab " * 5, "prose_word_length"),
        (quality.prose_word_length, "a.txt", "abcdefg " * 5, "prose_word_length"),
        (quality.prose_symbols, "a.md", "# word word word word word", None),  # 1 per 6 words
        (quality.prose_symbols, "a.md", "# # word word word", "prose_symbols"),  # 2 per 5 words
        (quality.prose_few_alpha_words, "rows.jsonl#3", "one two three four 5", None),  # 4 of 5
        (quality.prose_few_alpha_words, "rows.jsonl#3", "one two three 4 5", "prose_few_alpha_words"),
    ],
)
def test_filter_thresholds(check, path, text, expected):
    assert check(path, text, RULES) == expected


def test_failing_filters_lists_every_reason_in_filter_order():
    text = "#" * 30  # too short, one long line, no letters
    rules = RULES.model_copy(update={"min_chars": 100, "max_line_length": 20})
    assert quality.failing_filters("a.py", text, rules) == [
        "too_short",
        "long_line",
        "long_mean_line",
        "low_alnum",
    ]


@pytest.mark.parametrize("reason", quality.FILTER_REASONS)
def test_every_reason_has_an_explanation_with_its_figure(reason):
    text = "def f(:\n" + "a" * 3000
    explanation = quality.explain_reason(reason, "a.py", text, CurateParams(autogen_markers=["def f"]))
    assert explanation and not explanation.startswith("dropped by the")


# --- secrets and personal data ------------------------------------------------------------------

PYPI_TOKEN = "pypi-AgEIcHlwaS5vcmcCJGI4YmNhMjY3LTgwYzQtNDRlZi04Mzk0LTQ1NjYxNmIzYmRmOQACKlszLCJmYWYx"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SLACK_HOOK = "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
PGP_BLOCK = "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0Sm0oBCADJ8mXn\n=hVnk\n-----END PGP PRIVATE KEY BLOCK-----"


@pytest.mark.parametrize(
    "text, expected, counts",
    [
        ("key = 'AKIAIOSFODNN7EXAMPLE'", "key = '<API_KEY>'", {"api_key": 1}),
        ("token = 'ghp_" + "a1B2" * 9 + "'", "token = '<API_KEY>'", {"api_key": 1}),
        ("slack = 'xoxb-123456789012-abcdefghijkl'", "slack = '<API_KEY>'", {"api_key": 1}),
        ("google = 'AIza" + "x" * 35 + "'", "google = '<API_KEY>'", {"api_key": 1}),
        ("openai = 'sk-" + "Ab1" * 10 + "'", "openai = '<API_KEY>'", {"api_key": 1}),
        ("stripe = 'sk_live_" + "a1" * 12 + "'", "stripe = 'sk_live_<API_KEY>'", {"api_key": 1}),
        (
            "auth = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlX2hlcmU'",
            "auth = '<TOKEN>'",
            {"token": 1},
        ),
        ("mail('guido@python.org')", "mail('<EMAIL>')", {"email": 1}),
        ("# Mail BARRY@PYTHON.ORG.", "# Mail <EMAIL>.", {"email": 1}),
        (
            'k = """-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY-----"""',
            'k = """<PRIVATE_KEY>"""',
            {"private_key": 1},
        ),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n(truncated)",
            "<PRIVATE_KEY>",
            {"private_key": 1},
        ),
        # the gaps of issue 8
        (f"TWINE_PASSWORD = '{PYPI_TOKEN}'", "TWINE_PASSWORD = '<API_KEY>'", {"api_key": 1}),
        (f"token: {PYPI_TOKEN.replace('AgEI', 'AgEN')}", "token: <API_KEY>", {"api_key": 1}),  # test.pypi
        (
            f"aws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = {AWS_SECRET}\n",
            "aws_access_key_id = <API_KEY>\naws_secret_access_key = <API_KEY>\n",
            {"api_key": 2},
        ),
        (
            f's3 = boto3.client("s3", "{AWS_SECRET}", key_id="ASIAIOSFODNN7EXAMPLE")',
            's3 = boto3.client("s3", "<API_KEY>", key_id="<API_KEY>")',  # the secret before the id
            {"api_key": 2},
        ),
        (
            'DB = "postgres://bob:hunter2@db.internal:5432/app"',
            'DB = "postgres://<CREDENTIALS>@db.internal:5432/app"',
            {"credentials": 1},
        ),
        (
            "pip install git+https://ci:s3cr3t@git.example.org/x",
            "pip install git+https://<CREDENTIALS>@git.example.org/x",
            {"credentials": 1},
        ),
        ('password = "hunter2"', 'password = "<PASSWORD>"', {"password": 1}),
        ("connect(host, passwd='hunter2')", "connect(host, passwd='<PASSWORD>')", {"password": 1}),
        ('cfg = {"db_password": "hunter2"}', 'cfg = {"db_password": "<PASSWORD>"}', {"password": 1}),
        ('ADMIN_PASSWORD: str = b"hunter2"', 'ADMIN_PASSWORD: str = b"<PASSWORD>"', {"password": 1}),
        (f"WEBHOOK = '{SLACK_HOOK}'", "WEBHOOK = 'https://hooks.slack.com/<API_KEY>'", {"api_key": 1}),
        (f'KEY = """{PGP_BLOCK}"""', 'KEY = """<PRIVATE_KEY>"""', {"private_key": 1}),
        ("t = 'glpat-" + "Ab1_" * 5 + "'", "t = '<API_KEY>'", {"api_key": 1}),  # the old 20 characters
        ("t = 'glpat-" + "Ab1_" * 7 + "'", "t = '<API_KEY>'", {"api_key": 1}),  # longer
        ("t = 'glpat-" + "A" * 27 + ".01.0l0fvvcbm'", "t = '<API_KEY>'", {"api_key": 1}),  # routable
        ("t = 'glrt-" + "x1" * 10 + "'", "t = '<API_KEY>'", {"api_key": 1}),  # runner
        ("t = 'gldt-" + "x1" * 10 + "'", "t = '<API_KEY>'", {"api_key": 1}),  # deploy
        ("t = 'glcbt-" + "x1" * 10 + "'", "t = '<API_KEY>'", {"api_key": 1}),  # CI job
    ],
)
def test_scrub_replaces_each_secret_and_keeps_the_code_around_it(text, expected, counts):
    assert scrub.scrub_text(text) == (expected, counts)


@pytest.mark.parametrize(
    "text",
    [
        "digest = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",  # a hash
        "decorator = '@functools.wraps'",
        "@functools.lru_cache(maxsize=None)\ndef f(): pass",
        "x = a@b",  # matrix multiplication
        "y = a@self.weight",  # ... on an attribute
        "y = x@self.proj.weight.T + h@w.to(dtype)",
        "task-key = 'sk-short'",
        "KEY = 'AKIA-not-a-key'",
        "commit = 'da39a3ee5e6b4b0d3255bfef95601890afd80709'",  # 40 characters, no key id near
        "mail('test@dom.test', 'foo@bar.invalid')",  # reserved test domains (RFC 2606, 6761)
        "password = ''",  # empty
        "password = getpass.getpass('Password: ')",  # code, not a literal
        "if password == 'secret':",  # a comparison
        "PASSWORD_PROMPT = 'Enter password:'",  # the name goes on: not the password itself
        "pw = '%s:%s@%s' % (user, password, host)",
        "url = f'https://{user}:{password}@{host}'",  # templated credentials
        "url = 'https://user@localhost:8080/path'",  # a user but no password
        "MODULE_PWD_STATE = 'yes'",
    ],
)
def test_scrub_leaves_ordinary_code_alone(text):
    assert scrub.scrub_text(text) == (text, {})


def test_aws_secret_needs_a_key_id_within_a_few_lines():
    near = f"id = 'AKIAIOSFODNN7EXAMPLE'\n\n\nsecret = '{AWS_SECRET}'"
    far = "id = 'AKIAIOSFODNN7EXAMPLE'\n" + "\n" * 10 + f"secret = '{AWS_SECRET}'"
    assert scrub.scrub_text(near) == ("id = '<API_KEY>'\n\n\nsecret = '<API_KEY>'", {"api_key": 2})
    assert scrub.scrub_text(far)[1] == {"api_key": 1} and AWS_SECRET in scrub.scrub_text(far)[0]
    # 40 base64 characters in one letter case are a hash, not a secret, even next to a key id
    sha = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
    assert sha in scrub.scrub_text(f"id = 'AKIAIOSFODNN7EXAMPLE'\nsha = '{sha}'")[0]


def test_every_kind_has_a_placeholder():
    assert {rule.kind for rule in scrub.RULES} == set(scrub.KINDS) == set(scrub.PLACEHOLDERS)


def test_scrubbing_the_stdlib_finds_only_what_the_report_accepts():
    """The precision check on real code. The standard library holds no live secret: every
    password or credentials hit must be a fixture of a test (of the modules that handle
    passwords: urllib, smtplib, zipfile, ...), and the emails far fewer than the 1,103 the
    pattern without a top-level-domain rule found."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    hits: dict[str, dict[str, int]] = {}
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text, _ = quality.decode_document(path.read_bytes())
        counts = scrub.scrub_text(text)[1] if text else {}
        if counts:
            hits[path.relative_to(root).as_posix()] = counts
    secret_hits = {p: c for p, c in hits.items() if c.keys() - {"email"}}
    # register.py's docstring shows a .pypirc, `password: sekrit`: a config file's password
    fixtures = ("test/", "distutils/tests/", "distutils/command/register.py")
    assert secret_hits and all(p.startswith(fixtures) for p in secret_hits), secret_hits
    assert {k for c in secret_hits.values() for k in c} <= {"password", "credentials", "email"}
    assert 10 <= sum(c.get("password", 0) for c in hits.values()) <= 40  # 24 on CPython 3.11.7
    assert 500 < sum(c.get("email", 0) for c in hits.values()) < 1000  # 949 on CPython 3.11.7


# --- near duplicates ------------------------------------------------------------------------------


def module(name: str, lines: int = 60) -> str:
    return "".join(
        f"def {name}_{i}(value, other):\n    return value * {i} + other - {i * 7}\n" for i in range(lines)
    )


def test_near_duplicates_keep_the_first_offered_and_list_clusters():
    original = module("alpha")
    renamed = original.replace("alpha_3(", "beta_3(").replace("alpha_40(", "gamma_40(")  # two renames
    unrelated = module("zeta").replace("value", "item").replace("other", "rest").replace("*", "/")
    index = dedupe.NearDuplicates(threshold=0.85, num_perm=128)
    sig = {
        k: dedupe.signature(t, 128, 5)
        for k, t in {"a.py": original, "b.py": renamed, "c.py": unrelated}.items()
    }

    assert index.offer("a.py", sig["a.py"]) is None
    hit = index.offer("b.py", sig["b.py"])
    assert hit is not None and hit[0] == "a.py" and hit[1] >= 0.85
    assert index.offer("c.py", sig["c.py"]) is None
    assert index.clusters == {"a.py": [{"path": "b.py", "jaccard": round(hit[1], 3)}]}


def test_shingle_hashes_are_distinct_ordered_word_ngrams():
    assert len(dedupe.shingle_hashes("a b", 5)) == 1  # a short document is one shingle
    assert len(dedupe.shingle_hashes("a b c d e f", 5)) == 2
    assert len(dedupe.shingle_hashes("a b c d e a b c d e", 5)) == 5  # the repeat adds nothing new
    assert set(dedupe.shingle_hashes("a b c d e", 5)) != set(dedupe.shingle_hashes("e d c b a", 5))
    assert dedupe.shingle_hashes("x = f(a, b)", 2).max() < 2**32


def test_signature_is_deterministic_across_calls():
    text = module("alpha")
    assert (dedupe.signature(text, 64, 5) == dedupe.signature(text, 64, 5)).all()


# --- the gate's tiers -----------------------------------------------------------------------------


def test_an_empty_suite_fails_the_gate(tmp_path):
    result = gate.run_suite(gate.gate_frame([]), [], tmp_path)
    assert not result.passed
    assert result.failed == [
        {"check": "expectation_suite", "observed": "0 expectations evaluated", "need": ">= 1"}
    ]
    assert "0 expectations evaluated" in result.message()


def test_warning_tier_reports_without_blocking(tmp_path):
    text = "x = 1  # " + "-" * 300  # mostly punctuation: low median alnum, but above the blocking floor
    kept = [
        {"path": f"m{i}.py", "text": text + str(i), "sha256": str(i), "n_bytes": len(text) + 1}
        for i in range(3)
    ]
    rules = CurateParams(min_alnum_fraction=0.005)
    rules.gate.min_documents, rules.gate.min_bytes = 1, 1

    result = gate.run_suite(gate.gate_frame(kept), gate.gate_expectations(rules, documents_in=10), tmp_path)

    assert result.passed
    assert {w["check"] for w in result.warnings} == {
        "expect_table_row_count_to_be_between",  # kept 3 of 10
        "expect_column_median_to_be_between[alnum_fraction]",
    }


def kept_docs(paths: list[str], size: int = 400) -> list[dict]:
    docs = []
    for i, path in enumerate(paths):
        text = f"def f_{i}(x):\n    return x * {i}\n" + "# a comment line of words\n" * (size // 27)
        docs.append({"path": path, "text": text, "sha256": f"sha{i}", "n_bytes": len(text)})
    return docs


GOOD = ["pkg/a.py", "pkg/b.py", "lib/c.py", "lib/d.md", "e.txt"]


@pytest.mark.parametrize(
    "paths, change, gate_overrides, failed, warned",
    [
        (GOOD, None, {}, set(), set()),
        # blocking: what a defect upstream of the gate would leave, and the corpus's budget
        (
            GOOD,
            lambda f: f.drop(columns=["source"], inplace=True),
            {},
            {"expect_table_columns_to_match_set"},
            "any",
        ),
        (
            GOOD,
            lambda f: f.__setitem__("n_bytes", f["n_bytes"].astype("float64")),
            {},
            {"expect_column_values_to_be_of_type[n_bytes]"},
            set(),
        ),
        (
            GOOD,
            lambda f: f.__setitem__("text", [None, *f["text"][1:]]),
            {},
            {"expect_column_values_to_not_be_null[text]"},
            set(),
        ),
        (
            ["pkg/a.py", "pkg/a.py", "lib/c.py", "lib/d.py", "e.py"],  # two documents, one name
            None,
            {},
            {"expect_column_values_to_be_unique[path]"},
            set(),
        ),
        (GOOD, None, {"min_documents": 6}, {"expect_table_row_count_to_be_between"}, set()),
        (GOOD, None, {"max_bytes": 1000}, {"expect_column_sum_to_be_between[n_bytes]"}, set()),
        (GOOD, None, {"min_bytes": 100_000}, {"expect_column_sum_to_be_between[n_bytes]"}, set()),
        # warnings: what the filters cannot see, one document at a time
        (
            ["vendor/a.py", "vendor/b.py", "vendor/c.py", "pkg/d.py", "e.py"],  # 3 of 5 from vendor/
            None,
            {},
            set(),
            {"expect_column_max_to_be_between[source_share]"},
        ),
        (
            ["pkg/a.py", "web/icon.svg", "docs/page.html", "lib/rows.jsonl#3", "README"],
            None,
            {},
            set(),
            {"expect_column_values_to_be_in_set[extension]"},
        ),
        (GOOD, None, {"warn_min_kept_fraction": 0.9}, set(), {"expect_table_row_count_to_be_between"}),
    ],
)
def test_each_expectation_fires_on_what_it_guards(tmp_path, paths, change, gate_overrides, failed, warned):
    rules = CurateParams()
    rules.gate = rules.gate.model_copy(update={"min_documents": 1, "min_bytes": 100, **gate_overrides})
    frame = gate.gate_frame(kept_docs(paths))
    expectations = gate.gate_expectations(rules, documents_in=6, num_sources=frame["source"].nunique())
    if change:
        change(frame)

    result = gate.run_suite(frame, expectations, tmp_path)

    assert {f["check"] for f in result.failed} == failed
    assert result.passed == (not failed)
    if warned != "any":
        assert {w["check"] for w in result.warnings} == warned


def test_a_single_source_is_not_warned_about_its_share(tmp_path):
    rows = [f"corpus.jsonl#{i}" for i in range(4)]  # one table file: its share is 1 by definition
    frame = gate.gate_frame(kept_docs(rows))
    rules = CurateParams()
    rules.gate.min_documents, rules.gate.min_bytes = 1, 1
    result = gate.run_suite(frame, gate.gate_expectations(rules, 4, frame["source"].nunique()), tmp_path)
    assert result.passed and result.warnings == []
    assert list(frame["source"]) == ["corpus.jsonl"] * 4 and list(frame["extension"]) == [".jsonl"] * 4


# --- drift ----------------------------------------------------------------------------------------


def profile_of(texts: list[str]) -> dict:
    return gate.merge_profiles([gate.text_profile(texts)])


def test_drift_against_itself_is_all_ok():
    texts = [module(f"m{i}") for i in range(20)]
    checks = gate.drift_checks(profile_of(texts), profile_of(texts), DriftParams())
    assert [c["verdict"] for c in checks] == ["ok"] * 5
    assert all(c["figure"] in (1.0, 0.0) for c in checks)


def test_drift_blocks_a_corpus_ten_times_smaller_and_another_language():
    reference = profile_of([module(f"m{i}") for i in range(20)])
    smaller = profile_of([module("m0"), module("m1")])
    french = profile_of(["Le renard brun et rapide saute par-dessus le chien paresseux. " * 40] * 20)

    by_check = {c["check"]: c for c in gate.drift_checks(smaller, reference, DriftParams())}
    assert by_check["drift_documents"]["verdict"] == "block"
    assert by_check["drift_documents"]["observed"] == 2 and by_check["drift_documents"]["champion"] == 20
    assert by_check["drift_byte_distribution"]["verdict"] == "ok"

    by_check = {c["check"]: c for c in gate.drift_checks(french, reference, DriftParams())}
    assert by_check["drift_documents"]["verdict"] == "ok"
    assert by_check["drift_byte_distribution"]["verdict"] == "block"
    assert by_check["drift_word_distribution"]["verdict"] == "block"


def test_drift_warn_tier_between_thresholds():
    reference = profile_of([module(f"m{i}") for i in range(20)])
    fewer = profile_of([module(f"m{i}") for i in range(14)])  # 1.43 times fewer
    checks = {c["check"]: c["verdict"] for c in gate.drift_checks(fewer, reference, DriftParams())}
    assert checks["drift_documents"] == "warn"


def test_js_distance_bounds():
    assert gate.js_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert math.isclose(gate.js_distance([1, 0], [0, 1]), 1.0)
    assert gate.js_distance({"a": 5}, {"a": 5}, 10, 10) == 0.0
    assert 0 < gate.js_distance({"a": 5}, {"b": 5}, 10, 10) < 1
