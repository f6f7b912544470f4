"""The board room's command (`tuneforge board`), registered on the `tuneforge` app by cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def register(app) -> None:
    """Add this room's commands to `app`."""
    import typer

    @app.command()
    def board(
        runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of run directories the board lists, and where "
                                  "the runs it starts go (created if missing)."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but a local address needs "
                                 "--allow-remote and --token."),
        port: int = typer.Option(8765, min=0, max=65535, help="Port to listen on (0: any free port)."),
        allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-local --host (with --token): "
                                          "whoever has the token can start runs on this machine."),
        token: Optional[str] = typer.Option(None, help="Access token every request must carry (open the printed "
                                            "address once; the page keeps it). Required with --allow-remote.",
                                            envvar="TUNEFORGE_BOARD_TOKEN"),
    ):
        """The whole workflow in a web page: build a recipe (live checks, doctor, plan), recommend, launch and watch
        runs, compare them, chat with base vs tuned, merge / export / serve."""
        from tuneforge.board.security import check_bind, is_local_host

        check_bind(host, allow_remote=allow_remote, token=token)
        serve_board(runs, host=host, port=port, token=token, remote=not is_local_host(host), cli_app=app)


def serve_board(runs: Path, *, host: str, port: int, token: str | None, remote: bool, cli_app) -> None:
    """Start the web server (uvicorn) until Ctrl-C. Runs the board started keep running after it stops."""
    import socket

    import uvicorn

    from tuneforge.board.app import create_app
    from tuneforge.board.state import BoardError, BoardState

    if runs.exists() and not runs.is_dir():
        raise BoardError(f"--runs {runs} is a file, not a folder", fix="pass the folder that holds run directories")
    runs.mkdir(parents=True, exist_ok=True)
    state = BoardState(runs_dir=runs, token=token, remote=remote, cli_app=cli_app)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise BoardError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                         fix="choose another --port (or --port 0 for any free one)") from None
    sock.listen(128)  # connections made from now on wait for the server instead of being refused
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False)
    print(f"tuneforge board: {url}  (runs: {state.runs_dir}; Ctrl-C stops the board, not its runs)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
