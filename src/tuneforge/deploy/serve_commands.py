"""tuneforge serve commands (typer), registered by deploy/commands.py. Heavy imports happen inside the verbs."""

from __future__ import annotations

from typing import Optional

import typer


def register(app) -> None:
    """Add the commands to `app`."""

    @app.command()
    def serve(
        base: str = typer.Argument(..., help="Run directory, model folder, hub id, or embedded:smollm2-135m-instruct. "
                                   "A LoRA run directory serves its base, and its adapter under the run folder's "
                                   "name."),
        adapter: list[str] = typer.Option([], "--adapter", help="NAME=RUN: serve a LoRA run's adapter (or a PEFT "
                                          "adapter folder) on the same base as model NAME (repeatable)."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback unless --allow-remote)."),
        port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
        print_vllm: bool = typer.Option(False, "--print-vllm", help="Print the equivalent `vllm serve` command and "
                                        "exit without loading anything."),
        allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a --host other machines can reach "
                                          "(there is no authentication unless --api-key)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNEFORGE_API_KEY",
                                              help="Require `Authorization: Bearer KEY` on /v1/ requests."),
        max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=2, help="Prompt + answer tokens "
                                                    "per request (default: the model's context)."),
        max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Answer budget when a request sets no "
                                       "max_tokens (tuneforge generate's default)."),
        max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="Most requests in one generate()."),
        batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0, help="How long the batcher collects "
                                            "requests arriving together before it starts a batch."),
        allow_adapter_loading: bool = typer.Option(False, "--allow-adapter-loading", help="Accept POST "
                                                   "/v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): "
                                                   "hot-load adapters from this machine's disk onto the running base."),
        device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when there is one)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Weights dtype: auto | float32 | bfloat16 | float16 "
                                            "(default: the base run's model.dtype; auto = bf16 on a GPU). In bf16 a "
                                            "greedy answer can change with the batch it shares (docs/deploy-serve.md)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for generation (default: "
                                              "torch's choice). On a CPU shared with other work, 1 can be faster."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run code shipped with the model "
                                               "(its own modelling files). Off unless you trust it."),
    ):
        """Serve a base model and LoRA adapters on one OpenAI-compatible server (chat, completions, streaming);
        requests for different adapters share one batched forward."""
        from rich.console import Console
        from rich.markup import escape

        from tuneforge.deploy.serve import check_host, load_served, parse_adapter_options, plan_serving, vllm_command
        from tuneforge.models import check_dtype_option

        console = Console()
        plan = plan_serving(base, parse_adapter_options(adapter), trust_remote_code=trust_remote_code)
        if print_vllm:
            print(vllm_command(plan, host=host, port=port, max_model_len=max_model_len, dtype=check_dtype_option(dtype)))
            return
        check_host(host, allow_remote)
        import importlib.util

        missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
        if missing:
            from tuneforge.deploy.serve import ServeError

            raise ServeError(f"tuneforge serve needs {' and '.join(missing)}, not installed",
                             fix="pip install fastapi uvicorn")
        from tuneforge.deploy.serve_server import Server, bind

        sock = bind(host, port)  # before loading: a taken port fails in a second, not after the model loaded
        with console.status(escape(f"loading {plan.base_name} and {len(plan.adapters)} adapter(s)")):
            served = load_served(plan, device=device, max_model_len=max_model_len, dtype=dtype)
        server = Server(served, host=host, port=port, max_batch_size=max_batch_size, wait_ms=batch_wait_ms,
                        default_max_tokens=max_tokens, api_key=api_key, allow_adapter_loading=allow_adapter_loading,
                        threads=threads, sock=sock)
        console.print(escape(f"serving {', '.join(plan.names)} at {server.url}/v1 (OpenAI API; max model length "
                             f"{served.max_model_len} tokens, batches of up to {max_batch_size}); Ctrl-C stops"),
                      highlight=False)
        server.run()
