"""Secrets and personal data: replaced by typed placeholders in the curated text, and counted.

A model trained on a secret can complete it for anyone, so curated text never holds one. The
patterns are the high-precision kind secret scanners use (vendor key formats, private-key
blocks, JWTs, credentials in URLs and password assignments, emails); a generic "long random
string" rule would also eat hashes and test vectors, which are ordinary code. Where the
secret sits inside code, only the secret goes; the code around it stays readable:

    scrub_text('key = "AKIAIOSFODNN7EXAMPLE"')  ->  ('key = "<API_KEY>"', {"api_key": 1})
    scrub_text('DB = "postgres://bob:hunter2@db:5432"')
        ->  ('DB = "postgres://<CREDENTIALS>@db:5432"', {"credentials": 1})

Covered, after gitleaks' default rules, GitHub's secret-scanning partner patterns and
detect-secrets' plugins, each mapped to one of the six KINDS (the curation report's schema):
- private_key: PEM blocks of every kind (RSA, EC, DSA, OPENSSH, ENCRYPTED, PKCS#8) and PGP's.
- api_key: AWS key ids (AKIA, ASIA, ABIA, ACCA) and secret keys (near a key id, or assigned to a
  name such as aws_secret_access_key); GitHub (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_); GitLab
  (glpat-, gldt-, glrt-, ... and GR1348941); Slack (xoxb-, xoxp-, xoxa-, xoxr-, xoxe-, xapp-,
  hooks.slack.com webhooks); Stripe (sk_/rk_ live and test, pk_live_; pk_test_ is public and
  stays); Twilio (SK keys; AC account SIDs on a line naming twilio or a SID); SendGrid; npm; PyPI;
  Docker Hub; DigitalOcean; Shopify; Databricks; Azure storage AccountKey / SharedAccessKey;
  Google (AIza); OpenAI (sk-, sk-proj-, sk-svcacct-); Anthropic (sk-ant-); Hugging Face (hf_).
- token: JWTs. credentials: scheme://user:password@host, the user possibly empty.
- password: quoted password assignments in code, unquoted ones in YAML, .env and shell files.
- email: an address under any delegated top-level domain (tlds.py).

Hand-written patterns rather than detect-secrets: it is not a dependency here; it reports
findings per line rather than replacing spans, and its entropy plugins flag hashes and test
vectors, which in a code corpus are ordinary text. Its and gitleaks' formats are the source of
the patterns below. Every rule runs in time linear in the text (see Rule), so one long line
(minified or generated code) costs what many short ones do.

Your own formats (curate.scrub_patterns: name -> regular expression) run after the private-key
rule and before the others, each match replaced by <NAME> and counted under its name:

    scrub_text('token = "corp_live_0123"', {"corp_token": r"corp_live_\d{4}"})
        ->  ('token = "<CORP_TOKEN>"', {"corp_token": 1})

They run as written, in Python's re like the rules here: the linear-time guarantee above is the
built-in rules'. A user pattern with nested repeats ((a+)+, (\w+\s?)*) can backtrack for time
exponential in a line's length; bound repeats, or use possessive (a++) and atomic ((?>...)) forms.

scrub_spans also says where each placeholder stands in the scrubbed text and what it replaced
(the memorization check's input; the curate stage keeps only lengths and hashes of the latter).

Run by the curate stage: `trainpipe curate` (`dvc repro curate`).
"""

import bisect
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipelines.core.tlds import TLDS

PLACEHOLDERS = {
    "private_key": "<PRIVATE_KEY>",
    "api_key": "<API_KEY>",
    "token": "<TOKEN>",
    "credentials": "<CREDENTIALS>",
    "password": "<PASSWORD>",
    "email": "<EMAIL>",
}
KINDS = tuple(PLACEHOLDERS)
# A name of one's own format: its placeholder is <NAME>, its count a key of the curation report and
# part of an MLflow metric's name.
PATTERN_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
# Where an empty match of a pattern shows, if the regex parser cannot say (_shortest_match).
_EMPTY_PROBES = ("", " ", "a", "a a", "0_x\n", "<x>")
# How far a rule with `near` looks from each match of its anchor: this many lines either way,
# and never more than REACH characters (a minified file is one long line).
NEAR_LINES, REACH = 3, 1024


