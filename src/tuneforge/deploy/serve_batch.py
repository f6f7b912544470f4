"""The batching loop of `tuneforge serve`: one worker thread owns the model.

Requests become Jobs on a queue. The worker takes the first waiting job, collects whatever else arrives within a few
milliseconds (up to --max-batch-size), checks each prompt against the length limit, and answers every batch with ONE
call of the project's generation code (evaluate/generation.generate_answers, the code `tuneforge generate` uses), so
answers are the same greedy answers. Rows for different adapters share that call through PEFT's mixed-adapter batch
inference (`adapter_names=[...]`, one name per row, "__base__" for the base).

generate_answers sees the model through `_BatchModel`, which adds to each generate() call what a server batch needs
and a one-prompt command does not: the rows' adapter names, the served name's generation config, and `RowTracker`,
a stopping criterion that ends each row at its own max_tokens / stop strings / disconnect and hands streamed text out
as it is produced.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from tuneforge.deploy.serve import Served, ServedModels

log = logging.getLogger("tuneforge.serve")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One prompt to answer. `emit(kind, payload)` is called from the worker thread: ("admitted", None),
    ("delta", text) when streaming, ("done", result dict) or ("error", exception)."""
    served: Served
    prompt: str  # already templated (chat) or raw (completions)
    max_tokens: int | None  # None: the server's default, cut to what the length limit leaves
    stop: list[str]
    stream: bool
    emit: object
    param: str = "messages"  # the request field an error about the prompt names
    cancelled: bool = False  # set when the client went away; the row then stops at its next token
    prompt_tokens: int = 0
    budget: int = 0


@dataclass
class Control:
    """Work for the worker thread between batches (hot-loading or unloading an adapter): `action()` runs there, and
    `emit` gets ("done", its result) or ("error", exception)."""
    action: object
    emit: object


@dataclass
class _Row:
    job: Job
    tokenizer: object
    eos: set
    tokens: list = field(default_factory=list)
    finish: str | None = None
    sent: str = ""  # streamed so far

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class RowTracker:
    """A transformers stopping criterion (called once per generated token with the whole batch): records each row's
    new token, decides per row whether it is finished, and streams the text a row has produced."""

    def __init__(self, jobs: list[Job], tokenizer, eos_ids: list[int]):
        self.rows = [_Row(job, tokenizer, set(eos_ids)) for job in jobs]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if row.finish is not None:
                continue  # the row's later tokens are padding
            row.tokens.append(token)
            job = row.job
            if token in row.eos:
                row.finish = "stop"
            elif job.stop and cut_at_stop(row.text(), job.stop) is not None:
                row.finish = "stop"
            elif len(row.tokens) >= job.budget:
                row.finish = "length"
            elif job.cancelled:
                row.finish = "cancelled"
            if job.stream and row.finish is None:
                self._push(row)
        return torch.tensor([row.finish is not None for row in self.rows], dtype=torch.bool, device=input_ids.device)

    @staticmethod
    def _push(row: _Row) -> None:
        """Stream the new text, holding back what could still become a stop string or an unfinished character."""
        text = row.text()
        if row.job.stop:
            text = text[: max(0, len(text) - (max(len(s) for s in row.job.stop) - 1))]
        text = text.rstrip("\ufffd")  # a multi-byte character cut in the middle decodes as U+FFFD
        if len(text) > len(row.sent) and text.startswith(row.sent):
            row.job.emit("delta", text[len(row.sent):])
            row.sent = text

    def finish(self, index: int, answer: str) -> None:
        """The row's final answer (generate_answers' text, cut at a stop string): stream the rest, then report."""
        row = self.rows[index]
        if row.job.stop:
            cut = cut_at_stop(answer, row.job.stop)
            answer = answer if cut is None else answer[:cut]
        if row.job.stream:
            if answer.startswith(row.sent) and len(answer) > len(row.sent):
                row.job.emit("delta", answer[len(row.sent):])
            elif not answer.startswith(row.sent):
                log.warning("streamed text %r is not a prefix of the answer %r", row.sent, answer)
        row.job.emit("done", {"text": answer, "finish_reason": row.finish or "length",
                              "prompt_tokens": row.job.prompt_tokens, "completion_tokens": len(row.tokens)})


class _BatchModel:
    """The served model as generate_answers sees it: everything is the model's, except that generate() also gets
    this batch's generation config and extra arguments (adapter names, the row tracker)."""

    def __init__(self, model, generation_config, extra: dict):
        self._model, self._extra = model, extra
        self.generation_config = generation_config

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        return self._model.generate(**kwargs, generation_config=self.generation_config, **self._extra)


