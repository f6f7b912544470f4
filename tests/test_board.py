"""tuneforge board: the real page in headless Chromium (Selenium) against a real `tuneforge board` process -- a recipe
typo shown on its field, doctor and plan, recommend, a tiny run launched, watched, stopped, resumed and completed,
chat base vs tuned, merge from Deploy, two runs compared, the token -- and the API's refusals through TestClient.

TUNEFORGE_BOARD_SCREENSHOTS=docs/board writes the screenshots there (scripts/board_screenshots.py does)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_report import make_run

CHROMIUM = Path(os.environ.get("CHROME_BIN", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
TOKEN = "board-test-token-0123456789"


# ---------------------------------------------------------------------------------------------------------------
# The board process and the browser


def _make_runs(runs: Path) -> None:
    """Finished runs to list and compare (tests/test_report.py's synthetic run directories), and a failed one."""
    make_run(runs / "alpha", name="alpha", steps=40, lr=2e-4)
    make_run(runs / "beta", name="beta", steps=30, lr=1e-4, forgetting_drop=2.0)
    make_run(runs / "broken", name="broken", steps=5, status="failed")
    status = json.loads((runs / "broken" / "status.json").read_text())
    (runs / "broken" / "status.json").write_text(json.dumps({**status, "error": "DataError: train.jsonl:3 is not JSON"}))


def _answering(url: str, timeout: float = 30) -> None:
    from urllib.request import Request, urlopen

    deadline = time.time() + timeout
    while True:
        try:
            with urlopen(Request(url + "api/health", headers={"X-Tuneforge-Token": TOKEN}), timeout=5) as response:
                assert json.load(response)["ok"]
                return
        except OSError:
            if time.time() > deadline:
                raise


def _kill_runs(runs: Path) -> None:
    """SIGKILL for any run still training under `runs` when the tests end (after a failed test)."""
    from tuneforge.run import LOCK_FILE, lock_holder

    for lock in runs.rglob(LOCK_FILE):
        if lock_holder(lock.parent):
            try:
                os.kill(int(json.loads(lock.read_text())["pid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass


@pytest.fixture(scope="module")
def board(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("board")
    _make_runs(runs := home / "runs")
    sums = [(a, (a * 7 + 3) % 20) for a in range(40)]  # short chat examples: a training step takes a fraction of a second
    (home / "train.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]}) + "\n"
        for a, b in sums))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the runs it starts: threads only slow a tiny model on a busy machine
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "board", "--runs", str(runs), "--port", "0",
                             "--token", TOKEN], cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    first: list[str] = []
    (reader := threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)).start()
    reader.join(60)
    match = re.search(r"(http://127\.0\.0\.1:\d+/)", first[0] if first else "")
    assert match, f"the board did not print its address: {first}"
    _answering(match.group(1))
    yield {"url": match.group(1), "runs": runs, "home": home, "model": str(tiny_model_dir)}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    finally:
        proc.kill()
        _kill_runs(runs)


@pytest.fixture(scope="module")
def driver():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"the board's browser tests need headless Chromium and its driver ({', '.join(missing)} missing): "
                    "scripts/setup.sh installs them (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1440,1000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()


def go(driver, board, view: str):
    driver.get(f"{board['url']}?token={TOKEN}#{view}")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), 30, "the page did not load")


def wait(driver, condition, timeout: float, message: str):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def safe(d):
        try:
            return condition(d)
        except StaleElementReferenceException:  # the page redrew the element while we read it
            return False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(safe)
    except TimeoutException:
        banner = driver.execute_script("return document.getElementById('banner').innerText")
        raise AssertionError(f"{message} (after {timeout}s; page banner: {banner!r})") from None


def css(driver, selector):
    return driver.find_element("css selector", selector)


def text_of(driver, selector) -> str:
    return driver.execute_script("const n = document.querySelector(arguments[0]); return n ? n.textContent : ''", selector)


def set_field(driver, key: str, value: str):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    node = css(driver, f'#recipe-form [data-key="{key}"]:not(.field)')
    driver.execute_script("arguments[0].closest('details').open = true", node)
    if node.tag_name == "select":
        Select(node).select_by_value(value)
    else:
        node.send_keys(Keys.CONTROL, "a")
        node.send_keys(Keys.DELETE)
        if value:
            node.send_keys(value)