@dataclass(frozen=True)
class Rule:
    """One pattern of one kind. A pattern with a group named "secret" replaces only that group.

    literals: the pattern runs only on a text holding one of them (most texts hold none, and
    `in` is ~50x faster than a regex scan); none for a pattern that starts with a literal, which
    the regex engine finds as fast as `in` does. per_line: matches never span lines, so the pattern
    runs only on the lines holding a literal: "@" and "password" are common in code, and a
    scan of those lines alone is what keeps the email and password rules fast. near: the pattern
    runs only within NEAR_LINES lines (REACH characters) of a match of this one. accept: a match
    it returns False for is left as it is (a template, or code that only looks like a secret).

    Every quantifier that can repeat is bounded or starts at a literal that cannot recur inside
    what it repeats, so each rule takes time linear in the text, however long its lines.
    """

    kind: str
    pattern: re.Pattern
    literals: tuple[str, ...]
    per_line: bool = False
    near: re.Pattern | None = None
    accept: Callable[[re.Match], bool] | None = None

    @property
    def placeholder(self) -> str:
        return placeholder_of(self.kind)


def placeholder_of(kind: str) -> str:
    """<API_KEY> for a built-in kind, <CORP_TOKEN> for a format named corp_token."""
    return PLACEHOLDERS.get(kind) or f"<{kind.upper()}>"


def check_pattern(name: str, pattern: str) -> re.Pattern:
    """One of curate.scrub_patterns compiled, or a one-line ValueError naming it: a name that is not
    lower-case snake case or is a built-in kind, a pattern that does not compile, or one that can
    match the empty string (it would put a placeholder between every two characters)."""
    if not isinstance(name, str) or not PATTERN_NAME.fullmatch(name):
        raise ValueError(
            f"pattern name {name!r} must be lower-case letters, digits and _, starting with a letter "
            "(at most 40): it names the placeholder <NAME> and a count"
        )
    if name in PLACEHOLDERS:
        raise ValueError(f"pattern name {name!r} is a built-in kind ({', '.join(KINDS)}): choose another")
    try:
        compiled = re.compile(pattern)
    except (re.error, TypeError, ValueError, OverflowError, RecursionError) as exc:
        reason = " ".join(str(exc).split())
        raise ValueError(f"pattern {name} {pattern!r} is not a valid regular expression ({reason})") from None
    if _shortest_match(pattern, compiled.groupindex.get("secret")) == 0:
        what = "its secret group can" if "secret" in compiled.groupindex else "it can"
        raise ValueError(
            f"pattern {name} {pattern!r} matches the empty string ({what} match nothing, as a*, x| "
            r"or \b do): it must match at least one character"
        )
    return compiled


def _shortest_match(pattern: str, group: int | None = None) -> int:
    """The fewest characters the pattern (or its group number `group`) can match: the lower bound
    the regex parser computes (lookarounds and \b count 0), so 0 whenever an empty match is
    possible. Where the parser (a private module of re) is missing, probes a few strings instead."""
    try:
        from re import _parser
    except ImportError:  # pragma: no cover -- CPython 3.11+ has it
        compiled = re.compile(pattern)
        spans = [
            m.span(group) if group is not None and m.group(group) is not None else m.span()
            for probe in _EMPTY_PROBES
            for m in compiled.finditer(probe)
        ]
        return 0 if any(a == b for a, b in spans) else 1
    parsed = _parser.parse(pattern)
    if group is None:
        return parsed.getwidth()[0]
    found = _group_pattern(parsed, group)
    return parsed.getwidth()[0] if found is None else found.getwidth()[0]


def _group_pattern(node, group: int):
    """The parsed subpattern of group number `group` inside a parsed pattern, or None."""
    from re import _constants, _parser

    for op, av in node.data if isinstance(node, _parser.SubPattern) else ():
        if op is _constants.SUBPATTERN and av[0] == group:
            return av[3]
        for part in av if isinstance(av, tuple | list) else (av,):
            for child in part if isinstance(part, list) else (part,):
                found = _group_pattern(child, group) if isinstance(child, _parser.SubPattern) else None
                if found is not None:  # an empty subpattern is falsy
                    return found
    return None


