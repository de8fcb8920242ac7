"""Notebook kernels forked from one warm process: `make run-all` starts every notebook's kernel by forking a server
that has already imported what each notebook's first cells import (torch, pandas, matplotlib, IPython's kernel, this
package), instead of a fresh Python that imports them again: about 3 s of each notebook's start on the CPU VM.

The kernel is the same ipykernel a kernelspec would start, with the same argv, environment and working directory; only
the interpreter's start is shared. jupyter_client drives it through `WarmProvisioner` (its `LocalProvisioner`, with
a forked pid in place of a Popen): signals, interrupts and shutdown work as for a local kernel. Where the server cannot
serve (another kernelspec, the server gone) or FP8PARITY_WARM_KERNELS=0, the kernel starts as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import uuid

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

# What the notebooks import before their first measurement; imported once, in the server. Not the inline backend:
# imported where no IPython shell runs yet, it would not hook itself into the kernel's, and figures a cell leaves open
# would not be shown (pyplot loads it in the kernel, at the first figure).
PRELOAD = ("numpy", "torch", "pandas", "tqdm", "matplotlib.pyplot", "IPython", "ipykernel.kernelapp",
           "fp8parity.workbench", "fp8parity.stages", "fp8parity.plots")
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"  # what ipykernel sets before a notebook's matplotlib
LAUNCHER = "ipykernel_launcher"


def serve() -> None:
    """The server's loop: import PRELOAD, then fork one kernel per request line ({argv, env, cwd}) and answer its pid.
    Exits when its stdin closes (the runner is done or gone)."""
    os.environ.setdefault("MPLBACKEND", INLINE_BACKEND)
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # kernels are reaped as they exit: their pids then vanish
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _kernel(request)
        print(pid, flush=True)


def _kernel(request: dict) -> None:
    """In the forked child: become the kernel jupyter_client asked for, then exit."""
    code = 1
    try:
        os.setsid()  # its own process group, as jupyter_client starts a local kernel
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # a notebook's subprocesses are waited for as usual
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(2, 1)  # the server's stdout is the pipe to the runner; the kernel's output goes where its errors go
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = request["argv"]
        # its parent is this server (which exits when the runner does): the kernel exits when that parent goes, and
        # prints no connection banner (a trait read from JPY_PARENT_PID when the server imported ipykernel)
        sys.argv = [LAUNCHER, *argv[argv.index(LAUNCHER) + 1:], f"--IPKernelApp.parent_handle={os.getppid()}"]
        sys.path[0] = os.getcwd()  # as `python -m` puts it, for the launcher to take out as it does
        runpy.run_module(LAUNCHER, run_name="__main__", alter_sys=True)
        code = 0
    finally:
        os._exit(code)


class ForkServer:
    """The warm process, started with the runner's environment (threads, allocator tunables) and stopped with it."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", "from fp8parity.warm_kernels import serve; serve()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lock = threading.Lock()

    def fork(self, argv: list[str], env: dict, cwd: str) -> int | None:
        """A kernel's pid, or None where the server is gone."""
        with self._lock:
            try:
                self._proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": cwd}) + "\n")
                self._proc.stdin.flush()
                answer = self._proc.stdout.readline()
            except (BrokenPipeError, OSError):
                return None
        return int(answer) if answer.strip() else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


_server: ForkServer | None = None


@contextlib.contextmanager
def fork_server():
    """Kernels started inside (by `WarmKernelManager`) are forked from one warm server, which stops on leaving; with
    FP8PARITY_WARM_KERNELS=0 they start as usual."""
    global _server
    if os.environ.get("FP8PARITY_WARM_KERNELS", "1") == "0":
        yield None
        return
    _server = ForkServer()
    try:
        yield _server
    finally:
        server, _server = _server, None
        server.close()


class ForkedProcess:
    """What LocalProvisioner asks of a Popen, for a kernel that is not this process's child."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None
        self.stdin = self.stdout = self.stderr = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = 0  # gone (its server reaped it; the exit status is not ours to read)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"kernel {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class WarmProvisioner(LocalProvisioner):
    async def launch_kernel(self, cmd: list[str], **kwargs):
        server = _server
        pid = None
        if server is not None and LAUNCHER in cmd:
            env = dict(kwargs.get("env") or os.environ) | {"JPY_PARENT_PID": str(os.getpid())}  # as jupyter_client's
            cwd = str(kwargs.get("cwd") or os.getcwd())
            pid = await asyncio.get_running_loop().run_in_executor(None, server.fork, list(cmd), env, cwd)
        if pid is None:
            return await super().launch_kernel(cmd, **kwargs)
        self.process = ForkedProcess(pid)
        self.pid = self.pgid = pid
        self.cwd = kwargs.get("cwd")
        return self.connection_info


class WarmKernelManager(AsyncKernelManager):
    """nbclient's kernel manager, its kernels from the fork server where one runs (`fork_server`)."""

    async def _async_pre_start_kernel(self, **kw):
        if self.provisioner is None:
            self.kernel_id = self.kernel_id or kw.pop("kernel_id", str(uuid.uuid4()))
            self.provisioner = WarmProvisioner(kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self)
        return await super()._async_pre_start_kernel(**kw)
