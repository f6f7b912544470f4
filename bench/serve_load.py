"""Load test of `tuneforge serve` on loopback: N concurrent clients over a base and two LoRA adapters, against the
same requests sent one at a time. Every answer must equal its model's offline greedy answer (the code `tuneforge
generate` uses, one prompt at a time, in this process); the script exits 1 if one does not.

    python bench/serve_load.py                                   # embedded model, 2 seeded random adapters
    python bench/serve_load.py --clients 8 --rounds 3 --max-tokens 24
    python bench/serve_load.py --adapter support=runs/support    # real LoRA runs of the same base instead

The server is the real command (`python -m tuneforge serve ...`) in its own process, on a free 127.0.0.1 port.
Phases: offline answers -> start the server -> one warm-up request -> sequential (one client, one request at a
time) -> concurrent (--clients threads, each sending its --rounds requests back to back; all start together).
Bounded: --clients x --rounds requests per phase, --max-tokens per answer, and --time-limit seconds overall (the
server is stopped and the script fails past it). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BASE = "embedded:smollm2-135m-instruct"
PROMPTS = [  # quickstart-style requests (data/quickstart), short so a CPU phase stays within minutes
    'Extract the order as JSON with keys "name", "city", "item", "quantity".\n\nText: Hiro Chen (Zurich) ordered 6 x tent.',
    "Give me one tip for staying focused.",
    "What is the capital of Norway?",
    "Translate to French: good morning",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def random_adapters(folder: Path, base: str) -> list[tuple[str, str]]:
    """Two seeded random LoRA adapters for the embedded model (lora_B scaled so answers change but stay text)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneforge.models import load_target

    model, _ = load_target(base, device="cpu")
    pairs = []
    for name, seed, scale in (("adapter-a", 1, 1.0), ("adapter-b", 2, 0.6)):
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                                init_lora_weights=False))
        with torch.no_grad():
            for key, weight in peft.named_parameters():
                if "lora_B" in key:
                    weight.mul_(scale)
        peft.save_pretrained(folder / name)
        model = peft.unload()  # the base again, for the next adapter
        pairs.append((name, str(folder / name)))
    return pairs


def random_like(config_dir: Path, folder: Path, std: float = 0.1) -> str:
    """A seeded random-init model with config_dir's architecture and tokenizer (for a machine that cannot hold the
    embedded weights: same shapes, so the same serving cost; std above the default 0.02 keeps greedy argmaxes apart)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    config.initializer_range = std
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(folder)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, folder / name)
    return str(folder)


def offline_answers(pairs, work, max_tokens: int, base: str, device: str, dtype: str | None) -> tuple[dict, float]:
    """(name, prompt) -> greedy answer, one prompt at a time, as `tuneforge generate` answers (adapter folders are
    loaded as load_target loads a run's adapter/)."""
    from peft import PeftModel

    from tuneforge.data.template import render_chat
    from tuneforge.evaluate.generation import generate_answers
    from tuneforge.models import load_target

    answers, start = {}, time.perf_counter()
    for name in [base] + [n for n, _ in pairs]:
        path = dict(pairs).get(name)
        if path and (Path(path) / "recipe.yaml").exists():
            model, tokenizer = load_target(path, device=device, dtype=dtype)
        else:
            model, tokenizer = load_target(base, device=device, dtype=dtype)
            if path:
                model = PeftModel.from_pretrained(model, path).eval()
        for prompt in sorted({p for n, p in work if n == name}):
            text = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            answers[name, prompt] = generate_answers(model, tokenizer, [text], max_new_tokens=max_tokens)[0]
            log(f"offline {name}: {answers[name, prompt][:60]!r}")
        del model
    return answers, time.perf_counter() - start


def ask(port: int, name: str, prompt: str, max_tokens: int, timeout: float) -> tuple[str, float]:
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data}")
    return data["choices"][0]["message"]["content"], time.perf_counter() - start


