"""Secrets and personal data: replaced by typed placeholders in the curated text, and counted.

A model trained on a secret can complete it for anyone, so curated text never holds one. The
patterns are the high-precision kind secret scanners use (vendor key formats, private-key
blocks, JWTs, credentials in URLs and password assignments, emails); a generic "long random
string" rule would also eat hashes and test vectors, which are ordinary code. Where the
secret sits inside code, only the secret goes; the code around it stays readable:

    scrub_text('key = "AKIAIOSFODNN7EXAMPLE"')  ->  ('key = "<API_KEY>"', {"api_key": 1})
    scrub_text('DB = "postgres://bob:hunter2@db:5432"')
        ->  ('DB = "postgres://<CREDENTIALS>@db:5432"', {"credentials": 1})
"""

import re
from dataclasses import dataclass

PLACEHOLDERS = {
    "private_key": "<PRIVATE_KEY>",
    "api_key": "<API_KEY>",
    "token": "<TOKEN>",
    "credentials": "<CREDENTIALS>",
    "password": "<PASSWORD>",
    "email": "<EMAIL>",
}
KINDS = tuple(PLACEHOLDERS)


@dataclass(frozen=True)
class Rule:
    """One pattern of one kind. A pattern with a group named "secret" replaces only that group.

    literals: the pattern runs only on a text holding one of them (most texts hold none, and
    `in` is ~50x faster than a regex scan); none for a pattern that starts with a literal, which
    the regex engine finds as fast as `in` does. per_line: matches never span lines, so the pattern
    runs only on the lines holding a literal: "@" and "password" are common in code, and a
    scan of those lines alone is what keeps the email and password rules fast.
    """

    kind: str
    pattern: re.Pattern
    literals: tuple[str, ...]
    per_line: bool = False


# Top-level domains an email may end in: the generic ones in wide use and every country code.
# Requiring a delegated TLD is what tells `guido@python.org` from code such as `a@self.weight`
# (matmul on an attribute) or `x@w.to(dtype)`, and leaves the reserved test domains of RFC 2606
# and 6761 (`.test`, `.invalid`, `.localhost`) alone.
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
_TLD = "(?:" + "|".join(sorted(set(GENERIC_TLDS + COUNTRY_TLDS), key=lambda t: (-len(t), t))) + ")"
# Names a password hides behind, in any case: db_password, self.PASSWD, pwd2. A name that goes on
# after the word holds something else (password_prompt, MODULE_PWD_STATE, password_file).
_PASSWORD_NAME = r"(?:[A-Za-z_][\w.]*?)?(?:password|passwd|passphrase|pwd)\d*\b"


def _vendor_key(prefix: str, body: str) -> Rule:
    """A vendor's key format: its literal prefix (which keeps the scan fast: the regex engine
    searches for a leading literal in C), not glued to a longer word, and the whole token,
    however long: a longer token is no less a secret."""
    literal = re.escape(prefix)
    return Rule("api_key", re.compile(rf"{literal}(?<![\w-]{literal}){body}(?![\w-])"), ())


