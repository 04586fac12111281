"""Compile every fastopt Triton kernel ahead of time for real GPUs, without a GPU:

    python -m fastopt.kernels.triton.aot [--arch 80 90] [--json]

Each variant (dtypes × code-selecting flags) is lowered to PTX and cubin, then its PTX is read for 128-bit
global loads/stores (``ld.global.v4`` / ``st.global.v4``) and register spills (``.local`` traffic). A kernel
that only runs in the interpreter is not known to compile: this is the check that it does.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass

# Ahead-of-time compilation needs real JIT functions, not the interpreter's.
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("fastopt.kernels.triton.aot: unset TRITON_INTERPRET to compile for GPUs")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastopt.kernels.triton import _common, adam, quant, spam  # noqa: E402
from fastopt.kernels.triton._common import BLOCK  # noqa: E402


@dataclass
class Variant:
    kernel: str
    arch: int
    dtypes: str
    flags: str
    ok: bool
    error: str = ""
    v4_loads: int = 0
    v4_stores: int = 0
    spills: int = 0


POINTERS = {"table_ptr": "*i64", "block_map_ptr": "*i32"}  # every multi-tensor kernel starts with these
FLAGS = ("all off", "all on")


def adam_variants():
    """The Adam kernel for every dtype pair (float moments) and for 4- and 8-bit moments with fp32 and bf16 params,
    with its flags all off and all on; 16-byte aligned tensors (what torch allocates), and once unaligned."""
    flag_names = ["MAXIMIZE", "DECOUPLED", "INDEPENDENT_DECAY", "HAS_GRAD_SCALE", "HAS_FOUND_INF"]
    storages = [(param, state, 0) for param, state in [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"),
                                                        ("fp16", "fp16"), ("fp16", "fp32")]]
    storages += [(param, "u8", bits) for bits in (4, 8) for param in ("fp32", "bf16")]
    for (param, state, bits), on in itertools.product(storages, (False, True)):
        yield adam_variant(param, state, bits, on, flag_names, aligned=True)
    yield adam_variant("fp32", "fp32", 0, True, flag_names, aligned=False)


def adam_variant(param, state, bits, on, flag_names, aligned):
    signature = {**POINTERS, "p_like": f"*{param}", "m_like": f"*{state}", "m_map_ptr": "*fp32",
                 "v_map_ptr": "*fp32", "hp_ptr": "*fp64", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    constexprs = {name: on for name in flag_names}
    constexprs.update(AMSGRAD=on and not bits, BITS=bits, QBLOCK=256 if bits == 8 else 128,
                      NB=quant.blocks_per_program(bits) if bits else 1, BLOCK=BLOCK, ALIGNED=aligned)
    signature.update({k: "constexpr" for k in constexprs})
    dtypes = f"{param}/{f'{bits}-bit' if bits else state}"
    return "adam", adam.adam_kernel, dtypes, FLAGS[on] + ("" if aligned else ", unaligned"), signature, constexprs


def quant_variants():
    """The standalone codec kernels, at 4 and 8 bits."""
    for bits in (4, 8):
        block, nb = (128 if bits == 4 else 256), quant.blocks_per_program(bits)
        tile = {"BITS": bits, "QBLOCK": block, "NB": nb}
        yield ("quantize", quant.quantize_kernel, f"{bits}-bit", "-",
               {"x_ptr": "*fp32", "codes_ptr": "*u8", "scales_ptr": "*fp32", "map_ptr": "*fp32", "n": "i64",
                **{k: "constexpr" for k in tile}}, tile)
        yield ("dequantize", quant.dequantize_kernel, f"{bits}-bit", "-",
               {"codes_ptr": "*u8", "scales_ptr": "*fp32", "map_ptr": "*fp32", "out_ptr": "*fp32", "n": "i64",
                **{k: "constexpr" for k in tile}}, tile)


def spam_variants():
    """Stable-SPAM's reductions and statistics (per block, per tensor, and the sharded REDUCED forms), the counters,
    and the update of both algorithms (Stable-SPAM corrected and official, SPAM) for float moments of every dtype pair
    and 4- and 8-bit moments, with grad_scale and found_inf on and off."""
    for dtype, clipped in itertools.product(("fp32", "bf16", "fp16"), (False, True)):
        constexprs = {"HAS_GRAD_SCALE": True, "CLIPPED": clipped, "BLOCK": spam.PARTIAL_BLOCK, "ALIGNED": True}
        signature = {**POINTERS, "g_like": f"*{dtype}", "grad_scale_ptr": "*fp32", "maxes_ptr": "*fp32",
                     "sums_ptr": "*fp32", "work_ptr": "*fp32", **{k: "constexpr" for k in constexprs}}
        signature["partial_map_ptr"] = signature.pop("block_map_ptr")
        signature = {k: signature[k] for k in ["table_ptr", "partial_map_ptr", "g_like", "grad_scale_ptr", "maxes_ptr",
                                               "sums_ptr", "work_ptr", *constexprs]}
        yield "spam_partials", spam.partials_kernel, dtype, "clipped" if clipped else "-", signature, constexprs
    for on, reduced, official in [(False, False, False), (True, False, True), (True, True, False)]:
        flags = {"HAS_FOUND_INF": on, "OFFICIAL": official, "REDUCED": reduced, "R": spam.STATS_BLOCK}
        label = f"{FLAGS[on]}{', reduced' if reduced else ''}{', official' if official else ''}"
        yield ("adaclip_stats", spam.adaclip_kernel, "fp32", label,
               {"table_ptr": "*i64", "maxes_ptr": "*fp32", "work_ptr": "*fp32", "found_inf_ptr": "*fp32",
                "hp_ptr": "*fp64", **{k: "constexpr" for k in flags}}, flags)
        yield ("adagn_stats", spam.adagn_kernel, "fp32", label,
               {"table_ptr": "*i64", "sums_ptr": "*fp32", "reduced_ptr": "*fp64", "work_ptr": "*fp32",
                "found_inf_ptr": "*fp32", "hp_ptr": "*fp64", **{k: "constexpr" for k in flags}}, flags)
    for op, out in (("max", "*fp32"), ("sum", "*fp64")):
        flags = {"MAX": op == "max", "R": spam.STATS_BLOCK}
        yield ("tensor_stats", spam.tensor_stats_kernel, out[1:], op,
               {"table_ptr": "*i64", "values_ptr": "*fp32", "out_ptr": out, **{k: "constexpr" for k in flags}}, flags)
    for on in (False, True):
        flags = {"COLUMNS": spam.COLUMNS.value, "FIRST": spam.STEP.value, "SECOND": spam.STATS_STEP.value,
                 "HAS_FOUND_INF": on, "R": 128}
        yield ("advance", _common.advance_kernel, "fp32", FLAGS[on],
               {"table_ptr": "*i64", "count": "i64", "found_inf_ptr": "*fp32", **{k: "constexpr" for k in flags}},
               flags)

    modes = {"stable": dict(STABLE=True, OFFICIAL=False), "stable official": dict(STABLE=True, OFFICIAL=True),
             "spam": dict(STABLE=False, OFFICIAL=False)}
    storages = [(param, state, 0) for param, state in [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"),
                                                        ("fp16", "fp16")]]
    storages += [(param, "u8", bits) for bits in (4, 8) for param in ("fp32", "bf16")]
    # every mode and flag setting on fp32 params with fp32 and 4-bit moments; the two usual ones elsewhere
    common = [("stable", True), ("spam", False)]
    for (param, state, bits), mode, on in [(storage, mode, on) for storage in storages for mode, on in
                                           (itertools.product(modes, (False, True))
                                            if storage in (("fp32", "fp32", 0), ("fp32", "u8", 4)) else common)]:
        constexprs = {**modes[mode], "HAS_GRAD_SCALE": on, "HAS_FOUND_INF": on, "BITS": bits,
                      "QBLOCK": 256 if bits == 8 else 128, "NB": quant.blocks_per_program(bits) if bits else 1,
                      "BLOCK": BLOCK, "ALIGNED": True}
        signature = {**POINTERS, "p_like": f"*{param}", "m_like": f"*{state}", "m_map_ptr": "*fp32",
                     "v_map_ptr": "*fp32", "work_ptr": "*fp32", "hp_ptr": "*fp64", "grad_scale_ptr": "*fp32",
                     "found_inf_ptr": "*fp32", **{k: "constexpr" for k in constexprs}}
        dtypes = f"{param}/{f'{bits}-bit' if bits else state}"
        yield "spam_update", spam.spam_kernel, dtypes, f"{mode}, {FLAGS[on]}", signature, constexprs


def compile_variant(name, fn, dtypes, flags, signature, constexprs, arch) -> Variant:
    # Pointers and sizes are 16-byte divisible, as torch's allocations are: this is what allows 128-bit access.
    hinted = [i for i, (k, t) in enumerate(signature.items()) if t.startswith("*") or k == "n"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32))
    except Exception as e:  # report every failing variant, not just the first
        return Variant(name, arch, dtypes, flags, ok=False, error=f"{type(e).__name__}: {e}"[:500])
    ptx = compiled.asm["ptx"]
    ok = bool(compiled.asm.get("cubin"))
    return Variant(name, arch, dtypes, flags, ok=ok, error="" if ok else "no cubin produced",
                   v4_loads=ptx.count("ld.global.v4"), v4_stores=ptx.count("st.global.v4"),
                   spills=ptx.count("st.local") + ptx.count("ld.local"))


VARIANTS = list(itertools.chain(adam_variants(), quant_variants(), spam_variants()))


def _compile(job: tuple[int, int]) -> Variant:
    index, arch = job
    return compile_variant(*VARIANTS[index], arch)


def compile_all(archs=(80, 90)) -> list[Variant]:
    """Every variant for every arch, in as many processes as there are cores (each compile is single-threaded)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(i, arch) for arch in archs for i in range(len(VARIANTS))]
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, jobs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    results = compile_all(args.arch)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(f"{'kernel':21} {'sm':>3} {'dtypes':12} {'flags':26} {'ok':3} {'ld.v4':>5} {'st.v4':>5} {'spills':>6}")
        for r in results:
            print(f"{r.kernel:21} {r.arch:>3} {r.dtypes:12} {r.flags:26} {'yes' if r.ok else 'NO':3} "
                  f"{r.v4_loads:>5} {r.v4_stores:>5} {r.spills:>6}  {r.error}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
