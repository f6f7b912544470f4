"""`tuneforge federated app RECIPE --output APP_DIR`: the Flower App folder that runs a federated recipe on Flower's
deployment engine (deployment.py).

  APP_DIR/pyproject.toml     [tool.flwr.app.components] names tuneforge's module-level ServerApp and ClientApp;
                             [tool.flwr.app.config] carries the recipe (its YAML text, every path absolute) and the
                             run directory the server writes
  APP_DIR/README.md          the commands for this App: the SuperLink, each SuperNode, flwr run
  APP_DIR/.flwr/config.toml  a Flower configuration with one SuperLink connection, `tuneforge` (used with
                             FLWR_HOME=APP_DIR/.flwr; Flower leaves .flwr/ out of the App bundle it sends)

The App bundle `flwr run` sends to every SuperNode holds pyproject.toml and README.md only: configuration, never
records (the clients' records stay on their machines, named by each SuperNode's --node-config).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import DataError, RunDirError

CONNECTION = "tuneforge"
MARK = "# written by tuneforge federated app"


@dataclass
class AppInfo:
    app_dir: Path
    run_dir: Path
    clients: int
    rounds: int
    superlink: str
    flwr_home: Path


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; non-ASCII kept as is, so no surrogate escapes)."""
    return json.dumps(value, ensure_ascii=False)


def _absolute(recipe) -> None:
    """Data and model paths made absolute, as the server and client processes Flower starts have their own cwd."""
    from tuneforge.recipe import resolve_path

    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        if isinstance(value, str):
            resolved = resolve_path(recipe, value)
            if resolved and Path(resolved).exists():
                setattr(recipe.data, key, str(Path(resolved).resolve()))
    name = recipe.model.name
    if isinstance(name, str) and not name.startswith("embedded:") and Path(name).exists():
        recipe.model.name = str(Path(name).resolve())


def pyproject(recipe, name: str, run_dir: Path) -> str:
    from tuneforge.recipe import recipe_to_yaml

    project = re.sub(r"[^a-z0-9-]+", "-", f"tuneforge-{name}".lower()).strip("-")[:60] or "tuneforge-app"
    return f"""{MARK}: the Flower App of recipe {name!r} (docs/federated.md)
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{project}"
version = "1.0.0"
description = "tuneforge federated fine-tuning of recipe {name} on Flower's deployment engine"
license = "Apache-2.0"
# tuneforge and flwr must be installed on the server and on every client machine (Flower's runtime dependency
# installation is not used: start flower-superlink with --disable-runtime-dependency-installation)
dependencies = []

[tool.flwr.app]
publisher = "tuneforge"

[tool.flwr.app.components]
serverapp = "tuneforge.federated.deployment:server_app"
clientapp = "tuneforge.federated.deployment:client_app"

[tool.flwr.app.config]
run-dir = {_toml_string(str(run_dir))}
recipe = {_toml_string(recipe_to_yaml(recipe))}
"""


def commands(info: AppInfo, *, flwr_home: bool = True) -> dict[str, str]:
    link_host = info.superlink.rsplit(":", 1)[0]
    fleet = f"{link_host}:9092"
    return {
        "server": "flower-superlink --insecure --disable-runtime-dependency-installation",
        "client": f"flower-supernode --insecure --superlink {fleet} --clientappio-api-address 127.0.0.1:9094 "
                  "--node-config \"train='/path/to/this-clients-records.jsonl'\"",
        "run": (f"FLWR_HOME={info.flwr_home} " if flwr_home else "")
        + f"flwr run {info.app_dir} {CONNECTION} --stream",
    }


def readme(info: AppInfo) -> str:
    c = commands(info)
    return f"""# tuneforge federated App

Written by `tuneforge federated app`. The server writes the run to `{info.run_dir}`.

1. On the server machine (it holds the global held-out set, data.eval):

       {c['server']}

2. On each of the {info.clients} client machines (each with its own records; `eval='...'` optional):

       {c['client']}

3. On the server machine (or wherever this folder is), start the {info.rounds}-round run:

       {c['run']}

`--insecure` sends everything unencrypted: use it only on a trusted network (or loopback); see Flower's docs for TLS
and SuperNode authentication. Details: tuneforge's docs/federated.md.
"""


def write_app(recipe_path, app_dir, *, run_dir=None, superlink: str = "127.0.0.1:9093", overrides=None,
              overwrite: bool = False) -> AppInfo:
    """Check the recipe for the deployment engine and write the App folder; nothing is written when a check fails."""
    from tuneforge.federated.checks import check_recipe
    from tuneforge.federated.deployment import check_deployable
    from tuneforge.recipe import load_recipe
    from tuneforge.run import check_output_path, run_path_for

    recipe = load_recipe(recipe_path, overrides or [])
    check_deployable(recipe)
    check_recipe(recipe)
    _absolute(recipe)
    if not Path(recipe.data.eval).is_file():
        raise DataError(f"the global held-out set {recipe.data.eval} does not exist", where="data.eval",
                        fix="the server scores every round on it: give data.eval as a file on the server's machine")
    run_dir = Path(run_dir or run_path_for(recipe, None)).resolve()
    try:
        check_output_path(run_dir, overwrite=False)
    except RunDirError as exc:
        raise RunDirError(exc.message, where="--run-dir",
                          fix="the server writes a new run directory: pass --run-dir NEW_FOLDER, or remove the "
                          "old run") from None
    if ":" not in superlink:
        raise DataError(f"--superlink {superlink!r} is not HOST:PORT", where="--superlink",
                        fix="give the SuperLink's Control API address, e.g. 10.0.0.5:9093")
    app_dir = Path(app_dir).resolve()
    project = app_dir / "pyproject.toml"
    if app_dir.exists() and any(app_dir.iterdir()):
        ours = project.is_file() and project.read_text(encoding="utf-8").startswith(MARK)
        if not (ours and overwrite):
            raise RunDirError(f"--output {app_dir} is not empty" + (" (an App written before)" if ours else ""),
                              fix="pass --overwrite to replace the App" if ours else "choose a new --output folder")
    info = AppInfo(app_dir, run_dir, recipe.federated.clients, recipe.federated.rounds, superlink,
                   app_dir / ".flwr")
    text = pyproject(recipe, recipe.name, run_dir)
    _validate(text, app_dir)
    (app_dir / ".flwr").mkdir(parents=True, exist_ok=True)
    project.write_text(text, encoding="utf-8")
    (app_dir / "README.md").write_text(readme(info), encoding="utf-8")
    (app_dir / ".flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = {_toml_string(superlink)}\n'
        "insecure = true\n", encoding="utf-8")
    return info


def _validate(text: str, app_dir: Path) -> None:
    """The pyproject as Flower's own check reads it (`flwr run` runs the same one)."""
    import tomllib

    from flwr.common.config import validate_config

    config = tomllib.loads(text)
    ok, errors, _warnings = validate_config(config, check_module=True, project_dir=app_dir)
    if not ok:
        raise RunDirError(f"Flower refuses the App's pyproject.toml: {'; '.join(errors)}",
                          fix="this is a bug in tuneforge's federated app writer: please report it")
