"""How long a small gloo all-reduce takes on this machine, by how long the ranks were busy before it:

    python -m bench.gloo_latency [--world-size 2] [--repeats 30]

Stable-SPAM's sharded step makes two all-reduces of a few hundred bytes (fastopt/ops/spam.py), each after a few ms
of compute; ``python -m bench --world-size 2`` reports their time in its "in collectives" column. This measures the
same kind of call alone: one all-reduce right after another one (0 ms), or after the ranks sleep for a while,
next to a TCP round trip of the same size between two processes after the same pause. Loopback only (127.0.0.1).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import time

import torch

from bench.distributed import free_port

GAPS_MS = (0, 1, 3, 5, 8, 15)


def _rank(rank: int, world: int, port: int, repeats: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    values = torch.zeros(64, dtype=torch.float64)
    medians = {}
    for gap in GAPS_MS:
        times = []
        for _ in range(repeats):
            dist.all_reduce(values)
            time.sleep(gap / 1e3)
            start = time.perf_counter()
            dist.all_reduce(values)
            times.append(time.perf_counter() - start)
        medians[gap] = statistics.median(times) * 1e3
    if rank == 0:
        out.put(medians)
    dist.barrier()
    dist.destroy_process_group()


def _echo(port: int, ready) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen(1)
        ready.set()
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(1024):
            conn.sendall(data)


def tcp_round_trips(repeats: int) -> dict[int, float]:
    """Median ms of a 512-byte TCP round trip to another process after each pause of GAPS_MS."""
    port, ctx = free_port(), multiprocessing.get_context("spawn")
    ready = ctx.Event()
    echo = ctx.Process(target=_echo, args=(port, ready), daemon=True)
    echo.start()
    ready.wait(30)
    medians = {}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for gap in GAPS_MS:
            times = []
            for _ in range(repeats):
                time.sleep(gap / 1e3)
                start = time.perf_counter()
                conn.sendall(b"x" * 512)
                received = 0
                while received < 512:
                    received += len(conn.recv(1024))
                times.append(time.perf_counter() - start)
            medians[gap] = statistics.median(times) * 1e3
    echo.join(10)
    return medians


def all_reduces(world: int, repeats: int) -> dict[int, float]:
    """Median ms of a 64-value gloo all-reduce on rank 0 after each pause of GAPS_MS."""
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_rank, args=(world, free_port(), repeats, out), nprocs=world,
                                          start_method="spawn")
    return out.get()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    reduce_ms, tcp_ms = all_reduces(args.world_size, args.repeats), tcp_round_trips(args.repeats)
    print(f"gloo all-reduce of 64 float64 values on {args.world_size} ranks (1 thread each), against a TCP round trip "
          f"of 512 bytes between two processes; medians of {args.repeats}, ms\n")
    print("| pause before the call (ms) | " + " | ".join(map(str, GAPS_MS)) + " |")
    print("|---|" + "---:|" * len(GAPS_MS))
    print("| gloo all-reduce | " + " | ".join(f"{reduce_ms[g]:.2f}" for g in GAPS_MS) + " |")
    print("| TCP round trip | " + " | ".join(f"{tcp_ms[g]:.2f}" for g in GAPS_MS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
