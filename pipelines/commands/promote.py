"""Move @champion by hand, and list its moves.

    trainpipe promote -S ... 7       # move @champion to version 7, past the gate
    trainpipe rollback               # move @champion back to the previous champion
    trainpipe history [--json]       # every move of @champion, oldest first

A move by hand is smoke-tested and recorded as the gate's are (pipelines.commands.promotion.move_champion);
rollback walks those records back to the latest champion that was not itself rolled back.
promote replaces whichever version serves when it moves (a person named the target); rollback
moves only if @champion is still the version it rolled back from, since that chose its target.
"""

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.adapters.registry import (
    champion_history,
    find_version,
    get_champion,
    get_tracking_uri,
    get_version,
    set_version_tags,
)
from pipelines.commands.promotion import move_champion, utc_now
from pipelines.core.errors import ConfigError
from pipelines.core.params import Params, PublishParams


def promote_version(params: Params, version: int | str) -> dict:
    """Move @champion to a given version (by hand, past the gate) and record the move."""
    client = MlflowClient()
    name = params.publish.model_name
    target = get_version(client, name, version)
    champion = get_champion(client, name)
    previous = str(champion.version) if champion else None
    version = str(target.version)
    if previous == version:
        promoted, reason = False, f"v{version} is already champion"
    else:
        reason = f"v{version} promoted by hand" + (f" (was v{previous})" if previous else "")
        move_champion(
            client,
            name,
            version,
            reason=reason,
            command="promote",
            smoke_timeout_s=params.serve.smoke_timeout_s,
        )
        promoted = True
    return {
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "previous_champion": previous,
        "champion_version": version,
        "promoted": promoted,
        "reason": reason,
    }


def rollback_champion(params: Params) -> dict:
    """Move @champion back to the most recent earlier champion that was not itself rolled back."""
    client = MlflowClient()
    name = params.publish.model_name
    champion = get_champion(client, name)
    if champion is None:
        raise ConfigError(f"no champion registered for model {name}: nothing to roll back")
    current = str(champion.version)
    history = [move["to"] for move in champion_history(client, name)]
    target = None
    for candidate in reversed(history):
        if candidate == current:
            continue
        version = find_version(client, name, candidate)
        if version is not None and "rolled_back_at" not in version.tags:
            target = version
            break
    if target is None:
        raise ConfigError(
            f"no earlier champion of model {name} to roll back to (champion v{current}, "
            f"history {','.join(history) or 'empty'})"
        )
    version = str(target.version)
    move_champion(
        client,
        name,
        version,
        reason=f"rolled back from v{current}",
        command="rollback",
        smoke_timeout_s=params.serve.smoke_timeout_s,
        # its target was chosen from v{current}: a newer champion is not rolled back unseen
        compared_with=current,
    )
    set_version_tags(client, name, current, {"rolled_back_at": utc_now()})
    return {
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "previous_champion": current,
        "champion_version": version,
        "promoted": True,
        "reason": f"rolled back champion from v{current} to v{version}",
    }


def read_history(publish: PublishParams) -> list[dict]:
    """Every move of the configured model's @champion, oldest first (`trainpipe history`), each
    with to_parent: the version its target was fine-tuned from (None: trained from scratch)."""
    name = publish.model_name
    client = MlflowClient()
    try:
        moves = champion_history(client, name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(
                f"no registered model {name} in {get_tracking_uri()}: nothing was published yet"
            ) from None
        raise
    parents: dict[str, str | None] = {}
    for move in moves:
        target = move.get("to")
        if target and target not in parents:
            found = find_version(client, name, target)  # None: deleted since
            parents[target] = found.tags.get("parent_version") if found else None
        move["to_parent"] = parents.get(target)
    return moves
