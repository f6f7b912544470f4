"""Run untrusted Python (model-written code for pass@k and the `code_tests` reward) in a sandbox.

The sandbox is built from util-linux (essential on Debian, so always there): `unshare` for namespaces and
`setpriv` for dropping privileges. Where those work (`sandbox_mode()`), a candidate runs like this:

1. `unshare --pid --fork --kill-child --mount-proc --net --ipc` (as root), or the same with `--map-root-user`
   (a user namespace, for a non-root evaluator): its own PID namespace, so every process it starts -- even ones
   that `setsid` or double-fork -- dies with the namespace's first process, which tuneforge kills at the timeout;
   it cannot see or signal any process outside (the evaluator included). Its own network namespace with no
   interfaces (not even a working loopback): no TCP/UDP anywhere, no abstract unix sockets.
2. A setup step in that namespace (`_SETUP`, still privileged there) makes a private view of the filesystem:
   empty read-only tmpfs over /tmp, /var/tmp, /dev/shm, /run, /root, /home and $HOME (no filesystem unix sockets,
   no secrets, no other candidate's files), the Python installation bound back read-only, every other mount
   remounted read-only and nosuid, and the throw-away working directory bound back as the only writable place.
   It sets hard resource limits: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NPROC
   (processes), RLIMIT_NOFILE, RLIMIT_CORE=0.
3. `setpriv --no-new-privs --bounding-set=-all --inh-caps=-all` (and, as root, `--reuid/--regid` to `nobody`
   with `--clear-groups`) then executes the candidate: no capabilities, no way back, and as root a uid that cannot
   read /etc/shadow or root's files, nor signal root's processes.
4. In the candidate's interpreter a Python audit hook (PEP 578; cannot be removed) refuses socket
   connect/bind/... with a clear message, and, without a network namespace, starting processes.

Where no namespace can be made (no `unshare`, or a container/seccomp policy forbids it):
- as root, `run_python` refuses with `SandboxUnavailable` (a TuneforgeError saying how to get isolation), since
  the code could otherwise read and write anything;
- as a non-root user it falls back to a weaker sandbox ("audit-hook" mode): the audit hook also refuses
  starting processes, ctypes, sending signals and opening files for writing outside the working directory,
  plus the same resource limits; a candidate runs as the evaluating user, in its own session, killed at the
  timeout. `SandboxResult.mode` says which was used.

This protects against accidents, sloppy and malicious-but-ordinary code. It is not a defence against kernel
exploits: evaluate untrusted models in a container or VM as well.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from tuneforge.errors import TuneforgeError

# Namespace root, before the candidate: private read-only filesystem view, limits, then setpriv -> candidate.
_SETUP = r'''
import ctypes, errno, json, os, re, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
        "relatime": 1 << 21, "strictatime": 1 << 24}

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {target}: {os.strerror(code)}")

def fail(message):
    sys.stderr.write(f"tuneforge-sandbox-setup: {message}\n")
    os._exit(121)

try:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    workdir = cfg["workdir"]
    os.chdir(workdir)
    # O_PATH handles on what must stay visible, taken before the masks hide them
    keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in [workdir, *cfg["keep"]]}
    for path in cfg["masks"]:
        mount("tuneforge-sandbox", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
    for path, fd in keep.items():
        if not os.path.isdir(path) or not os.path.samestat(os.stat(path), os.fstat(fd)):
            os.makedirs(path, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
        os.close(fd)
    os.chdir(workdir)
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)
    with open("/proc/self/mountinfo") as handle:
        mounts = [(unescape(line.split()[4]), line.split()[5].split(",")) for line in handle]
    for target, options in mounts:
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (MS_NODEV if target == workdir else MS_RDONLY)
        for option in options:
            flags |= KEEP.get(option, 0)
        try:
            mount(None, target, None, flags)
        except OSError as error:
            # kernel pseudo-filesystems (permissions govern them) and paths that are gone or unreachable
            if not (target.startswith(("/proc/", "/sys/")) or error.errno in (errno.ENOENT, errno.EACCES)):
                raise
    for name, value in cfg["limits"]:
        resource.setrlimit(getattr(resource, name), (value, value))  # hard limit too: cannot be raised again
except OSError as error:
    fail(error)
os.execv(cfg["exec"][0], cfg["exec"])
'''

# The candidate's interpreter: audit hook (cannot be removed; `_socket` raises these events in C, so importing
# `_socket` directly or reloading `socket` does not get around it), limits in weak mode, then the candidate.
_GUARD = r'''
import os
import resource
import sys

_cfg = @@CONFIG@@
for _kind, _value in _cfg["limits"]:
    _soft, _hard = resource.getrlimit(getattr(resource, _kind))
    _value = _value if _hard == resource.RLIM_INFINITY else min(_value, _hard)
    resource.setrlimit(getattr(resource, _kind), (_value, _value))  # hard too, so it cannot be raised again

_BLOCK_NET = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
              "socket.sendmsg", "socket.gethostbyaddr", "socket.getnameinfo"}
_BLOCK_PROC = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "pty.spawn"}
_BLOCK_WEAK = {"os.kill", "os.killpg", "signal.pthread_kill", "signal.pidfd_send_signal", "ctypes.dlopen",
               "ctypes.dlsym", "ctypes.call_function", "os.setuid", "os.setgid"}
_MUTATE = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.chmod", "os.chown",
           "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "shutil.rmtree"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_block_proc, _weak = _cfg["block_proc"], _cfg["weak"]
_root = os.path.realpath(_cfg["workdir"])
_realpath, _isinstance, _str, _bytes, _fsdecode = os.path.realpath, isinstance, str, bytes, os.fsdecode

def _outside(path):
    if not _isinstance(path, (_str, _bytes)):
        return False  # a file descriptor: already open
    path = _realpath(_fsdecode(path))
    return path != _root and not path.startswith(_root + "/") and path != "/dev/null"

def _tuneforge_guard(event, args):
    if event in _BLOCK_NET:
        raise PermissionError(f"network access is blocked in the tuneforge sandbox ({event})")
    if _block_proc and event in _BLOCK_PROC:
        raise PermissionError(f"starting processes is blocked in the tuneforge sandbox ({event})")
    if _weak:
        if event in _BLOCK_WEAK:
            raise PermissionError(f"{event} is blocked in the tuneforge sandbox")
        if event == "open" and _outside(args[0]) and (
                (_isinstance(args[1], _str) and any(c in args[1] for c in "wax+"))
                or (args[1] is None and args[2] & _WRITE_FLAGS)):
            raise PermissionError(f"writing outside the sandbox directory is blocked: {args[0]}")
        if event in _MUTATE and any(_outside(a) for a in args[:2]):
            raise PermissionError(f"{event} outside the sandbox directory is blocked")

sys.addaudithook(_tuneforge_guard)
del _tuneforge_guard
import runpy
sys.argv = ["candidate.py"]
runpy.run_path("candidate.py", run_name="__main__")
'''

_SETUP_FAILED = 121  # exit code of _SETUP when it cannot build the sandbox
_NOBODY = 65534


class SandboxUnavailable(TuneforgeError):
    """Untrusted code would run without isolation (as root, with no namespaces): refused."""


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed for the timeout
    stdout: str
    stderr: str
    timed_out: bool
    isolation: str  # network: "netns" (a namespace with no interfaces) or "audit-hook" (in-process blocking only)
    mode: str = "weak"  # "root-ns" (namespaces + uid nobody), "user-ns" (user namespace) or "weak" (audit hook)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _is_root() -> bool:
    return os.geteuid() == 0


def _nobody() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return _NOBODY, _NOBODY


def _masks() -> list[str]:
    """Directories hidden behind an empty read-only tmpfs: shared scratch, sockets, and homes (secrets)."""
    paths = ["/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run", "/root", "/home", os.path.expanduser("~")]
    out: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if real == path and real != "/" and os.path.isdir(real) and real not in out:
            out.append(real)
    # an outer mask hides inner ones anyway; mounting both is harmless but the inner one would be hidden first
    return [p for p in out if not any(p.startswith(o + "/") for o in out if o != p)]


def _keep(masks: list[str]) -> list[str]:
    """The Python installation the candidate needs, bound back where a mask would hide it."""
    wanted = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)))}
    wanted |= {os.path.realpath(os.path.dirname(sys.executable))}
    keep = [p for p in sorted(wanted) if any(p.startswith(m + "/") for m in masks) and os.path.isdir(p)]
    return [p for p in keep if not any(p.startswith(k + "/") for k in keep if k != p)]


def _namespace_command(mode: str, isolate_network: bool) -> list[str]:
    unshare = shutil.which("unshare")
    flags = ["--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", *(["--net"] if isolate_network else [])]
    return [unshare, *(["--map-root-user"] if mode == "user-ns" else []), *flags]


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """"root-ns" or "user-ns" when namespaces work here (checked once by running a trivial program), else "weak"."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return "weak"
    for mode in (("root-ns",) if _is_root() else ("user-ns",)):
        try:
            result = _run("pass", mode=mode, timeout=30, memory_mb=None, file_mb=1, stdin="", isolate_network=True,
                          max_output=2000, max_processes=16, workdir=None)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.passed:
            return mode
    return "weak"