class Batcher:
    """The worker thread and its queue."""

    def __init__(self, served: ServedModels, *, max_batch_size: int = 8, wait_ms: float = 10.0,
                 default_max_tokens: int = 256, threads: int | None = None):
        self.served, self.threads = served, threads
        self.max_batch_size, self.wait_s, self.default_max_tokens = max_batch_size, wait_ms / 1000, default_max_tokens
        self.queue: queue.Queue[Job | Control] = queue.Queue()
        self._current: list[Job] = []  # the batch being generated (stop() cancels its rows)
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "mixed_batches": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tuneforge-serve-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for job in list(self._current):
            job.cancelled = True  # the batch in flight ends at its next token
        self._thread.join(timeout=30)

    def submit(self, item: Job | Control) -> None:
        self.queue.put(item)

    def _loop(self) -> None:
        if self.threads:  # torch's CPU thread count, set in the thread that generates
            import torch

            torch.set_num_threads(self.threads)
        while not self._stop.is_set():
            try:
                items = [self.queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.wait_s
            while len(items) < self.max_batch_size:  # collect the requests that arrive together
                try:
                    items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            for control in (item for item in items if isinstance(item, Control)):
                try:
                    control.emit("done", control.action())
                except Exception as exc:  # noqa: BLE001 - answered to the caller
                    control.emit("error", exc)
            admitted = [job for job in items if isinstance(job, Job) and self._admit(job)]
            for batch in self._batches(admitted):
                self._current = batch
                self._run(batch)
                self._current = []

    def _admit(self, job: Job) -> bool:
        """Count the prompt's tokens (here, in the one thread that uses the tokenizers) and fix the row's budget;
        a prompt that does not fit is answered with a 400 naming the limit."""
        from tuneforge.evaluate.generation import CHARS_PER_TOKEN_BOUND, encode_prompts

        if job.cancelled:
            return False
        if self.served.entries.get(job.served.name) is not job.served:  # unloaded while the request waited
            job.emit("error", ApiError(404, f"The model `{job.served.name}` was unloaded.", param="model",
                                       code="model_not_found"))
            return False
        limit, source = self.served.max_model_len, self.served.limit_source
        try:
            if len(job.prompt) > limit * CHARS_PER_TOKEN_BOUND:  # surely too long: not worth tokenizing
                raise ApiError(400, f"This model's maximum context length is {limit} tokens ({source}). However, "
                               f"the {job.param} hold {len(job.prompt):,} characters, too many for {limit:,} tokens. "
                               f"Please reduce the length of the {job.param}.", param=job.param,
                               code="context_length_exceeded")
            ids, _ = encode_prompts(job.served.tokenizer, [job.prompt], None)
            n = len(ids[0])
            budget = job.max_tokens if job.max_tokens is not None else min(self.default_max_tokens, limit - n)
            if n + max(budget, 1) > limit:
                asked = f"{n + budget} tokens ({n} in the {job.param}, {budget} in the completion)" \
                    if job.max_tokens is not None else f"{n} tokens in the {job.param}, leaving no room for an answer"
                raise ApiError(400, f"This model's maximum context length is {limit} tokens ({source}). However, "
                               f"you requested {asked}. Please reduce the length of the {job.param} or max_tokens.",
                               param=job.param, code="context_length_exceeded")
        except ApiError as exc:
            job.emit("error", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a tokenizer failure answers this request, the server goes on
            log.exception("tokenizing a prompt failed")
            job.emit("error", exc)
            return False
        job.prompt_tokens, job.budget = n, budget
        job.emit("admitted", None)
        return True

    def _batches(self, jobs: list[Job]):
        """Rows that can share one generate(): same tokenizer and generation config (any adapters), and every prompt
        short enough that generate_answers keeps it whole next to the longest budget (it cuts prompts to the context
        less max_new_tokens)."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.served.batch_key, []).append(job)
        for group in groups.values():
            batch: list[Job] = []
            for job in group:
                grown = batch + [job]
                if batch and max(j.prompt_tokens for j in grown) + max(j.budget for j in grown) > self.served.context:
                    yield batch
                    grown = [job]
                batch = grown
            if batch:
                yield batch

    def _run(self, batch: list[Job]) -> None:
        from peft import PeftModel
        from transformers import StoppingCriteriaList

        from tuneforge.evaluate.generation import generate_answers

        model, first = self.served.model, batch[0].served
        config = first.generation_config
        eos = config.eos_token_id
        tracker = RowTracker(batch, first.tokenizer, [eos] if isinstance(eos, int) else list(eos or []))
        extra: dict = {"stopping_criteria": StoppingCriteriaList([tracker])}
        if isinstance(model, PeftModel):
            if first.dora:  # PEFT cannot mix DoRA rows; a DoRA adapter's batch holds only its rows
                model.set_adapter(first.adapter, inference_mode=True)
            else:
                extra["adapter_names"] = [job.served.adapter for job in batch]
        adapters = {job.served.adapter for job in batch}
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        self.stats["mixed_batches"] += len(adapters) > 1  # rows for different adapters (or base) in one forward
        try:
            answers = generate_answers(_BatchModel(model, config, extra), first.tokenizer,
                                       [job.prompt for job in batch], max_new_tokens=max(j.budget for j in batch),
                                       batch_size=len(batch))
        except Exception as exc:  # noqa: BLE001 - this batch's requests get a 500; the server goes on
            log.exception("generation failed for a batch of %d", len(batch))
            for job in batch:
                job.emit("error", exc)
            return
        for i, answer in enumerate(answers):
            tracker.finish(i, answer)