@functools.lru_cache(maxsize=16)
def _rules_with(patterns: tuple[tuple[str, str], ...], builtin: bool) -> tuple[Rule, ...]:
    custom = tuple(Rule(name, check_pattern(name, pattern), ()) for name, pattern in patterns)
    if not builtin:
        return custom
    return RULES[:1] + custom + RULES[1:]  # after the private-key blocks, before the rest


def rules_for(patterns: Mapping[str, str] | None = None, builtin: bool = True) -> tuple[Rule, ...]:
    """The rules a scrub runs: the built-in ones (unless builtin is False) and one per pattern of
    one's own, which run after the private-key rule (whose blocks they must not split) and before
    the rest (whose wider formats must not take their matches: sk-corp-... stays a corp_token)."""
    return _rules_with(tuple(sorted((patterns or {}).items())), builtin)


# An email ends in a delegated top-level domain (tlds.TLDS, 1,319 of them): that tells
# `guido@python.org` and `jane@example.tech` from email-shaped fixtures (`person@dom.ain`) and from
# the reserved test domains of RFC 2606 and 6761 (`.test`, `.invalid`, `.localhost`, `.example`).
# Some delegated names are also code (`a@self.weight` is matmul; `x@w.data`): outside the
# generic and country-code domains in wide use, _is_email asks the address not to read as code.
GENERIC_TLDS = "com org net edu gov mil int info biz name pro aero coop museum mobi app dev io ai".split()
COUNTRY_TLDS = (
    "ac ad ae af ag ai al am ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bm bn bo br bs bt bw by bz "
    "ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj dk dm do dz ec ee eg er es et eu fi fj fk "
    "fm fo fr ga gd ge gf gg gh gi gl gm gn gp gq gr gs gt gu gw gy hk hm hn hr ht hu id ie il im in io iq ir "
    "is it je jm jo jp ke kg kh ki km kn kp kr kw ky kz la lb lc li lk lr ls lt lu lv ly ma mc md me mg mh mk "
    "ml mm mn mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl no np nr nu nz om pa pe pf pg ph pk pl "
    "pm pn pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg sh si sk sl sm sn so sr ss st su sv sx sy sz tc "
    "td tf tg th tj tk tl tm tn to tr tt tv tw tz ua ug uk us uy uz va vc ve vg vi vn vu wf ws ye yt za zm zw"
).split()
WIDE_USE_TLDS = frozenset(GENERIC_TLDS + COUNTRY_TLDS)
# Attributes a matrix product ends in that are shaped like a top-level domain.
_TENSOR_ATTRIBUTES = frozenset("weight bias data grad real imag value values state mt mh".split())
_CODE_NAMES = frozenset("self cls".split())
# Names a password hides behind, in any case: db_password, self.PASSWD, pwd2. A name that goes on
# after the word holds something else (password_prompt, MODULE_PWD_STATE, password_file).
_PASSWORD_WORD = r"(?:password|passwd|passphrase|pwd)\d{0,4}\b"
_PASSWORD_NAME = r"(?:[A-Za-z_][\w.]{0,60}?)?" + _PASSWORD_WORD
# 40 base64 characters in both letter cases: the shape of an AWS secret access key (a hash or a
# hex digest has one case). Alone, too common to call a secret: it needs a key id near, or a name.
_AWS_SECRET = (
    r"(?<![A-Za-z0-9/+])(?P<secret>(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[A-Z])"
    r"[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)
_AWS_KEY_ID = r"A(?:KIA|SIA|BIA|CCA)[0-9A-Z]{16}"
# An unquoted value that is code or a template, not a password: a type, a constant, a YAML tag or
# alias, a variable, a call, an index.
_NOT_A_VALUE = frozenset(
    "none null nil true false yes no on off str bytes string secretstr secretbytes any optional required".split()
)


def _vendor_key(prefix: str, body: str) -> Rule:
    """A vendor's key format: its literal prefix (which keeps the scan fast: the regex engine
    searches for a leading literal in C), not glued to a longer word, and the whole token,
    however long: a longer token is no less a secret."""
    literal = re.escape(prefix)
    return Rule("api_key", re.compile(rf"{literal}(?<![\w-]{literal}){body}(?![\w-])"), ())


def _is_email(match: re.Match) -> bool:
    """A delegated top-level domain; outside the ones in wide use, an address that is not code."""
    labels = match.group("domain").lower().split(".")
    tld = labels[-1]
    if tld in WIDE_USE_TLDS:
        return True
    return (
        tld in TLDS and tld not in _TENSOR_ATTRIBUTES and len(labels[-2]) > 1 and labels[0] not in _CODE_NAMES
    )


def _names_twilio(match: re.Match) -> bool:
    """The match's line says "twilio" or "sid", in any case."""
    text, end = match.string, match.string.find("\n", match.end())
    line = text[text.rfind("\n", 0, match.start()) + 1 : len(text) if end == -1 else end].lower()
    return "twilio" in line or "sid" in line


def _is_url_password(match: re.Match) -> bool:
    """Not a template: %s, %(password)s, {password}, $PASSWORD, ${PASSWORD}, <password>; a
    percent-encoded character (%40) and a `$` inside a password (pa$$w0rd) are not templates."""
    password = match.group("secret").partition(":")[2]
    return not (re.search(r"[{}<>]|%(?![0-9A-Fa-f]{2})", password) or re.fullmatch(r"\$\w+", password))


def _is_unquoted_password(match: re.Match) -> bool:
    """An unquoted value in YAML, .env or a shell file, unless it is code or a template."""
    value = match.group("secret")
    return not (
        value.lower() in _NOT_A_VALUE
        or value[0] in "!&*$%{[(<>|~@`\\"
        or any(c in value for c in "()[]{}`")
        or value.endswith((",", ";"))
        or re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", value)  # a dotted name: config.password
        or re.fullmatch(_PASSWORD_NAME, value, re.IGNORECASE)  # password=password
    )


RULES: tuple[Rule, ...] = (
    # Private keys first: their base64 body must not be matched as anything else. PEM blocks of
    # any key type (RSA, EC, DSA, OPENSSH, ENCRYPTED, none) and PGP's "PRIVATE KEY BLOCK"; a block
    # cut off before its END line still goes.
    Rule(
        "private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,4}PRIVATE KEY(?: BLOCK)?-----.*?"
            r"(?:-----END (?:[A-Z0-9]{1,20} ){0,4}PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.DOTALL,
        ),
        (),
    ),
    # An AWS secret access key assigned to a name that says so (aws_secret_access_key,
    # AWS_SECRET_ACCESS_KEY, "SecretAccessKey", aws_key), wherever its key id is. "aws" alone is
    # no literal: it is in draws, laws and flaws, and the lines holding those cost time.
    Rule(
        "api_key",
        re.compile(
            r"(?i:(?:aws_|secret)[\w.-]{0,40}?key\w{0,20})['\"]?[ \t]{0,20}[:=][ \t]{0,20}"
            r"[rbuRBU]?['\"]?" + _AWS_SECRET
        ),
        ("ecret", "ECRET", "aws_", "AWS_"),
        per_line=True,
    ),
    # ... or within a few lines of an access key id, either side. Before the api_key rule, which
    # replaces the id this rule looks for.
    Rule(
        "api_key",
        re.compile(_AWS_SECRET),
        (),
        near=re.compile(_AWS_KEY_ID),
    ),
    *(
        _vendor_key(prefix, body)
        for prefix, body in (
            # AWS access key ids: long-term, temporary (STS), Bedrock, and Route 53 / CloudFront
            ("A", "(?:KIA|SIA|BIA|CCA)[0-9A-Z]{16}"),
            # GitHub: personal (classic), OAuth, user-to-server, server-to-server and refresh
            # tokens; fine-grained personal tokens (82 characters after the prefix)
            ("gh", "[pousr]_[A-Za-z0-9]{36,}"),
            ("github_pat_", "[A-Za-z0-9_]{40,}"),
            # GitLab: personal, deploy, runner, CI job, trigger, feed, mail, agent, OAuth, SCIM,
            # feature-flag and workspace tokens; the newer routable ones are longer and end in
            # ".<version>.<crc>"
            (
                "gl",
                "(?:pat|dt|rt|rtr|cbt|ptt|ft|imt|agent|oas|soat|ffct|wt)-[A-Za-z0-9_-]{20,}"
                "(?:\\.[0-9a-z]{2}\\.[0-9a-z]{7,9})?",
            ),
            ("GR1348941", "[A-Za-z0-9_-]{20,}"),  # GitLab runner registration token
            ("pypi-AgE", "[A-Za-z0-9_-]{50,}"),  # PyPI upload token (a macaroon; pypi and test.pypi)
            # Slack: bot, user, app, refresh, workspace and configuration tokens; app-level tokens
            ("xox", "(?:[abposre]|e\\.xox[bp])-[A-Za-z0-9-]{10,}"),
            ("xapp-", "[0-9]-[A-Za-z0-9-]{10,}"),
            ("AIza", "[0-9A-Za-z_-]{35}"),  # Google API key
            # OpenAI (sk-proj-, sk-svcacct-, sk-admin-, the older sk- + 48) and Anthropic
            # (sk-ant-api03-, sk-ant-admin01-)
            ("sk-", "(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),
            ("hf_", "[A-Za-z0-9]{30,}"),  # Hugging Face
            ("SK", "[0-9a-fA-F]{32}"),  # Twilio API key
            ("SG.", "[\\w-]{22}\\.[\\w-]{43}"),  # SendGrid
            ("npm_", "[A-Za-z0-9]{36}"),  # npm access token
            ("dckr_pat_", "[A-Za-z0-9_-]{27,}"),  # Docker Hub personal access token
            ("do", "[opr]_v1_[a-f0-9]{64}"),  # DigitalOcean personal, OAuth and refresh tokens
            ("shp", "(?:at|ca|pa|ss)_[a-fA-F0-9]{32}"),  # Shopify access tokens and shared secret
            ("dapi", "[a-f0-9]{32}(?:-[0-9]{1,3})?"),  # Databricks
        )
    ),
    # Stripe secret and restricted keys, live and test (sk_live_, rk_test_, ...), and pk_live_;
    # the key's type stays readable, its body goes. pk_test_ is a publishable test key: public
    # by design, it stays.
    Rule(
        "api_key",
        re.compile(
            r"k_(?:live|test)_(?<=(?<![\w-])(?:[srp]k_live|[sr]k_test)_)(?P<secret>[A-Za-z0-9]{16,})(?![\w-])"
        ),
        (),
    ),
    # A Twilio account SID is an identifier, but on a line that says "twilio" or "sid" it is half
    # of a credential pair.
    Rule("api_key", re.compile(r"AC(?<![\w-]AC)[0-9a-f]{32}(?![\w-])"), (), accept=_names_twilio),
    # Azure storage (and Service Bus) connection strings: the key goes, the rest stays readable.
    Rule(
        "api_key",
        re.compile(
            r"(?:Account|SharedAccess)Key=(?<![\w-]AccountKey=)(?<![\w-]SharedAccessKey=)"
            r"(?P<secret>[A-Za-z0-9+/]{20,}={0,2})(?![A-Za-z0-9+/=])"
        ),
        ("Key=",),
    ),
    # A Slack incoming webhook is a URL that is its own credential: keep the host, drop the path.
    Rule(
        "api_key",
        re.compile(r"hooks\.slack\.com/(?P<secret>(?:services|workflows|triggers)/[A-Za-z0-9_/-]{20,})"),
        (),
    ),
    Rule(
        "token",
        re.compile(r"eyJ(?<![\w-]eyJ)[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
        (),
    ),
    # scheme://user:password@host, the user possibly empty (redis://:pw@host): keep the scheme and
    # the host, drop both credentials. A templated password (%s, {}, $VAR, <password>) is none.
    Rule(
        "credentials",
        re.compile(
            r"://(?<=[A-Za-z0-9+.-]://)(?P<secret>[^\s:/?#@'\"`]{0,128}:[^\s/?#@'\"`]{1,256})@(?=[\w.\[-])"
        ),
        (),
        accept=_is_url_password,
    ),
    # password = "...", "password": "...", password="..." (keyword), PASSWORD: str = "...": a
    # quoted, non-empty, non-templated literal.
    Rule(
        "password",
        re.compile(
            rf"(?i:{_PASSWORD_WORD})['\"]?[ \t]{{0,20}}(?::[ \t]{{0,20}}[\w.\[\]]{{1,60}}[ \t]{{0,20}})?"
            r"(?:=(?!=)|:)[ \t]{0,20}[rbuRBU]?(?P<q>['\"])(?P<secret>[^'\"\n\\%{}$<>]{1,256})(?P=q)"
        ),
        ("assw", "ASSW", "pwd", "PWD"),
        per_line=True,
    ),
    # Unquoted, a value is a password only where a config file sets it: a YAML key at the start of
    # its line (`password: hunter2`), an .env or shell assignment (`export DB_PASSWORD=hunter2`),
    # the value one word up to the end of the line or a comment. In Python the same shapes are an
    # annotation (`password: str`) or a keyword argument (`password=password,`): _is_unquoted_password.
    Rule(
        "password",
        re.compile(
            rf"^[ \t]{{0,40}}(?:-[ \t]{{1,4}}|export[ \t]{{1,4}})?(?i:{_PASSWORD_NAME})"
            r"(?::[ \t]{1,20}|=)(?P<secret>[^\s'\"#]{1,256})[ \t]{0,20}(?:#[^\n]{0,1000})?$"
        ),
        ("assw", "ASSW", "pwd", "PWD"),
        per_line=True,
        accept=_is_unquoted_password,
    ),
    Rule(
        "email",
        re.compile(
            r"(?<![\w.+%-])[A-Za-z0-9._%+-]{1,64}@(?P<domain>(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24})"
            r"(?![\w(-]|\.\w)"
        ),
        ("@",),
        per_line=True,
        accept=_is_email,
    ),
)


@dataclass(frozen=True)
class Span:
    """One placeholder of a scrubbed text: where it stands in the scrubbed text, its kind (or the
    name of one's own format) and the text it replaced."""

    offset: int
    kind: str
    removed: str


def scrub_text(
    text: str, patterns: Mapping[str, str] | None = None, builtin: bool = True
) -> tuple[str, dict[str, int]]:
    """(text with every secret replaced by its kind's placeholder, secrets found per kind).
    patterns: one's own formats, name -> regular expression (curate.scrub_patterns); builtin False
    leaves the built-in rules out."""
    text, counts, _ = scrub_spans(text, patterns, builtin)
    return text, counts


def scrub_spans(
    text: str, patterns: Mapping[str, str] | None = None, builtin: bool = True
) -> tuple[str, dict[str, int], list[Span]]:
    """scrub_text, and each placeholder of the result with the text it replaced, in text order.

    A rule's match that covers a placeholder an earlier rule left (a private-key block around a
    key of one's own format) replaces it too: its span's removed text is then the original text
    under both, and the inner one is no span of its own."""
    original, spans = text, _Spans()
    counts: dict[str, int] = {}
    lines_with: dict[tuple[str, ...], list[tuple[int, int]]] = {}  # per literals; valid while text is
    for rule in rules_for(patterns, builtin):
        if rule.per_line:  # finding the lines is the literal check: no `in` scan first
            if rule.literals not in lines_with:
                lines_with[rule.literals] = _literal_lines(rule.literals, text)
            edits = _edits_in(rule, text, lines_with[rule.literals])
        elif rule.literals and not any(literal in text for literal in rule.literals):
            continue
        elif rule.near is not None:
            edits = _edits_in(rule, text, _near_spans(rule.near, text))
        else:
            edits = _edits(rule, text)
        if edits:
            counts[rule.kind] = counts.get(rule.kind, 0) + len(edits)
            text = spans.replace(text, edits, rule.kind, rule.placeholder)
            lines_with.clear()
    return text, counts, [Span(cur, kind, original[a:b]) for cur, _, a, b, kind in spans.items]


def _edits(rule: Rule, text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) in text of what each accepted match of the rule in text[start:end] replaces:
    its "secret" group where it has one, else the whole match. Matches are found in the slice as
    if it were the whole text (^, $ and lookbehinds stop at its ends)."""
    piece = text if start == 0 and end is None else text[start:end]
    has_secret = "secret" in rule.pattern.groupindex
    edits = []
    for match in rule.pattern.finditer(piece):
        if rule.accept is not None and not rule.accept(match):
            continue
        a, b = match.span("secret") if has_secret and match.group("secret") is not None else match.span()
        if b > a:  # a zero-length match of one's own pattern replaces nothing
            edits.append((start + a, start + b))
    return edits


def _edits_in(rule: Rule, text: str, slices: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """_edits on each (start, end) slice of the text, in order and not overlapping; the rest is not scanned."""
    return [edit for start, end in slices for edit in _edits(rule, text, start, end)]


class _Spans:
    """The placeholders of a text being scrubbed: (start, end) in the current text and (start, end)
    of what they replaced in the original, sorted and disjoint. Kept through each rule's
    replacements in one merge of two sorted lists: time linear in the placeholders."""

    def __init__(self):
        self.items: list[
            tuple[int, int, int, int, str]
        ] = []  # cur_start, cur_end, orig_start, orig_end, kind

    def replace(self, text: str, edits: list[tuple[int, int]], kind: str, placeholder: str) -> str:
        """text with each (start, end) of edits (sorted, disjoint) replaced by placeholder; an edit
        that cuts into an earlier placeholder takes all of it."""
        starts = [item[0] for item in self.items]
        widened: list[list[int]] = []
        for a, b in edits:
            i = bisect.bisect_right(starts, a) - 1  # the placeholder at or before a
            if i >= 0 and self.items[i][1] > a:
                a = self.items[i][0]
            j = bisect.bisect_left(starts, b) - 1  # the last placeholder starting before b
            if j >= 0 and self.items[j][1] > b:
                b = self.items[j][1]
            if widened and a < widened[-1][1]:  # widening made it meet the previous edit
                widened[-1][1] = max(widened[-1][1], b)
            else:
                widened.append([a, b])
        pieces, items, done, shift, to_original, k = [], [], 0, 0, 0, 0
        for a, b in widened:
            while k < len(self.items) and self.items[k][1] <= a:  # placeholders before this edit
                cs, ce, os_, oe, kd = self.items[k]
                items.append((cs + shift, ce + shift, os_, oe, kd))
                to_original += (oe - os_) - (ce - cs)
                k += 1
            orig_start = a + to_original
            while k < len(self.items) and self.items[k][0] < b:  # placeholders it takes in
                cs, ce, os_, oe, _ = self.items[k]
                to_original += (oe - os_) - (ce - cs)
                k += 1
            pieces += [text[done:a], placeholder]
            items.append((a + shift, a + shift + len(placeholder), orig_start, b + to_original, kind))
            shift += len(placeholder) - (b - a)
            done = b
        for cs, ce, os_, oe, kd in self.items[k:]:
            items.append((cs + shift, ce + shift, os_, oe, kd))
        self.items = items
        return "".join(pieces) + text[done:]


def _literal_lines(literals: tuple[str, ...], text: str) -> list[tuple[int, int]]:
    """(start, end) of each line holding one of the literals."""
    spans = set()
    for literal in literals:
        at = text.find(literal)
        while at != -1:
            start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
            end = len(text) if end == -1 else end
            spans.add((start, end))
            at = text.find(literal, end)
    return sorted(spans)


def _near_spans(near: re.Pattern, text: str) -> list[tuple[int, int]]:
    """(start, end) of the NEAR_LINES lines either side of each match of near (at most REACH
    characters either way), overlapping spans merged."""
    spans: list[tuple[int, int]] = []
    for match in near.finditer(text):
        floor, ceiling = max(0, match.start() - REACH), min(len(text), match.end() + REACH)
        start = match.start()
        for _ in range(NEAR_LINES + 1):
            start = text.rfind("\n", floor, start)
            if start == -1:
                start = floor
                break
        else:
            start += 1
        end = match.end()
        for _ in range(NEAR_LINES + 1):
            at = text.find("\n", end, ceiling)
            if at == -1:
                end = ceiling
                break
            end = at + 1
        else:
            end -= 1
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans
