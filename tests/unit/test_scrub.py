"""Secret and personal-data scrubbing (pipelines/core/scrub.py): every token family current
scanners detect, the forms a secret takes in config files, precision on code, and linear time.

Tokens are built by concatenation at run time, so that no literal here looks like a live
credential to a push-protection scanner."""

import time

import pytest

from pipelines.core import scrub

HEX32 = "0123456789abcdef" * 2
HEX64 = HEX32 * 2
ALNUM36 = "a1B2" * 9
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
AWS_ID = "AKIA" + "IOSFODNN7EXAMPLE"


def scrubbed(text: str) -> str:
    return scrub.scrub_text(text)[0]


# --- GitHub: every prefix ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        *(
            "gh" + kind + "_" + ALNUM36 for kind in "pousr"
        ),  # personal, OAuth, user-to-server, server, refresh
        "github" + "_pat_" + "11ABCDEFG0" + "a1B2c3D4e5F6" + "_" + "x9Y8" * 14 + "z7W",  # fine-grained, 82
    ],
)
def test_github_tokens_of_every_prefix_are_caught(token):
    assert scrub.scrub_text(f"token = '{token}'") == ("token = '<API_KEY>'", {"api_key": 1})


# --- URL credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://:s3cretpw@cache:6379/0", "redis://<CREDENTIALS>@cache:6379/0"),  # no user
        ("postgres://bob:p%40ss%21@db:5432/app", "postgres://<CREDENTIALS>@db:5432/app"),  # percent-encoded
        ("mysql://root:pa$$w0rd@db/app", "mysql://<CREDENTIALS>@db/app"),
        ("amqp://guest:g!u*e;s~t(1)@mq.internal//", "amqp://<CREDENTIALS>@mq.internal//"),
        ("https://deploy:tok^en&x=1@git.example.org/r.git", "https://<CREDENTIALS>@git.example.org/r.git"),
    ],
)
def test_url_credentials_with_punctuation_or_no_user_are_caught(url, expected):
    assert scrub.scrub_text(f"URL = '{url}'") == (f"URL = '{expected}'", {"credentials": 1})


@pytest.mark.parametrize(
    "text",
    [
        "url = 'postgres://%s:%s@%s/%s' % (user, pw, host, db)",
        "url = 'postgres://%(user)s:%(password)s@%(host)s'",
        "url = f'https://{user}:{password}@{host}'",
        "URL=postgres://$DB_USER:$DB_PASSWORD@db/app",
        "URL=postgres://${DB_USER}:${DB_PASSWORD}@db/app",
        "see https://<user>:<password>@host/path",
        "ftp://anonymous:@ftp.example.org/",  # an empty password
    ],
)
def test_templated_url_credentials_stay(text):
    assert scrub.scrub_text(text) == (text, {})


# --- unquoted passwords in YAML, .env and shell files ------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("db:\n  password: hunter2\n", "db:\n  password: <PASSWORD>\n"),
        ("password: S3cr3t!x  # prod\n", "password: <PASSWORD>  # prod\n"),
        ("- db_password: tr0ub4dor&3\n", "- db_password: <PASSWORD>\n"),
        ("DB_PASSWORD=hunter2\n", "DB_PASSWORD=<PASSWORD>\n"),
        ("export POSTGRES_PASSWORD=correct-horse\n", "export POSTGRES_PASSWORD=<PASSWORD>\n"),
        ("REDIS_PASSWD=x9y8z7\nOTHER=1", "REDIS_PASSWD=<PASSWORD>\nOTHER=1"),
    ],
)
def test_unquoted_passwords_in_config_files_are_caught(text, expected):
    assert scrub.scrub_text(text) == (expected, {"password": 1})


@pytest.mark.parametrize(
    "text",
    [
        "class Login:\n    password: str\n",  # an annotation
        "    password: Optional[str] = None\n",
        "    password: str | None = None\n",
        "    password: SecretStr\n",
        "password: ${DB_PASSWORD}\n",  # templated
        "password: '{{ vault_db_password }}'\n",
        "password: !vault |\n",
        "password: null\n",
        "password:\n  from_env: DB_PASSWORD\n",
        "    password: the password to log in with\n",  # a docstring's argument list
        ":param password: the password\n",
        "    password=password,\n",  # a keyword argument
        "PASSWORD=$DB_PASSWORD\n",
        "password=None\n",
        "password=getpass.getpass()\n",
        "DB_PASSWORD=\n",
    ],
)
def test_unquoted_password_shaped_code_stays(text):
    assert scrub.scrub_text(text) == (text, {})


# --- a lone AWS secret key, where the context says it is one ---------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"aws_secret_access_key = {AWS_SECRET}", "aws_secret_access_key = <API_KEY>"),
        (f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}", "AWS_SECRET_ACCESS_KEY=<API_KEY>"),
        (f'"SecretAccessKey": "{AWS_SECRET}",', '"SecretAccessKey": "<API_KEY>",'),
        (f"  aws_secret_key: '{AWS_SECRET}'", "  aws_secret_key: '<API_KEY>'"),
    ],
)
def test_a_lone_aws_secret_assigned_to_a_secret_key_name_is_caught(text, expected):
    far = f"id = '{AWS_ID}'\n" + "\n" * 20  # a key id far away changes nothing
    assert scrub.scrub_text(text) == (expected, {"api_key": 1})
    assert scrub.scrub_text(far + text) == ("id = '<API_KEY>'\n" + "\n" * 20 + expected, {"api_key": 2})


@pytest.mark.parametrize(
    "text",
    [
        f"blob = '{AWS_SECRET}'",  # 40 base64 characters, nothing says secret
        f"secret_name = '{AWS_SECRET}'",  # no "key" in the name
        "aws_secret_key = 'da39a3ee5e6b4b0d3255bfef95601890afd80709'",  # a hash: one letter case
    ],
)
def test_40_base64_characters_without_secret_context_stay(text):
    assert scrub.scrub_text(text) == (text, {})


# --- emails under any top-level domain -------------------------------------------------------------


@pytest.mark.parametrize("tld", ["xyz", "tech", "cloud", "online", "company", "engineering", "IO"])
def test_emails_under_any_top_level_domain_are_caught(tld):
    assert scrub.scrub_text(f"# Contact: jane.doe+ml@mail.example.{tld}.") == (
        "# Contact: <EMAIL>.",
        {"email": 1},
    )


@pytest.mark.parametrize(
    "text",
    [
        "y = a@self.weight",
        "y = x@self.proj.weight.T + h@w.to(dtype)",
        "scores = q@k.transpose(-2, -1)",
        "out = attn@v.data",
        "z = x@W.T",
        "@functools.lru_cache(maxsize=None)",
        "mail('test@dom.test', 'foo@bar.invalid', 'me@host.localhost', 'a@b.example')",
    ],
)
def test_matmul_decorators_and_reserved_domains_stay(text):
    assert scrub.scrub_text(text) == (text, {})


# --- the token families scanners know ---------------------------------------------------------------


@pytest.mark.parametrize(
    "secret, kind",
    [
        ("glpat-" + "Ab1_" * 5, "api_key"),
        ("gldt-" + "x1" * 10, "api_key"),
        ("glrt-" + "x1" * 10, "api_key"),
        ("xox" + "b-123456789012-1234567890123-" + "Ab" * 12, "api_key"),
        ("xox" + "p-123456789012-1234567890123-" + "Ab" * 12, "api_key"),
        ("xox" + "a-2-123456789012-" + "Ab" * 12, "api_key"),
        ("xox" + "r-123456789012-" + "Ab" * 12, "api_key"),
        ("xap" + "p-1-A0123456789-1234567890123-" + HEX64, "api_key"),  # Slack app-level token
        ("sk" + "_live_" + "a1B2" * 6, "api_key"),
        ("sk" + "_test_" + "a1B2" * 6, "api_key"),
        ("rk" + "_live_" + "a1B2" * 6, "api_key"),
        ("rk" + "_test_" + "a1B2" * 6, "api_key"),
        ("SK" + HEX32, "api_key"),  # Twilio API key
        (
            "SG" + "." + "a1B2c3D4e5F6g7H8i9J0kL" + "." + "a1B2c3D4e5F6g7H8i9J0kL" + "m1N2o3P4q5R6s7T8u9V0w",
            "api_key",
        ),
        ("npm" + "_" + ALNUM36, "api_key"),
        ("pypi" + "-AgEIcHlwaS5vcmc" + "CJGI4YmNhMjY3LTgwYzQtNDRlZi04Mzk0LTQ1NjYxNmIzYmRmOQAC", "api_key"),
        ("dckr" + "_pat_" + "a1B2c3D4e5F6g7H8i9J0k-L_m1N", "api_key"),
        ("dop" + "_v1_" + HEX64, "api_key"),
        ("doo" + "_v1_" + HEX64, "api_key"),
        ("dor" + "_v1_" + HEX64, "api_key"),
        ("shpat" + "_" + HEX32, "api_key"),
        ("shpca" + "_" + HEX32, "api_key"),
        ("shppa" + "_" + HEX32, "api_key"),
        ("shpss" + "_" + HEX32, "api_key"),
        ("dapi" + HEX32, "api_key"),  # Databricks
        ("AIza" + "Sy" + "a1B2c3D4e5" * 3 + "_-x", "api_key"),
        ("AKIA" + "Z" * 16, "api_key"),
        ("ASIA" + "Z" * 16, "api_key"),
        ("ABIA" + "Z" * 16, "api_key"),
        ("ACCA" + "Z" * 16, "api_key"),
        ("sk" + "-proj-" + "a1B2_c3D4-" * 8, "api_key"),  # OpenAI project key
        ("sk" + "-svcacct-" + "a1B2_c3D4-" * 8, "api_key"),
        ("sk" + "-" + "a1B2c3" * 8, "api_key"),  # OpenAI legacy, 48
        ("sk" + "-ant-api03-" + "a1B2_c3D4-" * 9 + "AA", "api_key"),  # Anthropic
        ("sk" + "-ant-admin01-" + "a1B2_c3D4-" * 9 + "AA", "api_key"),
        ("hf" + "_" + "aBcDeFgHiJ" * 3 + "kLmN", "api_key"),  # Hugging Face, 34 letters
        ("eyJhbGciOiJIUzI1NiJ9" + "." + "eyJzdWIiOiIxMjM0In0" + "." + "c2lnbmF0dXJlX2hlcmU", "token"),
    ],
)
def test_each_scanner_token_family_is_caught(secret, kind):
    placeholder = scrub.PLACEHOLDERS[kind]
    assert scrub.scrub_text(f"x = '{secret}'")[1] == {kind: 1}
    assert secret not in scrubbed(f"x = '{secret}'") and placeholder in scrubbed(f"x = '{secret}'")


