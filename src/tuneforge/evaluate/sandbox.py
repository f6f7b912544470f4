"""Run untrusted Python (model-written code for pass@k) in a separate process with limits.

Isolation, in layers:
1. network: where `unshare` can make a new network namespace (root, or unprivileged user namespaces), the
   program runs in one with no interfaces at all (`unshare -rn`, else `unshare -n`), so nothing can be
   reached whatever the code does. Everywhere, the program also runs under a Python audit hook (installed
   before the candidate's code; PEP 578 hooks cannot be removed from Python) that refuses socket
   connect/bind/getaddrinfo/sendto and, where there is no network namespace, starting processes (so a
   candidate cannot reach the network through `curl` either). `SandboxResult.isolation` says which was used.
2. time: a wall-clock timeout (the whole process group is killed) and a CPU-seconds limit (RLIMIT_CPU);
3. memory and files: RLIMIT_AS (address space) and RLIMIT_FSIZE (largest file it may write), set by the child
   before the candidate runs;
4. filesystem: it runs in a fresh temporary directory (its HOME and cwd), deleted afterwards, with a minimal
   environment (no proxies, no tokens, HF_HUB_OFFLINE=1).

This is a sandbox against accidents and sloppy code, not against a determined attacker with a kernel exploit:
run evaluation of untrusted models in a container or VM as well.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Installed before the candidate runs. Audit hooks cannot be removed, and `_socket` raises these events in C,
# so importing `_socket` directly or reloading `socket` does not get around it.
_GUARD = r'''
import resource
import sys

def _cap(kind, value):
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))  # the hard limit too, so the candidate cannot raise it again

for _kind, _value in @@LIMITS@@:
    _cap(getattr(resource, _kind), _value)

_BLOCK_NET = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
              "socket.sendmsg", "socket.gethostbyaddr", "socket.getnameinfo"}
_BLOCK_PROC = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "pty.spawn"}
_block_proc = @@BLOCK_PROC@@

def _tuneforge_guard(event, args):
    if event in _BLOCK_NET:
        raise PermissionError(f"network access is blocked in the tuneforge sandbox ({event})")
    if _block_proc and event in _BLOCK_PROC:
        raise PermissionError(f"starting processes is blocked in the tuneforge sandbox ({event})")

sys.addaudithook(_tuneforge_guard)
del _tuneforge_guard
import runpy
sys.argv = ["candidate.py"]
runpy.run_path("candidate.py", run_name="__main__")
'''


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed for the timeout
    stdout: str
    stderr: str
    timed_out: bool
    isolation: str  # "netns" (no network namespace interfaces) or "audit-hook" (in-process blocking only)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...] | None:
    """The `unshare` command that gives a process a network namespace with no interfaces, if one works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for flags in (("-rn",), ("-n",)):
        try:
            ok = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return (unshare, *flags)
    return None


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int | None = 1024, file_mb: int = 16,
               stdin: str = "", isolate_network: bool = True, max_output: int = 20_000) -> SandboxResult:
    """Run `code` as a script in a fresh process and directory; see the module docstring for the limits."""
    prefix = network_namespace_prefix() if isolate_network else None
    isolation = "netns" if prefix else "audit-hook"
    with tempfile.TemporaryDirectory(prefix="tuneforge-sandbox-") as workdir:
        with open(os.path.join(workdir, "candidate.py"), "w", encoding="utf-8") as handle:
            handle.write(code)
        with open(os.path.join(workdir, "_guard.py"), "w", encoding="utf-8") as handle:
            # Limits are set by the child itself, first thing (preexec_fn is unsafe with threads, and pass@k runs
            # candidates from a thread pool).
            limits = [("RLIMIT_CPU", int(timeout) + 1), ("RLIMIT_FSIZE", file_mb * 2**20), ("RLIMIT_CORE", 0)]
            if memory_mb:
                limits.append(("RLIMIT_AS", memory_mb * 2**20))
            handle.write(_GUARD.replace("@@BLOCK_PROC@@", str(prefix is None)).replace("@@LIMITS@@", repr(limits)))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
               "HF_HUB_OFFLINE": "1", "TUNEFORGE_SANDBOX": "1"}
        # -I: isolated mode (no user site-packages, no PYTHON* variables, script dir not on sys.path);
        # -S is not used so the venv's site-packages (numpy etc.) stay importable.
        command = [*(prefix or ()), sys.executable, "-I", "_guard.py"]
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(stdin.encode("utf-8"), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(process)
            out, err = process.communicate()
            timed_out = True
        returncode = None if timed_out else process.returncode
        if returncode is not None and returncode < 0 and -returncode == signal.SIGXCPU:
            timed_out, returncode = True, None
    return SandboxResult(returncode, out.decode("utf-8", "replace")[-max_output:],
                         err.decode("utf-8", "replace")[-max_output:], timed_out, isolation)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
