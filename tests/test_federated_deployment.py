"""Federated runs on Flower's deployment engine (src/tuneforge/federated/deployment.py, app.py): the SuperNode's
--node-config, the refusals, the App folder Flower accepts, and one end-to-end run with real processes on loopback
(a flower-superlink, two flower-supernodes each holding its own records file, `flwr run`, tiny model, 2 rounds)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from conftest import tiny_recipe

from tuneforge.errors import RecipeError, RunDirError

ROOT = Path(__file__).resolve().parent.parent
FEDERATED_DATA = ROOT / "data" / "federated" / "train.jsonl"
BIN = Path(sys.executable).parent


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shop_files(tmp_path_factory) -> dict:
    """Each client's own records (north: 8, east: 14, on separate 'machines'), and the server's global held-out set
    (4 records of each shop that neither client holds)."""
    rows = [json.loads(line) for line in FEDERATED_DATA.read_text(encoding="utf-8").splitlines()]
    north = [r for r in rows if r["shop"] == "north"]
    east = [r for r in rows if r["shop"] == "east"]
    root = tmp_path_factory.mktemp("deploy")
    return {"north": write_jsonl(root / "machine-north" / "records.jsonl", north[:8]),
            "east": write_jsonl(root / "machine-east" / "records.jsonl", east[:14]),
            "global": write_jsonl(root / "server" / "global.jsonl", north[20:24] + east[20:24]),
            "root": root}


def recipe_file(model_dir, files: dict, path: Path, federated: dict | None = None, **data) -> Path:
    """A tiny federated recipe. data.train names a pooled file that does not exist: nothing may read it."""
    import yaml

    recipe = tiny_recipe(model_dir, files["root"] / "no-pooled-records.jsonl")
    recipe["train"] = {k: v for k, v in recipe["train"].items() if k != "max_steps"}
    recipe["train"].update(scheduler="constant", report_to=[])
    recipe["data"].update({"eval": str(files["global"]), "eval_fraction": 0.25, **data})
    recipe["eval"].update(max_examples=2, max_new_tokens=4, few_shot=0, forgetting=False)
    recipe["federated"] = {"rounds": 2, "clients": 2, "local_steps": 1} if federated is None else federated
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def without_federated(path: Path) -> Path:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.pop("federated")
    out = path.with_name("no-section.yaml")
    out.write_text(yaml.safe_dump(data), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The pieces


def test_node_config_names_the_clients_own_files(shop_files, tmp_path):
    from tuneforge.federated.deployment import NodeConfigError, parse_node_config

    node = parse_node_config({"train": str(shop_files["north"])})
    assert (node.train, node.eval) == (shop_files["north"], None)
    node = parse_node_config({"train": str(shop_files["north"]), "eval": str(shop_files["global"])})
    assert node.eval == shop_files["global"]
    cases = [({}, "has no 'train' key", "train='/data/my-records.jsonl'"),
             ({"train": str(tmp_path / "gone.jsonl")}, "gone.jsonl does not exist", "restart the SuperNode"),
             ({"train": "records.jsonl"}, "relative path", "absolute path"),
             ({"train": str(shop_files["north"]), "eval": str(tmp_path / "held.jsonl")}, "eval: the records file",
              "eval='...'"),
             ({"train": 3}, "must be a file path in quotes", "quote the path"),
             ({"train": str(shop_files["north"]), "shard": 1}, "unknown key 'shard'", "--node-config")]
    for config, words, fix in cases:
        with pytest.raises(NodeConfigError) as info:
            parse_node_config(config)
        text = str(info.value)
        assert text.startswith("flower-supernode --node-config: ") and words in text and fix in text, text


def test_flowers_own_parser_gives_the_documented_flag(shop_files):
    """The --node-config string the docs show, as flower-supernode parses it."""
    from flwr.common.config import parse_config_args

    from tuneforge.federated.deployment import parse_node_config

    flag = f"train='{shop_files['north']}' eval=\"{shop_files['global']}\""
    node = parse_node_config(parse_config_args([flag]))
    assert (node.train, node.eval) == (shop_files["north"], shop_files["global"])


def test_the_app_refuses_recipes_the_deployment_engine_cannot_run(tiny_model_dir, shop_files, tmp_path):
    from tuneforge.federated.app import write_app

    plain = recipe_file(tiny_model_dir, shop_files, tmp_path / "plain.yaml")
    no_section = without_federated(plain)
    cases = [
        (no_section, RecipeError, "has no federated: section"),
        (recipe_file(tiny_model_dir, shop_files, tmp_path / "tenants.yaml",
                     {"mode": "per_tenant", "split": "field:shop"}), RecipeError, "`federated.mode`"),
        (recipe_file(tiny_model_dir, shop_files, tmp_path / "field.yaml", {"split": "field:shop"}), RecipeError,
         "number of SuperNodes"),
        (recipe_file(tiny_model_dir, shop_files, tmp_path / "no-eval.yaml", eval=None), RecipeError, "`data.eval`"),
        (recipe_file(tiny_model_dir, shop_files, tmp_path / "gone-eval.yaml", eval=str(tmp_path / "gone.jsonl")),
         Exception, "does not exist"),
    ]
    for number, (path, error, words) in enumerate(cases):
        output = tmp_path / f"app-{number}"
        with pytest.raises(error, match=words):
            write_app(path, output, run_dir=tmp_path / f"run-{number}")
        assert not output.exists()
    # an existing run directory is refused before anything is written
    existing = tmp_path / "existing-run"
    write_jsonl(existing / "metrics.jsonl", [{"step": 1}])
    with pytest.raises(RunDirError):
        write_app(plain, tmp_path / "app-x", run_dir=existing)
    assert not (tmp_path / "app-x").exists()


def test_the_app_folder_is_a_flower_app_carrying_the_recipe(tiny_model_dir, shop_files, tmp_path):
    from flwr.common.config import validate_config

    from tuneforge.federated.app import write_app
    from tuneforge.federated.deployment import recipe_from_run_config

    info = write_app(recipe_file(tiny_model_dir, shop_files, tmp_path / "r.yaml"), tmp_path / "app",
                     run_dir=tmp_path / "run", superlink="127.0.0.1:19093", overrides=["federated.rounds=3"])
    config = tomllib.loads((info.app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    assert validate_config(config, check_module=True, project_dir=info.app_dir)[0]
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "tuneforge.federated.deployment:server_app",
                          "clientapp": "tuneforge.federated.deployment:client_app"}
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["run-dir"] == str((tmp_path / "run").resolve())
    recipe = recipe_from_run_config(run_config)
    assert recipe.federated.rounds == 3 and recipe.data.eval == str(shop_files["global"])
    connection = tomllib.loads((info.app_dir / ".flwr" / "config.toml").read_text(encoding="utf-8"))
    assert connection["superlink"]["tuneforge"] == {"address": "127.0.0.1:19093", "insecure": True}
    with pytest.raises(RunDirError, match="--overwrite"):
        write_app(tmp_path / "r.yaml", tmp_path / "app", run_dir=tmp_path / "run")
    write_app(tmp_path / "r.yaml", tmp_path / "app", run_dir=tmp_path / "run", overwrite=True)


def test_resume_refuses_a_run_of_the_deployment_engine(tiny_model_dir, shop_files, tmp_path):
    from tuneforge.federated.run import open_run_directory
    from tuneforge.recipe import load_recipe

    recipe = load_recipe(recipe_file(tiny_model_dir, shop_files, tmp_path / "r.yaml"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "environment.json").write_text(json.dumps({"engine": "deployment"}), encoding="utf-8")
    with pytest.raises(RunDirError, match="deployment engine"):
        open_run_directory(recipe, str(run), overwrite=False, resume=True, console=None)


def test_cli_errors_are_clear_without_a_traceback(tiny_model_dir, shop_files, tmp_path):
    plain = recipe_file(tiny_model_dir, shop_files, tmp_path / "plain.yaml")
    no_section = without_federated(plain)
    result = subprocess.run([str(BIN / "tuneforge"), "federated", "app", str(no_section), "--output",
                             str(tmp_path / "app")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    text = result.stdout + result.stderr
    assert "federated: section" in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------------------------------
# One run over real processes


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, deadline: float, process) -> None:
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} did not open in time")


def stop(process) -> None:
    """The process and everything it started (its own process group: Flower's superexec and app processes)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=5)


def test_two_supernodes_train_two_rounds_each_on_its_own_records(tiny_model_dir, shop_files, tmp_path):
    from tuneforge.data.readers import read_records
    from tuneforge.data.splits import hash_split

    from tuneforge.federated.app import write_app

    started = time.time()
    run_dir = tmp_path / "run"
    info = write_app(recipe_file(tiny_model_dir, shop_files, tmp_path / "recipe.yaml"), tmp_path / "app",
                     run_dir=run_dir, superlink="127.0.0.1:0")  # the Control API port is set below
    appio, fleet, control, node_a, node_b = free_ports(5)
    (info.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "tuneforge"\n\n[superlink.tuneforge]\naddress = "127.0.0.1:{control}"\n'
        "insecure = true\n", encoding="utf-8")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    logs, processes = tmp_path / "logs", []
    logs.mkdir()

    def start(name: str, command: list[str]):
        home = tmp_path / f"home-{name}"  # each 'machine' its own Flower home (installed Apps, state)
        handle = open(logs / f"{name}.log", "w")
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**env, "FLWR_HOME": str(home)}, cwd=str(tmp_path))
        processes.append((process, handle))
        return process

    def log_tails() -> str:
        return "\n".join(f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                         for p in sorted(logs.glob("*.log")))

    try:
        link = start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                   "--disable-runtime-dependency-installation",
                                   "--serverappio-api-address", f"127.0.0.1:{appio}",
                                   "--fleet-api-address", f"127.0.0.1:{fleet}",
                                   "--control-api-address", f"127.0.0.1:{control}"])
        wait_for_port(control, time.time() + 30, link)
        wait_for_port(fleet, time.time() + 10, link)
        for name, port in (("north", node_a), ("east", node_b)):
            start(f"supernode-{name}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                        f"127.0.0.1:{fleet}", "--clientappio-api-address", f"127.0.0.1:{port}",
                                        "--node-config", f"train='{shop_files[name]}'"])
        result = subprocess.run([str(BIN / "flwr"), "run", str(info.app_dir), "tuneforge"], capture_output=True,
                                text=True, timeout=60, env={**env, "FLWR_HOME": str(info.flwr_home)})
        assert result.returncode == 0 and "Successfully started run" in result.stdout, result.stdout + result.stderr
        deadline, state = time.time() + 100, None
        while time.time() < deadline:
            status = run_dir / "status.json"
            state = json.loads(status.read_text()).get("state") if status.is_file() else None
            if state in ("completed", "failed"):
                break
            time.sleep(1)
        assert state == "completed", f"run state {state}\n{log_tails()}"
    finally:
        for process, handle in reversed(processes):
            stop(process)
            handle.close()

    summary = json.loads((run_dir / "summary.json").read_text())
    fed = summary["federated"]
    assert fed["engine"].endswith("deployment (flower-superlink, flower-supernode, flwr run)")
    assert [e["round"] for e in fed["rounds_history"]] == [0, 1, 2]
    assert all(e["global"]["n"] == 2 and e["global"].get("eval_loss") is not None for e in fed["rounds_history"])
    assert all(len(e["clients"]) == 2 and len(e["trained"]) == 2 for e in fed["rounds_history"][1:])
    assert fed["baselines"] == {} and "not run on Flower's deployment engine" in fed["baselines_not_run"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("round-*")) == ["round-0", "round-1", "round-2"]
    assert "not run on Flower" in (run_dir / "report.html").read_text()
    # each client trained and scored exactly its own file's records (north 8, east 14: different sizes)
    expected = set()
    for name in ("north", "east"):
        from tuneforge.data.formats import canonicalize

        train, _held = hash_split(canonicalize(read_records(str(shop_files[name])), "auto")[0], 0.25)
        expected.add(len(train))
    seen = {c["train"] for c in json.loads((run_dir / "eval" / "clients.json").read_text())["clients"]}
    assert seen == expected and len(seen) == 2
    assert not (shop_files["root"] / "no-pooled-records.jsonl").exists()
    assert fed["traffic"]["to_client_messages"] == 8 and fed["traffic"]["to_server_messages"] == 8
    assert time.time() - started < 110