def network_namespace_prefix() -> tuple[str, ...] | None:
    """Kept for callers of the old API: the `unshare` command in use, or None when there are no namespaces."""
    mode = sandbox_mode()
    return None if mode == "weak" else tuple(_namespace_command(mode, True))


def _unavailable_message() -> str:
    missing = [tool for tool in ("unshare", "setpriv") if not shutil.which(tool)]
    why = (f"`{'` and `'.join(missing)}` not found" if missing
           else "`unshare` cannot create PID/mount/network namespaces here (a container's seccomp or "
                "capability policy forbids it)")
    return (f"refusing to run untrusted model-written code as root without isolation: {why}. Running it as root "
            "unconfined would let it read secrets, write anywhere and kill tuneforge.")


def run_python(code: str, *, timeout: float = 10.0, memory_mb: int | None = 1024, file_mb: int = 16,
               stdin: str = "", isolate_network: bool = True, max_output: int = 20_000, max_processes: int = 64,
               workdir: str | None = None) -> SandboxResult:
    """Run `code` as a script in the sandbox (see the module docstring) and return its exit status and output.

    workdir: run in this existing directory (kept afterwards) instead of a fresh temporary one (deleted).
    Raises SandboxUnavailable as root where no namespaces can be made.
    """
    mode = sandbox_mode()
    if mode == "weak" and _is_root():
        raise SandboxUnavailable(
            _unavailable_message(),
            fix="install util-linux (`unshare`, `setpriv`; `apt-get install util-linux`) on a host or container "
                "that allows namespaces (e.g. docker run --security-opt seccomp=unconfined, or --privileged), "
                "or run tuneforge as a non-root user")
    result = _run(code, mode=mode, timeout=timeout, memory_mb=memory_mb, file_mb=file_mb, stdin=stdin,
                  isolate_network=isolate_network, max_output=max_output, max_processes=max_processes,
                  workdir=workdir)
    if result.returncode == _SETUP_FAILED and "tuneforge-sandbox-setup:" in result.stderr:
        raise SandboxUnavailable(f"could not build the code sandbox: {result.stderr.strip()[-500:]}",
                                 fix="run tuneforge as a non-root user, or where mount namespaces work")
    return result


