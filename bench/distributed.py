"""Optimizer steps per rank on DTensor params sharded as FSDP2 shards them (dim 0, 1-D mesh), against the same
optimizer on plain tensors of the shard's sizes, in the same process.

    python -m bench --world-size 2 [--preset llama-20m] [--rounds 10] [--only NAME ...]

Each rank (gloo on CPU, 127.0.0.1; cores split evenly between the ranks) builds every contender twice: on the
DTensor shards, and on plain tensors shaped as its shards. Rounds rotate the order of all of them, each step starting
after a barrier; the table reports medians over rounds and the slowest rank. "collectives" is the time spent in
torch.distributed calls inside the sharded step (Stable-SPAM's statistics), "state" the bytes of optimizer state this
rank holds (its shards).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.contenders import CONTENDERS, PRESETS, llama_shapes

NAMES = ("torch AdamW (foreach)", "torch AdamW (fused)", "fastopt.AdamW", "fastopt.AdamW 8-bit states",
         "fastopt.AdamW 4-bit states", "fastopt.StableSPAM 4-bit states", "fastopt.SPAM 4-bit states")
DEFAULT_PRESET = "llama-20m"  # two ranks of llama-110m, each contender built twice, would need ~16 GiB


def local_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors this rank holds (a DTensor counts its local shard)."""
    total = 0
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                t = t.to_local() if hasattr(t, "to_local") else t
                total += t.numel() * t.element_size()
    return total


class CollectiveClock:
    """Adds up the wall time of the torch.distributed calls made through the module (fastopt calls them so)."""

    CALLS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.seconds = 0.0
        for name in self.CALLS:
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return call


def _rank(rank: int, world: int, port: int, preset: str, rounds: int, warmup: int, only, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    import fastopt._ext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fastopt._ext.load()
    mesh = init_device_mesh("cpu", (world,))
    shapes = llama_shapes(**PRESETS[preset])
    def shard(t: torch.Tensor) -> DTensor:
        """``t``'s Shard(0) DTensor (every rank has t), its local shard in storage of its own as FSDP2 holds it
        (distribute_tensor's is a view into t, a layout whose memory traffic differs from a compact tensor's)."""
        d = distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)
        return DTensor.from_local(d.to_local().clone(), mesh, [Shard(0)], run_check=False, shape=d.shape,
                                  stride=d.stride())

    torch.manual_seed(0)
    grads = [shard(torch.randn(s) * 1e-3) for s in shapes]
    contenders = [c for c in CONTENDERS if c.name in NAMES and c.available() and
                  (not only or any(o in c.name for o in only))]

    def params(sharded: bool):
        torch.manual_seed(1)
        ps = []
        for s, g in zip(shapes, grads):
            p = shard(torch.empty(s).normal_(0, 0.02))
            p = torch.nn.Parameter(p if sharded else p.to_local().clone())
            p.grad = g if sharded else g.to_local()
            ps.append(p)
        return ps

    clock = CollectiveClock()
    opts, failed = {}, {}
    for c in contenders:
        for sharded in (True, False):
            try:
                opt = c.make(params(sharded))
                for _ in range(warmup):
                    opt.step()
                opts[(c.name, sharded)] = opt
            except Exception as e:  # noqa: BLE001 (a peer that does not take DTensors is reported, not fatal)
                failed[c.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    names = [c.name for c in contenders if c.name not in failed]
    tasks = [(name, sharded) for name in names for sharded in (True, False)]
    times = {task: [] for task in tasks}
    comm = {name: [] for name in names}
    for r in range(rounds):
        for task in tasks[r % len(tasks):] + tasks[:r % len(tasks)]:
            dist.barrier()
            clock.seconds = 0.0
            start = time.perf_counter()
            opts[task].step()
            times[task].append(time.perf_counter() - start)
            if task[1]:
                comm[task[0]].append(clock.seconds)
    mine = {name: {"ms_sharded": statistics.median(times[(name, True)]) * 1e3,
                   "ms_local": statistics.median(times[(name, False)]) * 1e3,
                   "ms_collectives": statistics.median(comm[name]) * 1e3,
                   "state_mib": local_state_bytes(opts[(name, True)]) / 2**20,
                   "local_params": sum(g.to_local().numel() for g in grads)} for name in names}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": everyone, "failed": failed,
                                         "threads_per_rank": torch.get_num_threads()}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, preset: str, rounds: int, warmup: int, only) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        mp.spawn(_rank, args=(world, free_port(), preset, rounds, warmup, only, out), nprocs=world)
        ranks = json.loads(Path(out).read_text())
    shapes = llama_shapes(**PRESETS[preset])
    n = sum(torch.Size(s).numel() for s in shapes)
    rows = []
    for name in ranks["ranks"][0]:
        per_rank = [r[name] for r in ranks["ranks"]]
        slowest = max(per_rank, key=lambda r: r["ms_sharded"])
        rows.append({"optimizer": name, "ms_per_step": slowest["ms_sharded"], "ms_on_local_tensors": slowest["ms_local"],
                     "vs_local": slowest["ms_sharded"] / slowest["ms_local"],
                     "ms_collectives": slowest["ms_collectives"],
                     "state_mib_per_rank": max(r["state_mib"] for r in per_rank), "per_rank": per_rank})
    from bench.run import machine

    return {"preset": preset, "params": n, "tensors": len(shapes), "world_size": world, "rounds": rounds,
            "warmup": warmup, "threads_per_rank": ranks["threads_per_rank"], "failed": ranks["failed"],
            "machine": machine(), "rows": rows, "command": "python -m bench " + " ".join(sys.argv[1:])}


def table(result: dict) -> str:
    lines = [f"{result['preset']}: {result['params'] / 1e6:.1f}M params in {result['tensors']} tensors, fp32, "
             f"DTensor shards (Shard(0)) on {result['world_size']} ranks (gloo, {result['threads_per_rank']} "
             f"thread(s) each); median of {result['rounds']} rotated rounds, slowest rank; {result['machine']['cpu']}",
             "",
             "| optimizer | ms/step per rank | same step on plain tensors of the shard's size | ratio | "
             "in collectives | state per rank |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['optimizer']} | {r['ms_per_step']:.1f} | {r['ms_on_local_tensors']:.1f} | "
                     f"{r['vs_local']:.2f}× | {r['ms_collectives']:.2f} ms | {r['state_mib_per_rank']:.0f} MiB |")
    for name, error in result["failed"].items():
        lines.append(f"\n{name}: not run on DTensors ({error})")
    return "\n".join(lines)
