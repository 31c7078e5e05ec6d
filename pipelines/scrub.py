"""Secrets and personal data: replaced by typed placeholders in the curated text, and counted.

A model trained on a secret can complete it for anyone, so curated text never holds one. The
patterns are the high-precision kind secret scanners use (vendor key formats, private-key
blocks, JWTs, emails); a generic "long random string" rule would also eat hashes and test
vectors, which are ordinary code. The placeholders keep the shape of the code readable:

    scrub_text('key = "AKIAIOSFODNN7EXAMPLE"')  ->  ('key = "<API_KEY>"', {"api_key": 1})
"""

import re

# kind -> (placeholder, pattern). Private keys first: their base64 body must not be matched as
# anything else. Order matters only where patterns could overlap.
PATTERNS: dict[str, tuple[str, re.Pattern]] = {
    "private_key": (
        "<PRIVATE_KEY>",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
            re.DOTALL,
        ),
    ),
    "api_key": (
        "<API_KEY>",
        re.compile(
            r"\b(?:"
            r"(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
            r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub tokens
            r"|github_pat_[A-Za-z0-9_]{40,}"
            r"|glpat-[A-Za-z0-9_-]{20}"  # GitLab
            r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
            r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
            r"|sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
            r"|(?:sk|rk|pk)_live_[A-Za-z0-9]{16,}"  # Stripe
            r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
            r")\b"
        ),
    ),
    "token": (
        "<TOKEN>",
        re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
    ),
    "email": (
        "<EMAIL>",
        re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"),
    ),
}
KINDS = tuple(PATTERNS)


# A literal every match of the kind holds: most documents skip the regex scan altogether.
REQUIRED = {"private_key": "PRIVATE KEY-----", "token": "eyJ", "email": "@"}


def scrub_text(text: str) -> tuple[str, dict[str, int]]:
    """(text with every match replaced by its kind's placeholder, matches per kind found)."""
    counts = {}
    for kind, (placeholder, pattern) in PATTERNS.items():
        if kind in REQUIRED and REQUIRED[kind] not in text:
            continue
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[kind] = n
    return text, counts
