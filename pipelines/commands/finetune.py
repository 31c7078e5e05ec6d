"""Which registered version a fine-tune starts from.

    trainpipe finetune                    # from @champion
    trainpipe finetune --from 3           # from version 3 (or v3, or an alias: @challenger)

The command resolves the reference to a version number once, here, and writes it into params.yaml
as finetune.parent_version: the parent stage then pins that version's weights, and `dvc repro`
reproduces the same fine-tune whatever @champion names later.
"""

import re

from mlflow import MlflowClient

from pipelines.adapters.registry import find_version, get_tracking_uri, model_aliases
from pipelines.core.errors import ConfigError

VERSION_REF = re.compile(r"[vV]?(\d+)")
CHAMPION = "champion"


def resolve_parent(name: str, ref: str | None) -> int:
    """The version number ref names (None: @champion); a one-line ConfigError when there is none."""
    client = MlflowClient()
    aliases = model_aliases(client, name)
    if aliases is None:
        raise ConfigError(
            f"no registered model {name} in {get_tracking_uri()}: train one first with `trainpipe run`"
        )
    text = (ref or f"@{CHAMPION}").strip()
    number = VERSION_REF.fullmatch(text)
    if number:
        version = number[1]
    else:
        alias = text.removeprefix("@")
        if alias not in aliases:
            if alias == CHAMPION:
                raise ConfigError(
                    f"model {name} has no @champion to fine-tune from: name a version with --from"
                )
            have = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
            raise ConfigError(f"model {name} has no alias @{alias} (its aliases: {have})")
        version = aliases[alias]
    if find_version(client, name, version) is None:
        raise ConfigError(f"model {name} has no version {version} to fine-tune from")
    return int(version)
