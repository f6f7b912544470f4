"""`tuneforge serve`: the real server (uvicorn on a free loopback port, in a thread) on a tiny random Llama with a
LoRA run, a PEFT adapter folder with its own chat template and stop token, and a DoRA adapter -- all on ONE base.
Every answer is checked against the offline greedy answer of the code `tuneforge generate` uses."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from conftest import run_cli, tiny_recipe
from tuneforge.cli import app
from tuneforge.recipe import parse_recipe
from tuneforge.train import train

PROMPTS = ["hello there", "Extract the order as JSON: Anna from Oslo wants 3 mugs.", "What is 2+2?"]
MAX_TOKENS = 12
MAX_MODEL_LEN = 256
# The folder adapter's own chat template: a served name must render prompts with ITS template, not the base's.
OWN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


# ------------------------------------------------------------------------------------------------ models and runs

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """conftest's tiny Llama, with wider random weights (initializer_range 0.2): its greedy answers differ from
    prompt to prompt (at 0.02 every answer is the same repeated newline, which would make equality checks weak)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id, initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("serve-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir, small_sft_file):
    recipe = parse_recipe(tiny_recipe(model_dir, small_sft_file, train={"max_steps": 2, "lr": 2e-2},
                                      eval={"baseline": False, "forgetting": False, "max_examples": 2}))
    return train(recipe, output=str(tmp_path_factory.mktemp("serve-runs") / "tuned-run"), console=Console(quiet=True),
                 doctor=False).path


def _random_adapter(model_dir: Path, folder: Path, seed: int, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **lora))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory, model_dir):
    """A PEFT adapter folder (rank 20) with its own tokenizer + chat template and generation config, whose stop
    tokens add one token its answer to PROMPTS[1] produces mid-way: served answers must stop there too."""
    from tuneforge.models import load_tokenizer

    folder = _random_adapter(model_dir, tmp_path_factory.mktemp("own") / "adapter", 1, r=20)
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.chat_template = OWN_TEMPLATE
    tokenizer.save_pretrained(folder)
    model, tokenizer = _offline_folder(model_dir, folder)
    ids = tokenizer(_chat(tokenizer, PROMPTS[1]), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    stop = tokens[3]
    assert stop not in tokens[:3], "pick another position: the stop token would stop the answer earlier"
    config = model.generation_config
    config.eos_token_id = [*([config.eos_token_id] if isinstance(config.eos_token_id, int) else config.eos_token_id),
                           stop]
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dora_folder(tmp_path_factory, model_dir):
    return _random_adapter(model_dir, tmp_path_factory.mktemp("dora") / "adapter", 2, r=4, use_dora=True)


def _chat(tokenizer, prompt: str) -> str:
    from tuneforge.data.template import render_chat

    return render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def _offline_folder(model_dir: Path, folder: Path):
    """A PEFT adapter folder loaded the way models.load_target loads a run's adapter/."""
    from peft import PeftModel
    from transformers import GenerationConfig

    from tuneforge.data.template import align_eos
    from tuneforge.models import load_target, load_tokenizer

    base, base_tokenizer = load_target(str(model_dir), device="cpu")
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = load_tokenizer(str(folder)) if (folder / "tokenizer_config.json").exists() else base_tokenizer
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    align_eos(tokenizer, model)
    return model, tokenizer


@pytest.fixture(scope="module")
def offline(model_dir, lora_run, own_folder, dora_folder) -> dict:
    """(served name, prompt) -> the greedy chat answer, one prompt at a time, through the code `tuneforge generate`
    uses (models.load_target + evaluate.generation.generate_answers); ("raw", name, prompt) -> a raw completion."""
    from tuneforge.evaluate.generation import generate_answers
    from tuneforge.models import load_target

    answers = {}
    targets = {str(model_dir): load_target(str(model_dir), device="cpu"),
               "tuned": load_target(str(lora_run), device="cpu"),
               "own": _offline_folder(model_dir, own_folder), "dora": _offline_folder(model_dir, dora_folder)}
    for name, (model, tokenizer) in targets.items():
        for prompt in PROMPTS:
            answers[name, prompt] = generate_answers(model, tokenizer, [_chat(tokenizer, prompt)],
                                                     max_new_tokens=MAX_TOKENS)[0]
            answers["raw", name, prompt] = generate_answers(model, tokenizer, [prompt], max_new_tokens=MAX_TOKENS)[0]
    return answers


@pytest.fixture(scope="module")
def served(model_dir, lora_run, own_folder, dora_folder):
    from tuneforge.deploy.serve import load_served, plan_serving

    plan = plan_serving(str(model_dir), [("tuned", str(lora_run)), ("own", str(own_folder)), ("dora", str(dora_folder))])
    return load_served(plan, device="cpu", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def server(served):
    from tuneforge.deploy.serve_server import Server

    # 100 ms of collecting: requests fired together in the concurrency test land in one batch on a loaded machine
    running = Server(served, host="127.0.0.1", port=0, max_batch_size=8, wait_ms=100,
                     allow_adapter_loading=True).start()
    yield running
    running.stop()


# ------------------------------------------------------------------------------------------------ an HTTP client

def request(server, method: str, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or SSE data list, content type)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    kind = response.getheader("content-type", "")
    if kind.startswith("text/event-stream"):
        return response.status, [line[6:] for line in text.split("\n") if line.startswith("data: ")], kind
    return response.status, json.loads(text), kind


def chat(server, model: str, prompt: str, **options):
    return request(server, "POST", "/v1/chat/completions",
                   {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                    **options})


def streamed_text(events: list[str], chat_api: bool = True) -> tuple[str, list[dict]]:
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    key = (lambda c: c["delta"].get("content", "")) if chat_api else (lambda c: c["text"])
    return "".join(key(c) for chunk in chunks for c in chunk["choices"]), chunks


# ------------------------------------------------------------------------------------------------ the API

def test_models_lists_the_base_and_its_adapters(server, model_dir):
    status, body, _ = request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [str(model_dir), "tuned", "own", "dora"]
    assert all(m["object"] == "model" and m["root"] == str(model_dir) for m in body["data"])
    assert [m["parent"] for m in body["data"]] == [None] + [str(model_dir)] * 3
    assert {m["max_model_len"] for m in body["data"]} == {MAX_MODEL_LEN}


def test_adapters_share_one_base(served):
    from peft import PeftModel

    assert isinstance(served.model, PeftModel)
    assert sorted(served.model.peft_config) == ["adapter_0", "adapter_1", "adapter_2"]  # three adapters, one model


@pytest.mark.parametrize("name", ["base", "tuned", "own", "dora"])
def test_chat_greedy_answer_equals_offline(server, offline, model_dir, name):
    name = str(model_dir) if name == "base" else name
    for prompt in PROMPTS:
        status, body, _ = chat(server, name, prompt)
        assert status == 200, body
        choice = body["choices"][0]
        assert body["object"] == "chat.completion" and body["model"] == name
        assert choice["message"] == {"role": "assistant", "content": offline[name, prompt]}
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    # the adapters really differ from the base and from each other, so equality means something
    assert len({offline[n, PROMPTS[0]] for n in (str(model_dir), "tuned", "own", "dora")}) == 4


def test_chat_matches_the_generate_command(server, lora_run):
    result = CliRunner().invoke(app, ["generate", str(lora_run), "--prompt", PROMPTS[1], "--max-new-tokens",
                                      str(MAX_TOKENS)])
    assert result.exit_code == 0, result.output
    _, body, _ = chat(server, "tuned", PROMPTS[1])
    assert body["choices"][0]["message"]["content"] + "\n" == result.stdout


def test_own_stop_token_ends_the_answer(server, offline):
    status, body, _ = chat(server, "own", PROMPTS[1])
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["content"] == offline["own", PROMPTS[1]]
    _, body, _ = chat(server, "tuned", PROMPTS[1])  # another adapter in the same server does not stop there
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == MAX_TOKENS


def test_chat_stream(server, offline):
    status, events, kind = chat(server, "tuned", PROMPTS[2], stream=True, stream_options={"include_usage": True})
    assert status == 200 and kind.startswith("text/event-stream")
    text, chunks = streamed_text(events)
    assert text == offline["tuned", PROMPTS[2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) >= 4  # opening, several deltas, finish, usage: it streamed, not one lump
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS


def test_completions_whole_and_streamed(server, offline, model_dir):
    status, body, _ = request(server, "POST", "/v1/completions",
                              {"model": "tuned", "prompt": PROMPTS, "max_tokens": MAX_TOKENS})
    assert status == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [offline["raw", "tuned", p] for p in PROMPTS]
    status, events, _ = request(server, "POST", "/v1/completions",
                                {"model": str(model_dir), "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "stream": True})
    text, chunks = streamed_text(events, chat_api=False)
    assert status == 200 and text == offline["raw", str(model_dir), PROMPTS[0]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings(server, offline):
    answer = offline["tuned", PROMPTS[0]]
    stop = answer[len(answer) // 2: len(answer) // 2 + 3]
    expected = answer[: answer.index(stop)]
    _, body, _ = chat(server, "tuned", PROMPTS[0], stop=[stop])
    assert body["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": expected}}
    _, events, _ = chat(server, "tuned", PROMPTS[0], stop=stop, stream=True)
    text, chunks = streamed_text(events)
    assert text == expected and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_mixed_adapters_arriving_together_are_batched_and_each_answer_is_its_own(server, offline, model_dir):
    names = [str(model_dir), "tuned", "own", "dora"]
    work = [(name, prompt, i % 2 == 0) for i, (name, prompt) in enumerate((n, p) for p in PROMPTS for n in names)]
    before = request(server, "GET", "/tuneforge/stats")[1]
    gate = threading.Barrier(len(work))

    def ask(item):
        name, prompt, stream = item
        gate.wait()
        status, body, _ = chat(server, name, prompt, stream=stream)
        assert status == 200, body
        return streamed_text(body)[0] if stream else body["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(work)) as pool:
        answers = list(pool.map(ask, work))
    assert answers == [offline[name, prompt] for name, prompt, _ in work]
    after = request(server, "GET", "/tuneforge/stats")[1]
    assert after["rows"] - before["rows"] == len(work)
    assert after["mixed_batches"] > before["mixed_batches"]  # base and LoRA rows in one generate()
    assert after["batches"] - before["batches"] < len(work)  # fewer forwards than requests
    assert after["largest_batch"] >= 3


# ------------------------------------------------------------------------------------------------ errors

ERRORS = [
    ("malformed JSON", b'{"model": "tuned", ', 400, "invalid_json", None),
    ("not an object", b"[1, 2]", 400, "invalid_json", None),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_field", "model"),
    ("missing messages", {"model": "tuned"}, 400, "missing_field", "messages"),
    ("bad role", {"model": "tuned", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value",
     "messages[0]"),
    ("unknown model", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found",
     "model"),
    ("bad max_tokens", {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "invalid_value", "max_tokens"),
    ("sampling", {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7}, 400,
     "unsupported_parameter", "temperature"),
    ("prompt too long", {"model": "tuned", "messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "context_length_exceeded", "messages"),
    ("huge prompt", {"model": "tuned", "messages": [{"role": "user", "content": "word " * 1000}]}, 400,
     "context_length_exceeded", "messages"),
    ("answer too long", {"model": "tuned", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}, 400,
     "context_length_exceeded", "messages"),
    ("stream, prompt too long", {"model": "own", "messages": [{"role": "user", "content": "word " * 400}],
                                 "stream": True}, 400, "context_length_exceeded", "messages"),
]


@pytest.mark.parametrize("what,body,status,code,param", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, offline, what, body, status, code, param):
    raw = body if isinstance(body, bytes) else None
    got, answer, kind = request(server, "POST", "/v1/chat/completions", None if raw else body, raw=raw)
    assert got == status and kind.startswith("application/json"), answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == code and answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    if code == "context_length_exceeded":  # names the limit and where it comes from
        assert f"maximum context length is {MAX_MODEL_LEN} tokens (--max-model-len)" in answer["error"]["message"]
    ok, body, _ = chat(server, "tuned", PROMPTS[0])  # still serving
    assert ok == 200 and body["choices"][0]["message"]["content"] == offline["tuned", PROMPTS[0]]


def test_unknown_route_and_method(server):
    status, body, _ = request(server, "GET", "/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body, _ = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in body


def test_a_failed_batch_is_a_500_and_the_server_goes_on(server, offline, monkeypatch):
    import tuneforge.evaluate.generation as generation

    real, failed = generation.generate_answers, []

    def fails_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("the device fell over")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_answers", fails_once)
    status, body, _ = chat(server, "tuned", PROMPTS[0])
    assert status == 500 and body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
    assert "the device fell over" in body["error"]["message"]
    _, body, _ = chat(server, "tuned", PROMPTS[0])
    assert body["choices"][0]["message"]["content"] == offline["tuned", PROMPTS[0]]


def test_limits_on_size_and_queue(server, monkeypatch):
    import tuneforge.deploy.serve_api as api

    big = b'{"model": "tuned", "prompt": "' + b"a" * (api.MAX_BODY_BYTES + 10) + b'"}'
    status, body, _ = request(server, "POST", "/v1/completions", raw=big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    monkeypatch.setattr(api, "MAX_QUEUED", 0)
    status, body, _ = chat(server, "tuned", PROMPTS[0])
    assert status == 503 and body["error"]["code"] == "server_busy"


def test_a_taken_port_is_a_located_error(served):
    import socket

    from tuneforge.deploy.serve import ServeError
    from tuneforge.deploy.serve_server import Server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServeError, match="cannot listen on 127.0.0.1") as caught:
            Server(served, port=taken.getsockname()[1])
        assert "--port" in caught.value.render()


def test_client_leaving_mid_stream_does_not_stop_the_server(server, offline):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "tuned", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200, "stream": True}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # gone after the first chunk
    ok, body, _ = chat(server, "dora", PROMPTS[2])
    assert ok == 200 and body["choices"][0]["message"]["content"] == offline["dora", PROMPTS[2]]


def test_hot_loading_an_adapter_onto_the_running_base(server, served, offline, own_folder, tmp_path):
    base = served.model.get_base_model()
    status, body, _ = request(server, "POST", "/v1/load_lora_adapter",
                              {"lora_name": "own-again", "lora_path": str(own_folder)})
    assert status == 200 and body["loaded"] is True
    assert [m["id"] for m in request(server, "GET", "/v1/models")[1]["data"]][-1] == "own-again"
    _, body, _ = chat(server, "own-again", PROMPTS[1])
    assert body["choices"][0]["message"]["content"] == offline["own", PROMPTS[1]]
    assert served.model.get_base_model() is base  # put on the same base, not a reloaded one
    for bad, needle in (({"lora_name": "own-again", "lora_path": str(own_folder)}, "already in use"),
                        ({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, "does not exist"),
                        ({"lora_name": "x"}, "missing required field 'lora_path'")):
        status, body, _ = request(server, "POST", "/v1/load_lora_adapter", bad)
        assert status == 400 and needle in body["error"]["message"], body
    status, body, _ = request(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "own-again"})
    assert status == 200 and "own-again" not in served.entries
    assert chat(server, "own-again", PROMPTS[1])[0] == 404
    assert request(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "own-again"})[0] == 404
    assert request(server, "POST", "/v1/unload_lora_adapter", {"lora_name": served.base_name})[0] == 400
    _, body, _ = chat(server, "own", PROMPTS[1])  # the others are untouched
    assert body["choices"][0]["message"]["content"] == offline["own", PROMPTS[1]]


def test_api_key(served):
    from tuneforge.deploy.serve_server import Server

    locked = Server(served, port=0, api_key="s3cret").start()
    try:
        status, body, _ = request(locked, "GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer s3cret"}
        status, body, _ = request(locked, "GET", "/v1/models", headers=key)
        assert status == 200 and len(body["data"]) == 4
        status, body, _ = request(locked, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "y"},
                                  headers=key)
        assert status == 403 and "--allow-adapter-loading" in body["error"]["message"]
    finally:
        locked.stop()


# ------------------------------------------------------------------------------------------------ the command

def test_the_command_serves(monkeypatch, model_dir, own_folder, offline):
    """`tuneforge serve` itself (in a thread, port 0), its options reaching the server."""
    import time

    from tuneforge.deploy import serve_server

    running, real_run = [], serve_server.Server.run
    monkeypatch.setattr(serve_server.Server, "run", lambda self: (running.append(self), real_run(self)))
    result = {}
    command = ["serve", str(model_dir), "--adapter", f"own={own_folder}", "--port", "0", "--max-model-len", "300",
               "--threads", "1"]
    thread = threading.Thread(target=lambda: result.update(out=CliRunner().invoke(app, command)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (running and running[0].server.started):
        assert time.monotonic() < deadline and thread.is_alive(), result
        time.sleep(0.05)
    try:
        status, body, _ = request(running[0], "GET", "/v1/models")
        assert [(m["id"], m["max_model_len"]) for m in body["data"]] == [(str(model_dir), 300), ("own", 300)]
        _, body, _ = chat(running[0], "own", PROMPTS[0])
        assert body["choices"][0]["message"]["content"] == offline["own", PROMPTS[0]]
    finally:
        running[0].server.should_exit = True
        thread.join(30)
    assert result["out"].exit_code == 0 and f"{running[0].url}/v1" in " ".join(result["out"].stdout.split())


def test_print_vllm(monkeypatch, lora_run, own_folder, model_dir):
    import tuneforge.deploy.serve as serve

    monkeypatch.setattr(serve, "load_served", lambda *a, **k: pytest.fail("--print-vllm must not load the model"))
    result = CliRunner().invoke(app, ["serve", str(lora_run), "--adapter", f"own={own_folder}", "--port", "9001",
                                      "--print-vllm"])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith(f"vllm serve {model_dir} ") and "\n" not in line
    assert f"--lora-modules {lora_run.name}={lora_run / 'adapter'} own={own_folder}" in line
    assert "--enable-lora" in line and "--max-loras 2" in line and "--port 9001" in line
    assert "--max-lora-rank 32" in line  # ranks 16 and 20: the next value vLLM accepts above 20
    assert "--dtype" not in line
    result = CliRunner().invoke(app, ["serve", str(lora_run), "--print-vllm", "--dtype", "float32"])
    assert result.exit_code == 0 and "--dtype float32" in result.stdout


def test_dtype_option(monkeypatch, capsys, lora_run, model_dir):
    """--dtype loads the weights in that dtype (serve and generate alike); a wrong one is a clear error."""
    from tuneforge.deploy.serve import load_served, plan_serving
    from tuneforge.models import load_target

    def dtypes(model):  # the base's weights (PEFT keeps LoRA weights in fp32 on any base: autocast_adapter_dtype)
        return {p.dtype for n, p in model.named_parameters() if "lora_" not in n}

    served = load_served(plan_serving(str(lora_run), []), device="cpu", dtype="bfloat16")
    assert dtypes(served.model) == {torch.bfloat16}
    model, _ = load_target(str(lora_run), device="cpu", dtype="bfloat16")
    assert dtypes(model) == {torch.bfloat16}
    model, _ = load_target(str(model_dir), device="cpu", dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.dtype for p in load_target(str(lora_run), device="cpu")[0].parameters()} == {torch.float32}
    for command in (["serve", str(lora_run), "--dtype", "fp8"], ["generate", str(lora_run), "--prompt", "hi",
                                                                   "--dtype", "[fp8]"]):
        code, err = run_cli(monkeypatch, capsys, *command)
        assert code != 0 and "Traceback" not in err, err
        assert f"{command[-1]!r} is not a dtype tuneforge loads weights in" in err and "auto, float32" in err


def test_base_as_a_lora_run_serves_its_adapter_under_the_run_name(lora_run, model_dir):
    from tuneforge.deploy.serve import plan_serving

    plan = plan_serving(str(lora_run), [])
    assert plan.names == [str(model_dir), lora_run.name]
    assert plan.adapters[0].folder == lora_run / "adapter" and plan.adapters[0].rank == 16


def test_plan_errors(tmp_path, lora_run, model_dir, own_folder):
    from tuneforge.deploy.serve import ServeError, parse_adapter_options, plan_serving

    with pytest.raises(ServeError, match="expected NAME=RUN_DIR"):
        parse_adapter_options(["no-equals-sign"])
    with pytest.raises(ServeError, match="does not exist"):
        plan_serving(str(model_dir), [("x", str(tmp_path / "missing"))])
    with pytest.raises(ServeError, match="used twice"):
        plan_serving(str(model_dir), [("x", str(own_folder)), ("x", str(lora_run))])
    with pytest.raises(ServeError, match="was trained on"):
        plan_serving("embedded:smollm2-135m-instruct", [("tuned", str(lora_run))])
    with pytest.raises(ServeError, match="adapter folder, not a model"):
        plan_serving(str(own_folder), [])


def test_host_must_be_loopback(monkeypatch, capsys, model_dir):
    from tuneforge.deploy.serve import ServeError, check_host

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_host(host, allow_remote=False)
    for host in ("0.0.0.0", "192.168.1.20", "example.com"):
        with pytest.raises(ServeError, match="not a loopback address"):
            check_host(host, allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)
    code, text = run_cli(monkeypatch, capsys, "serve", str(model_dir), "--host", "0.0.0.0")
    assert code == 2 and "not a loopback address" in text and "--allow-remote" in text


def test_embedded_model(smol_tokenizer):
    """The shipped model, served, answers as `tuneforge generate` does."""
    from tuneforge.deploy.serve import load_served, plan_serving
    from tuneforge.deploy.serve_server import Server
    from tuneforge.evaluate.generation import generate_answers
    from tuneforge.models import load_target

    name = "embedded:smollm2-135m-instruct"
    served = load_served(plan_serving(name, []), device="cpu")
    running = Server(served, port=0).start()
    try:
        status, body, _ = chat(running, name, "What is the capital of France?", max_tokens=8)
    finally:
        running.stop()
    assert status == 200
    model, tokenizer = load_target(name, device="cpu")
    expected = generate_answers(model, tokenizer, [_chat(tokenizer, "What is the capital of France?")],
                                max_new_tokens=8)[0]
    assert body["choices"][0]["message"]["content"] == expected and "Paris" in expected
