"""Deploy buttons: `tuneforge merge`, `export` and `serve`, run as jobs (argument lists). Which of them exist, and
their options, are read from the `tuneforge` app's registered commands at request time, so commands added later
(export, serve) get their buttons and forms from their own declarations; a missing one says so plainly.

Every option value is checked before it is passed: a choice must be one of its choices, a number a number, a path
must lie under the runs folder (an input may also be an existing file); values are passed as `--option=value`
elements of the argument list, so a value can never become another option or a shell command."""

from __future__ import annotations

import re

from tuneforge.board.state import BoardError, BoardState, plain_value

DEPLOY_COMMANDS = {
    "merge": "Merge the LoRA adapter into the base weights: an ordinary checkpoint folder.",
    "export": "Export the tuned model for other runtimes (GGUF, Ollama, quantized).",
    "serve": "Serve the tuned model over HTTP (OpenAI-compatible).",
}
PATH_NAME = re.compile(r"(^|_)(output|out|dir|path|file|folder|dest|destination|json)($|_)")
# Not offered by a board started with --allow-remote: running code shipped with a model, opening a server to the network.
REFUSED_REMOTE = ("trust_remote_code", "allow_remote")


def _commands(state: BoardState) -> dict:
    import typer

    if state.cli_app is None:
        return {}
    command = typer.main.get_command(state.cli_app)
    return dict(getattr(command, "commands", None) or {command.name: command})  # an app of one command is that command


def _param_spec(param) -> dict:
    import click

    kind = "text"
    choices = None
    if getattr(param, "is_flag", False):
        kind = "flag"
    elif isinstance(param.type, click.Choice):
        kind, choices = "choice", [str(c) for c in param.type.choices]
    elif isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
        kind = "number"
    default = param.default if isinstance(param.default, (str, int, float, bool)) else None
    return {"name": param.name, "argument": isinstance(param, click.Argument), "kind": kind, "choices": choices,
            "required": bool(param.required), "default": default, "help": getattr(param, "help", None) or "",
            "path": _path_rule(param), "flag": param.opts[0] if param.opts else param.name}


def _path_rule(param) -> str | None:
    """"input" for a path the command requires to exist (an existing file anywhere, or a path in the runs folder),
    "output" for any other path (it may be written: inside the runs folder only), None for other values."""
    import click

    if isinstance(param.type, click.Path) and param.type.exists:
        return "input"
    if isinstance(param.type, click.Path) or PATH_NAME.search(param.name or ""):
        return "output"
    return None


def _visible_params(state: BoardState, command) -> list:
    params = [p for p in command.params if p.name != "help" and not getattr(p, "hidden", False)]
    if state.remote:
        params = [p for p in params if p.name not in REFUSED_REMOTE]
    return params


def _describe(state: BoardState, command) -> dict:
    import click

    if isinstance(command, click.Group):
        return {"available": True, "help": (command.help or "").strip(), "subcommands": {
            name: _describe(state, sub) for name, sub in command.commands.items()}}
    params = _visible_params(state, command)
    target = next((p for p in params if isinstance(p, click.Argument)), None)
    return {"available": True, "help": (command.help or "").strip().split("\n\n")[0],
            "target": target.name if target else None,
            "params": [_param_spec(p) for p in params if p is not target]}


def deploy_commands(state: BoardState) -> dict:
    """{merge|export|serve: {"available", "help", "params" | "subcommands"} or {"available": False, "message"}}."""
    registered = _commands(state)
    out = {}
    for name, purpose in DEPLOY_COMMANDS.items():
        if name in registered:
            out[name] = {"purpose": purpose, **_describe(state, registered[name])}
        else:
            out[name] = {"purpose": purpose, "available": False,
                         "message": f"`tuneforge {name}` is not available in this installation (no `{name}` command "
                                    f"is registered; `tuneforge --help` lists the commands). Update tuneforge to get it."}
    return out


def deploy_argv(state: BoardState, name: str, run_id: str, options: dict, subcommand: str | None = None) -> list[str]:
    """The argument list of `tuneforge NAME [SUBCOMMAND] RUN --option=value ...`, every value checked."""
    import click

    if name not in DEPLOY_COMMANDS:
        raise BoardError(f"unknown deploy command {name!r}; the board runs {', '.join(DEPLOY_COMMANDS)}")
    registered = _commands(state)
    if name not in registered:
        raise BoardError(deploy_commands(state)[name]["message"], status=404)
    command, words = registered[name], [name]
    if isinstance(command, click.Group):
        if subcommand not in command.commands:
            raise BoardError(f"tuneforge {name}: choose one of {', '.join(command.commands)}")
        command, words = command.commands[subcommand], [name, subcommand]
    if not isinstance(options, dict):
        raise BoardError("options must be a mapping of option name to value")
    run_path = state.run_path(run_id)
    params = _visible_params(state, command)
    known = {p.name: p for p in params}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BoardError(f"tuneforge {' '.join(words)} has no option {', '.join(unknown)}")
    target = next((p for p in params if isinstance(p, click.Argument)), None)
    argv, positional = [], [str(run_path)] if target is not None else []
    for param in params:
        if param is target:
            continue
        value = options.get(param.name)
        if getattr(param, "is_flag", False):
            if value is None:
                continue
            if not isinstance(value, bool):
                raise BoardError(f"{param.opts[0]}: a flag is on or off (true or false)")
            if value != bool(param.default):  # only what differs from the command's own default
                if value:
                    argv.append(param.opts[0])
                elif param.secondary_opts:
                    argv.append(param.secondary_opts[0])
            continue
        if value is None or value == "":
            if param.required:
                raise BoardError(f"tuneforge {' '.join(words)}: {param.name} is required")
            continue
        text = _checked_value(state, param, value)
        if isinstance(param, click.Argument):
            positional.append(text)
        else:
            argv.append(f"{next((o for o in param.opts if o.startswith('--')), param.opts[0])}={text}")
    return state.tuneforge_argv(*words, *argv, "--", *positional)


def _checked_value(state: BoardState, param, value) -> str:
    import click

    what = f"--{param.name.replace('_', '-')}"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BoardError(f"{what}: give text or a number")
    text = plain_value(str(value), what)
    if isinstance(param.type, click.Choice) and text not in [str(c) for c in param.type.choices]:
        raise BoardError(f"{what}: choose one of {', '.join(map(str, param.type.choices))} (got {text!r})")
    if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
        try:
            float(text)
        except ValueError:
            raise BoardError(f"{what}: a number is expected (got {text!r})") from None
    rule = _path_rule(param)
    if rule == "input":
        return str(state.output_or_input(text, what=what))
    if rule == "output":
        return str(state.under_runs(text, what=what))
    return text