def _run(code: str, *, mode: str, timeout: float, memory_mb: int | None, file_mb: int, stdin: str,
         isolate_network: bool, max_output: int, max_processes: int, workdir: str | None) -> SandboxResult:
    limits = [("RLIMIT_CPU", int(timeout) + 1), ("RLIMIT_FSIZE", file_mb * 2**20), ("RLIMIT_CORE", 0),
              ("RLIMIT_NOFILE", 256)]
    if memory_mb:
        limits.append(("RLIMIT_AS", memory_mb * 2**20))
    if mode != "weak":  # counted per real uid (per user namespace in "user-ns"); weak mode starts no processes
        limits.append(("RLIMIT_NPROC", max_processes))
    owned = workdir is None
    workdir = os.path.realpath(workdir or tempfile.mkdtemp(prefix="tuneforge-sandbox-"))
    try:
        with open(os.path.join(workdir, "candidate.py"), "w", encoding="utf-8") as handle:
            handle.write(code)
        netns = mode != "weak" and isolate_network
        guard = {"limits": limits if mode == "weak" else [], "block_proc": not netns, "weak": mode == "weak",
                 "workdir": workdir}
        with open(os.path.join(workdir, "_guard.py"), "w", encoding="utf-8") as handle:
            handle.write(_GUARD.replace("@@CONFIG@@", repr(guard)))
        # -I: isolated mode (no user site-packages, no PYTHON* variables, script dir not on sys.path); -B: no .pyc.
        # -S is not used so the venv's site-packages (numpy etc.) stay importable.
        python = [sys.executable, "-I", "-B", "_guard.py"]
        if mode == "weak":
            command = python
        else:
            drop = ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
            if mode == "root-ns":
                uid, gid = _nobody()
                drop = [f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *drop]
                for path in (workdir, *(os.path.join(workdir, f) for f in ("candidate.py", "_guard.py"))):
                    os.chown(path, uid, gid)
            masks = _masks()
            setup = {"workdir": workdir, "masks": masks, "keep": _keep(masks), "limits": limits,
                     "exec": [shutil.which("setpriv"), *drop, "--", *python]}
            command = [*_namespace_command(mode, isolate_network), sys.executable, "-I", "-S", "-B", "-c", _SETUP,
                       json.dumps(setup)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
               "HF_HUB_OFFLINE": "1", "TUNEFORGE_SANDBOX": "1", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(stdin.encode("utf-8"), timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(process)
            try:
                out, err = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # something still holds the pipes: give up on its output
                _kill(process)
                process.stdout.close()
                process.stderr.close()
                process.wait()
                out, err = b"", b""
            timed_out = True
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    returncode = None if timed_out else process.returncode
    if returncode is not None and returncode < 0 and -returncode == signal.SIGXCPU:
        timed_out, returncode = True, None
    return SandboxResult(returncode, out.decode("utf-8", "replace")[-max_output:],
                         err.decode("utf-8", "replace")[-max_output:], timed_out,
                         "netns" if mode != "weak" and isolate_network else "audit-hook", mode)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except (OSError, ValueError):
        return []


def _kill(process: subprocess.Popen) -> None:
    """Kill the sandbox: the PID namespace's first process (all of the namespace dies with it), then the group."""
    for child in _children(process.pid):  # unshare's forked child, the namespace's init
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