def get(port: int, path: str):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def summary(latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]  # noqa: E731
    return {"requests": len(latencies), "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(ordered), 2), "p95_s": round(pick(0.95), 2),
            "max_s": round(ordered[-1], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=RUN (default: 2 random adapters)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, server and offline (on this "
                        "shared 2-core machine 1 thread generated 4-13x faster than 2 under load)")
    parser.add_argument("--base", default=BASE, help="model folder, run or embedded id (default: the embedded model)")
    parser.add_argument("--random-init-from", type=Path, help="serve a seeded random-init model with this folder's "
                        "config and tokenizer instead of --base's weights")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="server and offline answers")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="weights dtype, server "
                        "and offline (default: auto = bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/2026-12-06-serve-load-cpu"))
    args = parser.parse_args()
    deadline, began, load_start = time.monotonic() + args.time_limit, time.perf_counter(), os.getloadavg()[0]
    import torch

    torch.set_num_threads(args.threads)
    left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731

    scratch = Path(tempfile.mkdtemp(prefix="serve-load-"))
    if args.random_init_from:
        args.base = random_like(args.random_init_from, scratch / "random-base")
    pairs = [tuple(a.split("=", 1)) for a in args.adapter] or random_adapters(scratch, args.base)
    names = [args.base] + [n for n, _ in pairs]
    # client c, round r asks model names[(c + r) % len] prompt PROMPTS[(c + r // 2) % len]: every client mixes models
    work = [[(names[(c + r) % len(names)], PROMPTS[(c + r // 2) % len(PROMPTS)]) for r in range(args.rounds)]
            for c in range(args.clients)]
    flat = [item for client in work for item in client]
    log(f"{len(flat)} requests per phase over {names}; offline answers first")
    expected, offline_s = offline_answers(pairs, set(flat), args.max_tokens, args.base, args.device, args.dtype)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tuneforge", "serve", args.base, "--device", args.device, "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", "20", "--threads", str(args.threads)]
    command += ["--dtype", args.dtype] if args.dtype else []
    command += [f"--adapter={n}={p}" for n, p in pairs]
    log("server: " + " ".join(command))
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))})
    threading.Thread(target=lambda: [print("  server| " + line, end="") for line in server.stdout], daemon=True).start()
    wrong: list[dict] = []
    try:
        while True:
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        log("server up; warm-up request")
        ask(port, args.base, PROMPTS[0], args.max_tokens, left())

        def check(name, prompt, answer):
            if answer != expected[name, prompt]:
                wrong.append({"model": name, "prompt": prompt, "served": answer, "offline": expected[name, prompt]})

        log("sequential phase")
        latencies, start = [], time.perf_counter()
        for i, (name, prompt) in enumerate(flat):
            answer, seconds = ask(port, name, prompt, args.max_tokens, left())
            check(name, prompt, answer)
            latencies.append(seconds)
            log(f"  {i + 1}/{len(flat)} {name} {seconds:.1f}s")
        sequential = summary(latencies, time.perf_counter() - start)
        before = get(port, "/tuneforge/stats")[1]

        log(f"concurrent phase: {args.clients} clients")
        latencies, errors, lock = [], [], threading.Lock()
        gate = threading.Barrier(args.clients)

        def client(items):
            gate.wait()
            for name, prompt in items:
                try:
                    answer, seconds = ask(port, name, prompt, args.max_tokens, left())
                except Exception as exc:  # noqa: BLE001 - reported, and the run fails
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    check(name, prompt, answer)
                    latencies.append(seconds)
                    log(f"  {len(latencies)}/{len(flat)} {name} {seconds:.1f}s")

        threads = [threading.Thread(target=client, args=(items,)) for items in work]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(left())
        concurrent = summary(latencies, time.perf_counter() - start) if latencies else {}
        after = get(port, "/tuneforge/stats")[1]
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)

    batches = after["batches"] - before["batches"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python bench/serve_load.py", *sys.argv[1:]]),
        "machine": (f"{torch.cuda.get_device_name(0)}, " if args.device == "cuda" else "") + f"CPU {os.cpu_count()} cores, "
                   f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end", "device": args.device,
        "dtype": args.dtype or "auto", "bench_wall_s": round(time.perf_counter() - began, 1),
        "base": args.base if not args.random_init_from else f"seeded random-init weights (std 0.1) with the architecture "
                f"and tokenizer of {args.random_init_from} (SmolLM2-135M)", "adapters": [n for n, _ in pairs], "clients": args.clients, "rounds": args.rounds,
        "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "threads": args.threads,
        "offline_one_at_a_time_s": round(offline_s, 1), "sequential": sequential, "concurrent": concurrent,
        "concurrent_batches": {"generate_calls": batches, "rows": after["rows"] - before["rows"],
                               "mixed_adapter_batches": after["mixed_batches"] - before["mixed_batches"],
                               "largest_batch": after["largest_batch"]},
        "speedup_requests_per_s": round(concurrent["requests_per_s"] / sequential["requests_per_s"], 2)
        if concurrent else None,
        "answers_checked": 2 * len(flat), "answers_different_from_offline": wrong, "client_errors": errors,
        "distinct_offline_answers": len(set(expected.values())), "offline_answers": len(expected),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    log(f"wrote {out.with_suffix('.json')} and .md")
    print(markdown(result))
    return 1 if wrong or errors or not concurrent else 0


def markdown(r: dict) -> str:
    s, c, b = r["sequential"], r["concurrent"], r["concurrent_batches"]
    rows = [f"| one at a time | {s['requests']} | {s['wall_s']} | {s['requests_per_s']} | {s['p50_s']} | {s['p95_s']} |"]
    if c:
        rows.append(f"| {r['clients']} concurrent clients | {c['requests']} | {c['wall_s']} | {c['requests_per_s']} | "
                    f"{c['p50_s']} | {c['p95_s']} |")
    wrong = len(r["answers_different_from_offline"])
    return "\n".join([
        f"# tuneforge serve load test ({r['date']})", "",
        f"`{r['command']}` -- {r['machine']}.", "",
        f"Base `{r['base']}` with adapters {', '.join(r['adapters'])} on one server; chat completions, greedy, "
        f"max_tokens {r['max_tokens']}, batches of up to {r['max_batch_size']}, {r['threads']} torch thread(s), weights "
        f"dtype {r.get('dtype', 'auto')} (auto = bf16 on a GPU, fp32 on CPU). Each client sends {r['rounds']} "
        "requests back to back, mixing models. Latency is per request, client side.", "",
        "| phase | requests | wall s | requests/s | p50 s | p95 s |", "|---|---|---|---|---|---|", *rows, "",
        f"Concurrent phase: {b['rows']} requests in {b['generate_calls']} generate() calls, {b['mixed_adapter_batches']} "
        f"of them mixing base and adapter rows (largest batch {b['largest_batch']}). Throughput x"
        f"{r['speedup_requests_per_s']} vs one at a time.", "",
        f"Answers checked against the offline greedy answers (one prompt at a time, the `tuneforge generate` code): "
        f"{r['answers_checked']}, different: {wrong}; client errors: {len(r['client_errors'])}. "
        f"{r['distinct_offline_answers']} distinct answers among {r['offline_answers']} (model, prompt) pairs.", ""])


if __name__ == "__main__":
    sys.exit(main())