def shot(driver, name: str, tmp_path: Path):
    folder = Path(os.environ.get("TUNEFORGE_BOARD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"{name}.png"))


TINY = {"train.max_steps": "40", "train.batch_size": "2", "train.grad_accum": "1", "train.max_length": "64",
        "train.warmup": "0", "train.eval_every": "10", "train.report_to": "[]", "eval.forgetting": "false",
        "eval.few_shot": "0", "eval.max_examples": "2", "eval.max_new_tokens": "4", "eval.batch_size": "2"}


def fill_tiny_recipe(driver, board, name: str):
    set_field(driver, "name", name)
    set_field(driver, "model.name", board["model"])
    set_field(driver, "data.train", "train.jsonl")
    for key, value in TINY.items():
        set_field(driver, key, value)
    wait_valid(driver)


def wait_valid(driver, timeout: float = 20):
    """Until the check of the form as it is now (not of an earlier keystroke) says valid."""
    current = "return document.getElementById('recipe-status').dataset.current === '1'"
    wait(driver, lambda d: d.execute_script(current) and text_of(d, "#recipe-status") == "valid", timeout,
         "the recipe did not become valid")


# ---------------------------------------------------------------------------------------------------------------
# In the browser


def test_recipe_typo_shows_the_cli_error_on_its_field_then_doctor_and_plan(board, driver, tmp_path):
    go(driver, board, "recipe")
    set_field(driver, "method", "sftt")
    wait(driver, lambda d: "did you mean 'sft'" in text_of(d, '.field[data-key="method"] .error'), 15,
         "the typo's error did not appear on the method field")
    driver.execute_script("window.scrollTo(0, 0)")
    shot(driver, "recipe-error", tmp_path)
    assert re.match(r"`method` \(recipe\.yaml:\d+\): unknown method 'sftt'", text_of(driver, '.field[data-key="method"] .error'))
    assert "problem" in text_of(driver, "#recipe-status") and not css(driver, "#launch").is_enabled()
    set_field(driver, "train.lr", "2e-4x")
    wait(driver, lambda d: "valid number" in text_of(d, '.field[data-key="train.lr"] .error'), 15, "no error on train.lr")
    set_field(driver, "method", "")
    set_field(driver, "train.lr", "")
    fill_tiny_recipe(driver, board, "typo-check")
    assert "max_steps: 40" in css(driver, "#yaml-view").get_attribute("value")
    # the YAML view: a mistyped section pasted there comes back as the CLI's "did you mean" on the other-keys field
    from selenium.webdriver.common.keys import Keys

    css(driver, "#yaml-view").send_keys(Keys.CONTROL, Keys.END)  # typed at the end, as a person would
    css(driver, "#yaml-view").send_keys("\ntrian:\n  lr: 0.001\n")
    css(driver, "#yaml-apply").click()
    wait(driver, lambda d: "did you mean `train`" in text_of(d, '.field[data-key="extras"] .error'), 15,
         "the unknown key's error did not appear")
    set_field(driver, "extras", "")
    wait_valid(driver)
    fresh = "return document.getElementById('doctor-summary').dataset.fresh === '1'"
    wait(driver, lambda d: d.execute_script(fresh), 90, "doctor's findings for the recipe did not come")
    assert text_of(driver, "#doctor-summary").startswith("doctor: 0 error(s)")
    assert "eval-set-too-small" in text_of(driver, "#doctor-findings")
    assert "only 2 held-out" in text_of(driver, '.field[data-key="eval.max_examples"] .finding')
    wait(driver, lambda d: len(d.find_elements("css selector", "#plan tbody tr")) == 3, 60, "no plan table")
    assert "lora (recipe)" in text_of(driver, "#plan tr.recipe-row")
    driver.execute_script("document.querySelector('[data-section=\"train\"]').scrollIntoView()")
    shot(driver, "recipe", tmp_path)


def test_recommend_fills_the_recipe(board, driver, tmp_path):
    from selenium.webdriver.support.ui import Select

    go(driver, board, "recommend")
    ready = lambda d: d.execute_script("return document.getElementById('questions').dataset.state") == "ready"  # noqa: E731
    wait(driver, ready, 15, "no questions")
    Select(css(driver, '#questions select[data-key="goal"]')).select_by_value("preferences")
    wait(driver, lambda d: ready(d) and d.find_elements("css selector", '#questions [data-key="has_preference_data"]'), 15,
         "the preference-data question did not appear for goal=preferences")
    assert not driver.find_elements("css selector", '#questions [data-key="tried_prompting"]')
    Select(css(driver, '#questions select[data-key="goal"]')).select_by_value("task")
    wait(driver, lambda d: ready(d) and d.find_elements("css selector", '#questions [data-key="tried_prompting"]'), 15,
         "the prompting question did not appear for goal=task")
    Select(css(driver, '#questions [data-key="tried_prompting"]')).select_by_value("yes")
    wait(driver, ready, 15, "the questions did not settle")
    for key, value in (("model", board["model"]), ("train", "train.jsonl"), ("examples", "32"), ("gpu", "cpu")):
        node = css(driver, f'#questions [data-key="{key}"]')
        node.clear()
        node.send_keys(value)
    css(driver, "#recommend-go").click()
    wait(driver, lambda d: d.find_elements("css selector", "#use-recipe"), 60, "no recommended recipe")
    assert "supervised fine-tuning" in text_of(driver, "#recommendation .reasons")
    shot(driver, "recommend", tmp_path)
    css(driver, "#use-recipe").click()
    wait_valid(driver)
    assert css(driver, '#recipe-form select[data-key="adapter.type"]').get_attribute("value") == "lora"
    assert css(driver, '#recipe-form [data-key="data.train"]:not(.field)').get_attribute("value") == "train.jsonl"


def test_launch_watch_stop_resume_then_chat_and_merge(board, driver, tmp_path):
    go(driver, board, "recipe")
    fill_tiny_recipe(driver, board, "tiny")
    css(driver, "#launch").click()
    wait(driver, lambda d: d.current_url.endswith("#run/tiny"), 15, "launch did not open the run page")
    points = lambda d: int(d.execute_script(  # noqa: E731
        "const c = document.querySelector('svg.chart[data-title=\"training loss\"]'); return c ? c.dataset.points : 0"))
    wait(driver, lambda d: points(d) >= 1, 150, "the loss chart did not show the first step")
    assert "ETA" in text_of(driver, "#run-progress")
    css(driver, "#run-stop").click()
    wait(driver, lambda d: text_of(d, "#run-state") == "interrupted", 90, "stop (SIGINT) did not interrupt the run")
    stopped_at = json.loads((board["runs"] / "tiny" / "status.json").read_text())["step"]
    assert 0 < stopped_at < 40 and list((board["runs"] / "tiny" / "checkpoints").glob("checkpoint-*"))
    wait(driver, lambda d: css(d, "#run-resume").is_enabled(), 60, "resume is not offered once the stopped run exited")
    before = points(driver)
    css(driver, "#run-resume").click()
    wait(driver, lambda d: points(d) > before, 150, "the loss chart did not update after the resume")
    wait(driver, lambda d: text_of(d, "#run-state") == "completed", 150, "the resumed run did not complete")
    assert text_of(driver, "#run-progress").startswith("step 40 of 40")
    wait(driver, lambda d: d.find_elements("css selector", "#report-frame"), 20, "the report was not embedded")
    assert int(css(driver, 'svg.chart[data-title="held-out loss (eval)"]').get_attribute("data-points")) >= 2
    shot(driver, "run", tmp_path)

    go(driver, board, "chat?run=tiny")
    wait(driver, lambda d: css(d, "#chat-run").get_attribute("value") == "tiny", 15, "the run is not offered for chat")
    css(driver, "#chat-prompt").send_keys("Name a colour.")
    css(driver, "#chat-send").click()
    wait(driver, lambda d: d.find_elements("css selector", "#answer-tuned"), 90, "no answers")
    assert "base" in text_of(driver, "#answer-base .label") and "tuned: tiny" in text_of(driver, "#answer-tuned .label")
    assert "<|im_start|>user\nName a colour." in text_of(driver, "#chat-answers pre")  # the run's chat template
    shot(driver, "chat", tmp_path)

    go(driver, board, "deploy?run=tiny")
    wait(driver, lambda d: d.find_elements("css selector", '[data-command="merge"] [data-param="output"]'), 15, "no merge form")
    for name in ("export", "serve"):  # either its form (the command is registered) or a clear "not available"
        card = css(driver, f'[data-command="{name}"]')
        assert card.find_elements("css selector", "button.primary") or "is not available" in card.text
    css(driver, '[data-command="merge"] [data-param="output"]').send_keys("tiny-merged")
    css(driver, '[data-command="merge"] button.primary').click()
    merge_state = '#jobs details.job[data-job^="merge-"] .badge'
    wait(driver, lambda d: text_of(d, merge_state) in ("finished", "failed"), 120, "merge did not end")
    assert text_of(driver, merge_state) == "finished", driver.execute_script(
        "return fetch('/api/jobs').then(r => r.json())")
    assert (board["runs"] / "tiny-merged" / "config.json").is_file()
    shot(driver, "deploy", tmp_path)


def test_runs_list_and_compare(board, driver, tmp_path):
    go(driver, board, "runs")
    wait(driver, lambda d: d.find_elements("css selector", '#runs-table tr[data-run="beta"]'), 15, "the runs are not listed")
    assert "failed" in text_of(driver, '#runs-table tr[data-run="broken"]')
    assert "DataError: train.jsonl:3 is not JSON" in text_of(driver, '#runs-table tr[data-run="broken"]')
    shot(driver, "runs", tmp_path)
    for run in ("alpha", "beta"):
        css(driver, f'#runs-table tr[data-run="{run}"] input').click()
    css(driver, "#compare-go").click()
    wait(driver, lambda d: d.find_elements("css selector", "#compare-table"), 60, "no comparison")
    assert [h.text for h in driver.find_elements("css selector", "#compare-table thead th")][1:] == ["alpha", "beta"]
    assert "learning rate" in text_of(driver, "#compare-table")
    chart = css(driver, 'svg.chart[data-title="training loss"]')
    assert len(chart.find_elements("css selector", "g.series")) == 2
    shot(driver, "compare", tmp_path)


def test_page_needs_the_token(board, driver):
    driver.delete_all_cookies()
    driver.get(board["url"])
    assert "needs its access token" in css(driver, "body").text
    go(driver, board, "runs")  # the address with ?token= once; from then on the cookie carries it
    assert "?token=" not in driver.current_url  # and the page took it out of the address bar
    driver.get(board["url"] + "api/health")
    assert json.loads(css(driver, "body").text)["ok"] is True


# ---------------------------------------------------------------------------------------------------------------
# The API (TestClient): refusals and the single source of the form


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.board.app import create_app
    from tuneforge.board.state import BoardState
    from tuneforge.cli import app as cli_app

    _make_runs(tmp_path / "runs")
    state = BoardState(runs_dir=tmp_path / "runs", cli_app=cli_app, cwd=tmp_path)
    return TestClient(create_app(state), base_url="http://127.0.0.1:8765"), state


@pytest.mark.parametrize("args, refused", [
    (["--host", "0.0.0.0"], "--allow-remote and --token"),
    (["--host", "192.168.1.5", "--allow-remote"], "refusing without --token"),
    (["--host", "0.0.0.0", "--token", "x" * 20], "refusing without --allow-remote"),
    (["--token", "short"], "use at least 16"),
    (["--token", "x" * 16 + "; Path=/evil"], "letters, digits"),
])
def test_board_refuses_a_non_local_address_without_allow_remote_and_token(monkeypatch, capsys, tmp_path, args, refused):
    from conftest import run_cli

    code, output = run_cli(monkeypatch, capsys, "board", "--runs", str(tmp_path / "runs"), *args)
    assert code == 2 and refused in output and "Traceback" not in output
    assert not (tmp_path / "runs").exists()  # refused before anything was made or bound


def test_token_host_and_json_guards():
    from fastapi.testclient import TestClient

    from tuneforge.board.app import create_app
    from tuneforge.board.state import BoardState

    remote = TestClient(create_app(BoardState(runs_dir=Path("/nonexistent-runs"), token=TOKEN, remote=True)),
                        base_url="http://192.0.2.1:8765")
    assert remote.get("/api/health").status_code == 401 and "access token" in remote.get("/api/health").json()["error"]
    assert remote.get("/api/health", headers={"X-Tuneforge-Token": "wrong-" + TOKEN}).status_code == 401
    assert remote.get("/api/health", headers={"X-Tuneforge-Token": TOKEN}).json()["ok"]
    first = remote.get(f"/?token={TOKEN}")
    assert first.status_code == 200 and "HttpOnly" in first.headers["set-cookie"]
    assert remote.get("/static/main.js").status_code == 200  # the cookie from ?token= carries it from now on
    local = TestClient(create_app(BoardState(runs_dir=Path("/nonexistent-runs"))), base_url="http://127.0.0.1:8765")
    assert local.get("/api/health").json()["ok"]
    assert local.get("/api/health", headers={"host": "attacker.example:8765"}).status_code == 403  # DNS rebinding
    refused = local.post("/api/recipe/check", content="values=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert refused.status_code == 415  # a cross-site form post cannot send JSON


def test_paths_must_lie_under_the_runs_folder(client):
    api, state = client
    for run in ("../outside", "/etc", "alpha/../../x", ".board"):
        response = api.get("/api/run", params={"run": run})
        assert response.status_code in (400, 404) and "Traceback" not in response.text, run
    assert "outside the runs folder" in api.get("/api/run", params={"run": "/etc"}).json()["error"]
    assert "outside" in api.post("/api/compare", json={"runs": ["alpha", "../beta"]}).json()["error"]
    bad = api.post("/api/deploy/merge", json={"run": "alpha", "options": {"output": "../../elsewhere"}})
    assert bad.status_code == 400 and "outside the runs folder" in bad.json()["error"]
    newline = api.post("/api/deploy/merge", json={"run": "alpha", "options": {"output": "a\nb"}})
    assert "control characters" in newline.json()["error"]
    assert "no option" in api.post("/api/deploy/merge", json={"run": "alpha", "options": {"shell": "rm"}}).json()["error"]


def test_deploy_commands_are_argument_lists_and_missing_ones_say_so(client):
    import typer

    from tuneforge.board.deploy import deploy_argv, deploy_commands

    api, state = client
    argv = deploy_argv(state, "merge", "alpha", {"output": "alpha-merged", "dtype": "bfloat16", "overwrite": True})
    assert argv == [sys.executable, "-m", "tuneforge", "merge", f"--output={state.runs_dir / 'alpha-merged'}",
                    "--dtype=bfloat16", "--overwrite", "--", str(state.runs_dir / "alpha")]
    fake = typer.Typer()  # a `tuneforge` whose merge has a flag that is on by default, and no export or serve

    @fake.command()
    def merge(run: str, out: str = typer.Option(...), score: bool = typer.Option(True, "--score/--no-score"),
              trust_remote_code: bool = False):
        pass

    state.cli_app = fake
    assert deploy_argv(state, "merge", "alpha", {"out": "m", "score": False})[4:6] == [f"--out={state.runs_dir / 'm'}", "--no-score"]
    assert "--score" not in deploy_argv(state, "merge", "alpha", {"out": "m", "score": True})
    commands = deploy_commands(state)
    assert commands["merge"]["available"] and not commands["export"]["available"]
    assert "`tuneforge export` is not available" in commands["export"]["message"]
    response = api.post("/api/deploy/export", json={"run": "alpha"})
    assert response.status_code == 404 and "not available" in response.json()["error"]
    state.remote = True  # a remote board does not offer running code shipped with a model
    assert "no option trust_remote_code" in api.post("/api/deploy/merge", json={
        "run": "alpha", "options": {"out": "m", "trust_remote_code": True}}).json()["error"]


def test_launch_starts_train_as_an_argument_list(client, monkeypatch, tiny_model_dir):
    import subprocess as sp

    api, state = client
    started, real = [], sp.Popen
    monkeypatch.setattr(sp, "Popen", lambda argv, **kw: started.append((argv, kw)) or real([sys.executable, "-c", ""]))
    values = {"name": "a; touch pwned", "model.name": str(tiny_model_dir), "data.train": "train.jsonl"}
    result = api.post("/api/recipe/launch", json={"values": values}).json()
    (argv, kw), = started
    assert argv[:5] == [sys.executable, "-m", "tuneforge", "train", result["recipe_file"]]
    assert argv[5:] == ["--output", str(state.runs_dir / "a; touch pwned")] and kw["shell"] is False
    assert "name: a; touch pwned" in Path(result["recipe_file"]).read_text()
    assert "already exists" in api.post("/api/recipe/launch", json={"values": {**values, "name": "alpha"}}).json()["error"]
    assert "has problems" in api.post("/api/recipe/launch", json={"values": {"name": "x"}}).json()["error"]
    state.remote = True
    refused = api.post("/api/recipe/launch", json={"values": {**values, "name": "b", "model.trust_remote_code": "true"}})
    assert "--allow-remote" in refused.json()["error"] and "model.trust_remote_code" in refused.json()["error"]


def test_stop_resume_and_report_of_runs_without_a_process(client):
    api, state = client
    make_run(state.runs_dir / "gone", name="gone", status="running")  # status.json says running; no process holds it
    assert {r["id"]: r["state"] for r in api.get("/api/runs").json()["runs"]}["gone"] == "killed"
    assert "not running" in api.post("/api/run/stop", json={"run": "alpha"}).json()["error"]
    assert "already completed" in api.post("/api/run/resume", json={"run": "alpha"}).json()["error"]
    assert api.get("/api/run/report", params={"run": "alpha"}).status_code == 404
    assert api.post("/api/run/report", json={"run": "alpha"}).json()["written"]
    report = api.get("/api/run/report", params={"run": "alpha"})
    assert report.status_code == 200 and report.headers["content-security-policy"].startswith("sandbox")
    again = api.get("/api/run/recipe", params={"run": "alpha"}).json()  # "Edit as new recipe": keys away from defaults
    assert again["values"]["name"] == "alpha" and again["values"]["train.max_steps"] == "40"
    assert "adapter.r" not in again["values"] and api.post("/api/recipe/check", json=again).json()["problems"] == [
        "`data`: required key is missing"]


def test_a_run_that_fails_before_its_folder_exists_shows_the_error(client, tiny_model_dir):
    api, state = client
    values = {"name": "nodata", "model.name": str(tiny_model_dir), "data.train": "missing.jsonl"}
    assert api.post("/api/recipe/launch", json={"values": values}).json()["run"] == "nodata"
    deadline = time.time() + 120
    while (detail := api.get("/api/run", params={"run": "nodata"}).json())["state"] == "starting" and time.time() < deadline:
        time.sleep(0.3)
    assert detail["state"] == "failed" and not detail["exists"]
    assert "missing.jsonl" in detail["job"]["log"] and "Traceback" not in detail["job"]["log"]


def test_form_is_the_recipe_schema_with_its_defaults():
    from pydantic import BaseModel

    from tuneforge.board.form import form_spec
    from tuneforge.recipe import Recipe

    fields = form_spec()["fields"]
    expected = {}
    for name, field in Recipe.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            expected.update({f"{name}.{k}": f for k, f in kind.model_fields.items()})
        else:
            expected[name] = field
    assert set(fields) == set(expected)
    for key, field in expected.items():
        assert fields[key]["help"] == field.description, key
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            assert fields[key]["default"] == (default.model_dump(mode="json") if isinstance(default, BaseModel) else default), key


def test_check_gives_the_errors_the_cli_gives(client, tmp_path):
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import load_recipe

    api, _ = client
    values = {"name": "x", "method": "sftt", "data.train": "d.jsonl", "train.lr": "fast", "adapter.r": "0",
              "train.scheduler": "cosine", "train.batch_size": "2.5"}
    result = api.post("/api/recipe/check", json={"values": values, "extras": "trian:\n  lr: 1\n"}).json()
    (tmp_path / "recipe.yaml").write_text(result["yaml"])
    with pytest.raises(RecipeError) as cli:
        load_recipe(tmp_path / "recipe.yaml")
    assert [p.replace(str(tmp_path / "recipe.yaml"), "recipe.yaml") for p in cli.value.problems] == result["problems"]
    assert set(result["errors"]) == {"method", "train.lr", "adapter.r", "train.batch_size", "extras"}
    assert "did you mean `train`" in result["errors"]["extras"][0]
