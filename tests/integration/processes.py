"""The processes of a server a test started (never every process of that name on the machine)."""

import os

import psutil

from nirvana.tritonserver import TritonServer


def python_stubs(server: TritonServer, model: str):
    """The Python-backend stubs of ``model`` among the descendants of ``server``'s own process:
    never those of another Triton on the machine."""
    stubs = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            argv = process.cmdline()
        except psutil.NoSuchProcess:  # exited since it was listed: not a stub to kill
            continue
        if (argv and os.path.basename(argv[0]) == "triton_python_backend_stub"
                and any(f"/{model}/" in arg for arg in argv)):
            stubs.append(process)
    return stubs
