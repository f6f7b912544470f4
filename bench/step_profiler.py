"""Where a whole training step's time goes, inside a real run (bench/speed.py --profile): steps `start`..`start+1`
under the torch profiler (CPU and CUDA), the next two under cProfile (Python). Written to PROFILE.txt in the
contender's work folder:

  - wall time of the profiled steps (CUDA-synced) and the GPU's busy share: the sum of CUDA kernel time over the
    wall time (far below 100 % = the GPU waits for the host: Python, launches, syncs);
  - the torch operators by self CPU time and by CUDA time;
  - the Python functions by own time and by cumulative time;
  - the host syncs of the two steps after those (CUDA: torch.cuda.set_sync_debug_mode("warn")), counted by the
    line of Python that asked for them -- a sync drains the launch queue, so the host's launch work is no longer
    hidden behind the GPU's. Syncs raised inside the autograd engine's backward threads are not seen there. On a CPU
    (nothing syncs there) the same steps count the calls that would sync on a GPU -- a tensor's value read into
    Python (.item(), bool(), int(), float(), .tolist()), a data-dependent shape (nonzero, masked_select, unique), a
    copy to the host -- so the sources can be found and removed before a GPU call measures them.

It hooks transformers.Trainer.__init__ to add a callback, so it works the same for tuneforge, TRL and Unsloth runs.
"""

from __future__ import annotations

import cProfile
import collections
import io
import pstats
import time
import traceback
import warnings
from pathlib import Path

_INTERNAL = ("/torch/", "/warnings.py", "step_profiler.py")
# torch functions that read a device tensor's value or shape into the host (what syncs on CUDA)
WOULD_SYNC = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero", "masked_select", "unique",
              "unique_consecutive", "cpu", "numpy", "bincount", "equal", "allclose"}


def caller(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of a stack that is not torch's own or this module's ('file:line function'): where a
    sync was asked for."""
    for frame in reversed(stack):
        if not any(part in frame.filename for part in _INTERNAL):
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "?"


def count_syncs(events: list[str], top: int = 25) -> list[str]:
    """Report lines: the sync count by calling line, most first."""
    counts = collections.Counter(events)
    return [f"{n:5d}  {where}" for where, n in counts.most_common(top)]


def would_sync_mode(record):
    """A TorchFunctionMode that calls record(caller) for every WOULD_SYNC call inside it (for CPU runs)."""
    from torch.overrides import TorchFunctionMode

    class WouldSync(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in WOULD_SYNC:
                record(f"{caller(traceback.extract_stack())} [{func.__name__}]")
            return func(*args, **(kwargs or {}))

    return WouldSync()


def install(out: Path, start: int = 4) -> None:
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    state = {"prof": None, "cprof": None, "t0": None, "lines": [], "syncs": None, "saved": None, "mode": None}

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def write():
        out.write_text("\n".join(state["lines"]) + "\n", encoding="utf-8")

    class StepProfiler(TrainerCallback):
        def on_step_begin(self, args, state_, control, **kwargs):
            step = state_.global_step  # steps done so far
            if step == start:
                sync()
                state["prof"] = profile(activities=[ProfilerActivity.CPU] + (
                    [ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif step == start + 2:
                sync()
                state["cprof"] = cProfile.Profile()
                state["t0"] = time.perf_counter()
                state["cprof"].enable()

        def on_step_end(self, args, state_, control, **kwargs):
            step = state_.global_step
            if step == start + 2 and state["prof"] is not None:
                sync()
                wall = time.perf_counter() - state["t0"]
                prof = state["prof"]
                prof.__exit__(None, None, None)
                averages = prof.key_averages()
                from torch.autograd import DeviceType

                kernel_us = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA)
                state["lines"] += [f"# torch profiler, steps {start + 1}-{start + 2}",
                                   f"wall {wall:.3f} s for 2 steps; CUDA kernels {kernel_us / 1e6:.3f} s = "
                                   f"{100 * kernel_us / 1e6 / wall:.1f} % busy", "",
                                   averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
                                   averages.table(sort_by="self_device_time_total", row_limit=30,
                                                  max_name_column_width=60)]
                state["prof"] = None
                write()
            elif step == start + 4 and state["cprof"] is not None:
                state["cprof"].disable()
                sync()
                wall = time.perf_counter() - state["t0"]
                for order in ("tottime", "cumulative"):
                    text = io.StringIO()
                    pstats.Stats(state["cprof"], stream=text).sort_stats(order).print_stats(35)
                    state["lines"] += [f"# cProfile, steps {start + 3}-{start + 4} ({wall:.3f} s wall), by {order}",
                                       text.getvalue()]
                state["cprof"] = None
                write()
                if torch.cuda.is_available():  # then two steps with every host sync located
                    state["syncs"], state["saved"] = [], (warnings.showwarning, warnings.filters[:])
                    warnings.simplefilter("always")

                    def record(message, category, filename, lineno, file=None, line=None):
                        if "synchroniz" in str(message):
                            state["syncs"].append(caller(traceback.extract_stack()))

                    warnings.showwarning = record
                    torch.cuda.set_sync_debug_mode("warn")
                else:  # CPU: the calls that would sync on a GPU
                    state["syncs"], state["mode"] = [], would_sync_mode(lambda where: state["syncs"].append(where))
                    state["mode"].__enter__()
            elif step == start + 6 and state["syncs"] is not None:
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode(0)
                    warnings.showwarning, warnings.filters[:] = state["saved"]
                    what = "host syncs"
                else:
                    state["mode"].__exit__(None, None, None)
                    what = "calls that would sync on a GPU (CPU run)"
                state["lines"] += [f"# {what}, steps {start + 5}-{start + 6}: {len(state['syncs'])} "
                                   "(by the line that asked for them)", *count_syncs(state["syncs"]), ""]
                state["syncs"] = None
                write()

    original = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(StepProfiler())

    transformers.Trainer.__init__ = init
