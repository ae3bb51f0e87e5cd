"""`python train.py ...` for the tests, with Python's imports paid once per test process instead of once a run.

Importing torch, Lightning, torchmetrics (which imports torchvision and torch._dynamo) and Hydra takes
about 10 s of CPU, more than a tiny run itself; most tests run train.py, and the suite would spend most
of its time importing. Run as a script, this file imports what train.py and scripts/ import, then
serves requests, one JSON line each on stdin: {"script": path, "argv": [...], "cwd": ..., "env": {...},
"stdout": path, "stderr": path, "start_new_session": bool}. For each it forks a child and answers
"started <pid>"; when a child ends it answers "exited <pid> <code>" (negative: the signal that killed it,
as subprocess reports it).
Several children may run at once.

The child leaves the serving loop and becomes `python <script> <argv>`: its own working directory,
environment, argv, sys.path and standard streams (stdin /dev/null, stdout and stderr to the files),
the script run as __main__, and Python's normal exit (atexit hooks, exit code, a traceback for an
uncaught exception). It is a copy of a process that imported modules and ran nothing else, as the children
of multiprocessing's forkserver are. What it does not get is what the interpreter reads only when it starts:
PYTHON* variables other than PYTHONPATH, -X options, and anything a module reads from the environment at
import (the tests set none of these). Warnings printed while importing went to this server's log.
conftest.py's PrewarmedScripts is the client. What the runs start themselves is as in users' runs: DDP ranks
fork from multiprocessing's forkserver (mlplab.launch), and SLURM, submitit and joblib start fresh interpreters.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import select
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOADED = ("train", "mlplab.evaluate", "mlplab.figures", "mlplab.report", "mlplab.hparams")


def reap() -> None:
    """Answers "exited <pid> <code>" for every child that has ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no children
            return
        if pid == 0:
            return
        print(f"exited {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def serve() -> dict:
    """Forks a child per request line; returns the request in the child, exits in the server at EOF.

    Reads stdin with os.read (not sys.stdin, whose buffer select() cannot see), waking every 50 ms to reap.
    """
    pending = b""
    while True:
        if select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 65536)
            if not chunk:  # the client closed stdin: end
                sys.exit(0)
            pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                return request
            print(f"started {pid}", flush=True)
        reap()


def become(request: dict) -> None:
    """What starting `python <script> <argv>` in request["cwd"] with request["env"] would have set."""
    if request.get("start_new_session"):  # as subprocess.Popen(start_new_session=True)
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, (path, flags) in enumerate(((os.devnull, os.O_RDONLY),
                                        (request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                        (request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC))):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    script = Path(request["script"]).resolve()
    sys.argv = [str(script), *request["argv"]]
    # the script's own folder first, then $PYTHONPATH, as `python <script>` starts (the rest is site-packages)
    sys.path[:1] = [str(script.parent), *(p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p)]


if __name__ == "__main__":
    # Ctrl-C at Python's default, whatever this process inherited: a background job of a non-interactive shell
    # (`bash .ci/run &`) starts with SIGINT ignored, and the tests that send it would otherwise see nothing happen
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[0] = str(ROOT)
    for module in PRELOADED:  # train.py's imports: its `if __name__ == "__main__"` block does not run
        importlib.import_module(module)
    request = serve()
    become(request)
    runpy.run_path(request["script"], run_name="__main__")