def test_a_slack_webhook_keeps_its_host():
    hook = "https://hooks.slack.com/services/" + "T0000000A/B0000000B/" + "X" * 24
    assert scrub.scrub_text(f"H = '{hook}'") == ("H = 'https://hooks.slack.com/<API_KEY>'", {"api_key": 1})


def test_a_twilio_account_sid_goes_only_with_context():
    sid = "AC" + HEX32
    assert scrub.scrub_text(f"TWILIO_ACCOUNT_SID = '{sid}'") == (
        "TWILIO_ACCOUNT_SID = '<API_KEY>'",
        {"api_key": 1},
    )
    assert scrub.scrub_text(f"x = '{sid}'") == (f"x = '{sid}'", {})


def test_a_stripe_publishable_test_key_is_public_and_stays():
    text = "pk = '" + "pk" + "_test_" + "a1B2" * 6 + "'"
    assert scrub.scrub_text(text) == (text, {})


@pytest.mark.parametrize(
    "conn",
    [
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey="
        + "a1B2+c3D/" * 9
        + "ab==;EndpointSuffix=core",
        "AccountName=acct;AccountKey=" + "a1B2+c3D/" * 9 + "ab==",
    ],
)
def test_an_azure_storage_account_key_goes_and_the_connection_string_stays(conn):
    text, counts = scrub.scrub_text(f"CONN = '{conn}'")
    assert counts == {"api_key": 1} and "AccountKey=<API_KEY>" in text and "AccountName=acct" in text


@pytest.mark.parametrize("kind", ["RSA ", "EC ", "DSA ", "OPENSSH ", "ENCRYPTED ", "", "PGP "])
def test_private_keys_of_every_pem_kind_go(kind):
    block_word = " BLOCK" if kind == "PGP " else ""
    block = f"-----BEGIN {kind}PRIVATE KEY{block_word}-----\nMIIEow\nIBAAK\n-----END {kind}PRIVATE KEY{block_word}-----"
    assert scrub.scrub_text(f'K = """{block}"""\nx = 1') == (
        'K = """<PRIVATE_KEY>"""\nx = 1',
        {"private_key": 1},
    )


def test_the_kinds_stay_the_report_schema():
    assert scrub.KINDS == ("private_key", "api_key", "token", "credentials", "password", "email")
    assert {rule.kind for rule in scrub.RULES} == set(scrub.KINDS)


# --- linear time -------------------------------------------------------------------------------------


def test_every_rule_takes_linear_time_on_a_long_line():
    """A minified or generated file is one long line; each rule's trigger many times on it, with
    the runs of word, dot and base64 characters a backtracking pattern would rescan."""
    triggers = [
        "AKIA",
        AWS_ID,
        "ASIA",
        "aws_secret_access_key=",
        "password",
        "password: ",
        "DB_PASSWORD=",
        "a.b.c.d.e.f.g.h.password",
        "user@",
        "@host.",
        "a@b.c.d.e.f",
        "://",
        "x://u:",
        "ghp_",
        "github_pat_",
        "glpat-",
        "-----BEGIN ",
        "-----BEGIN RSA PRIVATE KEY",  # a whole header with no END would take the rest of the text
        "eyJ",
        "eyJabcdefgh.eyJ",
        "sk-",
        "sk_live_",
        "xox",
        "xapp-",
        "hooks.slack.com/",
        "AccountKey=",
        "SG.",
        "dapi",
        "TWILIO",
        "AC",
        "AIza",
        "hf_",
    ]
    unit = " ".join(triggers) + " " + "aB3/" * 30 + " " + "word" * 40 + " " + "a.b" * 40 + " "
    text = unit * (5_000_000 // len(unit))
    start = time.perf_counter()
    scrub.scrub_text(text)
    seconds = time.perf_counter() - start
    print(f"scrub_text on a {len(text) / 1e6:.1f} MB line: {seconds:.2f} s")
    assert seconds < 10