RULES: tuple[Rule, ...] = (
    # Private keys first: their base64 body must not be matched as anything else. PEM blocks of
    # any key type and PGP's "PRIVATE KEY BLOCK"; a block cut off before its END line still goes.
    Rule(
        "private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
            r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
            re.DOTALL,
        ),
        (),
    ),
    # An AWS secret access key (40 base64 characters, both letter cases) within a few lines of an
    # access key id: alone, 40 such characters are too common to call a secret. Before the api_key
    # rule, which replaces the id this rule looks for.
    Rule(
        "api_key",
        re.compile(
            r"(?:AKIA|ASIA)[0-9A-Z]{16}(?:.*\n){0,3}?.*?(?<![A-Za-z0-9/+=])(?P<secret>"
            r"(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[A-Z])[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
            r"|(?<![A-Za-z0-9/+=])(?P<before>(?=[A-Za-z0-9/+]{0,39}[a-z])(?=[A-Za-z0-9/+]{0,39}[A-Z])"
            r"[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])(?=(?:.*\n){0,3}?.*?(?:AKIA|ASIA)[0-9A-Z]{16})"
        ),
        ("AKIA", "ASIA"),
    ),
    *(
        _vendor_key(prefix, body)
        for prefix, body in (
            ("AKIA", "[0-9A-Z]{16}"),  # AWS access key id
            ("ASIA", "[0-9A-Z]{16}"),  # AWS temporary access key id
            ("gh", "(?:[pousr]_[A-Za-z0-9]{36,}|ithub_pat_[A-Za-z0-9_]{40,})"),  # GitHub tokens
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
            ("xox", "[abposr]-[A-Za-z0-9-]{10,}"),  # Slack
            ("AIza", "[0-9A-Za-z_-]{35}"),  # Google API key
            ("sk-", "(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI / Anthropic style
            ("hf_", "[A-Za-z0-9]{30,}"),  # Hugging Face
        )
    ),
    # Stripe: sk_live_, rk_live_, pk_live_; the key's type stays readable, its body goes.
    Rule(
        "api_key", re.compile(r"k_live_(?<=(?<![\w-])[srp]k_live_)(?P<secret>[A-Za-z0-9]{16,})(?![\w-])"), ()
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
    # scheme://user:password@host: keep the scheme and the host, drop both credentials. A
    # templated pair (%s, {}, $VAR, <user>) is no credential.
    Rule(
        "credentials",
        re.compile(
            r"\b[A-Za-z][A-Za-z0-9+.-]*://(?P<secret>[^\s:/?#@'\"%{}$<>]+:[^\s/?#@'\"%{}$<>]+)@(?=[\w.-])"
        ),
        ("://",),
        per_line=True,
    ),
    # password = "...", "password": "...", password="..." (keyword), PASSWORD: str = "...": a
    # quoted, non-empty, non-templated literal. Unquoted values are code (getpass(), a variable).
    Rule(
        "password",
        re.compile(
            rf"(?i:\b{_PASSWORD_NAME})['\"]?\s*(?::\s*[\w.\[\]]+\s*)?(?:=(?!=)|:)\s*[rbuRBU]?(?P<q>['\"])"
            r"(?P<secret>[^'\"\n\\%{}$<>]+)(?P=q)"
        ),
        ("assw", "ASSW", "pwd", "PWD"),
        per_line=True,
    ),
    Rule(
        "email",
        re.compile(
            r"(?<![\w.+%-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+"
            rf"{_TLD}(?![\w(-]|\.\w)",
            re.IGNORECASE,
        ),
        ("@",),
        per_line=True,
    ),
)


def scrub_text(text: str) -> tuple[str, dict[str, int]]:
    """(text with every secret replaced by its kind's placeholder, secrets found per kind)."""
    counts: dict[str, int] = {}
    for rule in RULES:
        if rule.literals and not any(literal in text for literal in rule.literals):
            continue
        text, n = (_sub_lines if rule.per_line else _sub)(rule, text)
        if n:
            counts[rule.kind] = counts.get(rule.kind, 0) + n
    return text, counts


def _sub(rule: Rule, text: str) -> tuple[str, int]:
    placeholder = PLACEHOLDERS[rule.kind]
    groups = rule.pattern.groupindex

    def replace(match: re.Match) -> str:
        for name in ("secret", "before"):  # the secret alone; what surrounds it stays
            if name in groups and match.group(name) is not None:
                start, end = match.span(name)
                whole = match.group()
                return whole[: start - match.start()] + placeholder + whole[end - match.start() :]
        return placeholder

    return rule.pattern.subn(replace, text)


def _sub_lines(rule: Rule, text: str) -> tuple[str, int]:
    """_sub on the lines that hold one of the rule's literals; the other lines are not scanned."""
    spans = set()
    for literal in rule.literals:
        at = text.find(literal)
        while at != -1:
            start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
            end = len(text) if end == -1 else end
            spans.add((start, end))
            at = text.find(literal, end)
    pieces, total, done = [], 0, 0
    for start, end in sorted(spans):
        line, n = _sub(rule, text[start:end])
        if n:
            pieces += [text[done:start], line]
            done, total = end, total + n
    return ("".join(pieces) + text[done:], total) if total else (text, 0)
