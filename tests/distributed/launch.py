"""Runs a function on N ranks of a gloo process group (spawned processes on 127.0.0.1, a free port), bounded in time.

``run(world, fn, *args)`` calls ``fn(rank, world, *args)`` in each process; an exception in any rank fails the caller
with that rank's traceback, and a hang past ``timeout`` seconds kills every rank and fails too.
"""
from __future__ import annotations

import os
import socket
import sys
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)  # 2 cores, up to 4 ranks: threads would only contend
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done, and passed: leave without the interpreter's teardown. Beside busy cores, a rank of the HSDP test (several
    # meshes' subgroups) now and then aborted with "terminate called without an active exception" and no Python
    # traceback (1 in 12 runs; once in a CI run): presumably gloo's threads being torn down, since the test body
    # starts none of its own. Every rank has checked its results by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(world: int, fn, *args, timeout: float = 240) -> None:
    context = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish within {timeout} s")
