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

from fastopt.kernels.triton import adam, adam_quantized, quant, spam  # noqa: E402


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


def adam_variants():
    """(name, fn, signature, constexprs) for every dtype pair and two flag settings (all off / all on)."""
    dtype_pairs = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32")]
    flag_names = ["DECOUPLED", "INDEPENDENT_DECAY", "AMSGRAD", "LR_IS_TENSOR", "HAS_GRAD_SCALE", "HAS_FOUND_INF",
                  "HP_IS_TENSOR"]
    for (param, state), on in itertools.product(dtype_pairs, [False, True]):
        signature = {"p_ptr": f"*{param}", "g_ptr": f"*{param}", "m_ptr": f"*{state}", "v_ptr": f"*{state}",
                     "vmax_ptr": f"*{state}", "step_ptr": "*fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
                     "found_inf_ptr": "*fp32", "hp_ptr": "*fp32", "n": "i64"}
        signature.update({k: "fp32" for k in ["lr", "beta1", "beta2", "log_beta1", "log_beta2", "eps",
                                              "weight_decay", "grad_sign"]})
        constexprs = {name: on for name in flag_names}
        constexprs["BLOCK"] = adam.BLOCK
        signature.update({k: "constexpr" for k in constexprs})
        yield "adam", adam.adam_kernel, f"{param}/{state}", "all on" if on else "all off", signature, constexprs


def quant_variants():
    """The codec kernels and the quantized Adam step, at 4 and 8 bits, for fp32 and bf16 params."""
    for bits in (4, 8):
        block, nb = (128 if bits == 4 else 256), quant.blocks_per_program(bits)
        tile = {"BITS": bits, "QBLOCK": block, "NB": nb}
        yield ("quantize", quant.quantize_kernel, f"{bits}-bit", "-",
               {"x_ptr": "*fp32", "codes_ptr": "*u8", "scales_ptr": "*fp32", "map_ptr": "*fp32", "n": "i64",
                **{k: "constexpr" for k in tile}}, tile)
        yield ("dequantize", quant.dequantize_kernel, f"{bits}-bit", "-",
               {"codes_ptr": "*u8", "scales_ptr": "*fp32", "map_ptr": "*fp32", "out_ptr": "*fp32", "n": "i64",
                **{k: "constexpr" for k in tile}}, tile)
        for param, on in itertools.product(("fp32", "bf16"), (False, True)):
            signature = {"p_ptr": f"*{param}", "g_ptr": f"*{param}", "mc_ptr": "*u8", "ms_ptr": "*fp32",
                         "vc_ptr": "*u8", "vs_ptr": "*fp32", "m_map_ptr": "*fp32", "v_map_ptr": "*fp32",
                         "step_ptr": "*fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
                         "hp_ptr": "*fp32", "n": "i64"}
            signature.update({k: "fp32" for k in ["lr", "beta1", "beta2", "log_beta1", "log_beta2", "eps",
                                                  "weight_decay", "grad_sign"]})
            constexprs = {k: on for k in ["DECOUPLED", "INDEPENDENT_DECAY", "LR_IS_TENSOR", "HAS_GRAD_SCALE",
                                          "HAS_FOUND_INF", "HP_IS_TENSOR"]}
            constexprs.update(tile)
            signature.update({k: "constexpr" for k in constexprs})
            yield ("adam_quantized", adam_quantized.adam_quantized_kernel, f"{param}/{bits}-bit",
                   "all on" if on else "all off", signature, constexprs)


# The update kernel's modes: Stable-SPAM (no reset, corrected reset, official reset) and SPAM (clipping, reset).
SPAM_MODES = {
    "stable": dict(STABLE=True, CLIP=False, ZERO_OLD=False, STORE_ZEROS=False),
    "stable corr. reset": dict(STABLE=True, CLIP=False, ZERO_OLD=True, STORE_ZEROS=False),
    "stable off. reset": dict(STABLE=True, CLIP=False, ZERO_OLD=False, STORE_ZEROS=True),
    "spam clip": dict(STABLE=False, CLIP=True, ZERO_OLD=False, STORE_ZEROS=False),
    "spam reset": dict(STABLE=False, CLIP=False, ZERO_OLD=True, STORE_ZEROS=False),
}


def spam_variants():
    """Stable-SPAM's reductions, and the update of both algorithms: every mode with fp32 params and moments and
    4-bit moments, the common modes with the other dtype pairs and 8-bit moments, all with every flag on
    (LR_IS_TENSOR, grad_scale, found_inf, HP_IS_TENSOR); and the stats kernels and the common fp32 modes with every
    flag off."""
    for dtype, clipped in itertools.product(("fp32", "bf16", "fp16"), (False, True)):
        constexprs = {"HAS_GRAD_SCALE": True, "CLIPPED": clipped, "BLOCK": spam.PARTIAL_BLOCK}
        signature = {"g_ptr": f"*{dtype}", "grad_scale_ptr": "*fp32", "maxes_ptr": "*fp32", "sums_ptr": "*fp32",
                     "work_ptr": "*fp32", "n": "i64", **{k: "constexpr" for k in constexprs}}
        yield "spam_partials", spam.partials_kernel, dtype, "clipped" if clipped else "-", signature, constexprs
    stats = [("adaclip_stats", spam.adaclip_kernel, ["maxes_ptr", "u_ptr", "m_max_ptr"],
              ["theta", "one_minus_theta", "log_theta"], {}),
             ("adagn_stats", spam.adagn_kernel, ["sums_ptr", "u_ptr", "step_ptr", "m_norm_ptr", "v_norm_ptr"],
              ["gamma1", "one_minus_gamma1", "log_gamma1", "gamma2", "one_minus_gamma2", "log_gamma2", "eps"],
              {"RESET": True})]
    for (name, fn, pointers, floats, flags), on in itertools.product(stats, (True, False)):
        constexprs = {**flags, "HAS_FOUND_INF": on, "HP_IS_TENSOR": on, "R": spam.STATS_BLOCK}
        signature = {**{k: "*fp32" for k in pointers + ["work_ptr", "found_inf_ptr", "hp_ptr"]},  # argument order
                     "num_blocks": "i64", **{k: "fp32" for k in floats}, **{k: "constexpr" for k in constexprs}}
        yield name, fn, "fp32", ("reset, " if flags else "") + ("all on" if on else "all off"), signature, constexprs

    common_modes = ["stable", "stable off. reset", "spam clip"]
    scalars = {"step_ptr": "*fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
               "work_ptr": "*fp32", "hp_ptr": "*fp32", "n": "i64",
               **{k: "fp32" for k in ["lr", "beta1", "beta2", "log_beta1", "log_beta2", "eps", "weight_decay",
                                      "threshold", "scale"]}}
    flag_names = ["LR_IS_TENSOR", "HAS_GRAD_SCALE", "HAS_FOUND_INF", "HP_IS_TENSOR"]

    def flags(mode, on):
        return {**SPAM_MODES[mode], **{k: on for k in flag_names}}, mode + ("" if on else ", all off")

    plain = [("fp32", "fp32", mode, True) for mode in SPAM_MODES] + [
        (param, state, mode, True) for (param, state) in [("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16")]
        for mode in common_modes] + [("fp32", "fp32", mode, False) for mode in common_modes]
    for param, state, mode, on in plain:
        constexprs, label = flags(mode, on)
        constexprs["BLOCK"] = adam.BLOCK
        signature = {"p_ptr": f"*{param}", "g_ptr": f"*{param}", "m_ptr": f"*{state}", "v_ptr": f"*{state}",
                     **scalars, **{k: "constexpr" for k in constexprs}}
        yield "spam_update", spam.spam_kernel, f"{param}/{state}", label, signature, constexprs
    quantized = [("fp32", 4, mode, True) for mode in SPAM_MODES] + [
        (param, bits, mode, True) for (param, bits) in [("bf16", 4), ("fp32", 8), ("bf16", 8)]
        for mode in common_modes] + [("fp32", 4, mode, False) for mode in common_modes]
    for param, bits, mode, on in quantized:
        constexprs, label = flags(mode, on)
        constexprs.update(BITS=bits, QBLOCK=128 if bits == 4 else 256, NB=quant.blocks_per_program(bits))
        signature = {"p_ptr": f"*{param}", "g_ptr": f"*{param}", "mc_ptr": "*u8", "ms_ptr": "*fp32", "vc_ptr": "*u8",
                     "vs_ptr": "*fp32", "m_map_ptr": "*fp32", "v_map_ptr": "*fp32", **scalars,
                     **{k: "constexpr" for k in constexprs}}
        yield "spam_update_quantized", spam.spam_quantized_kernel, f"{param}/{bits}-bit", label, signature, constexprs


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


def compile_all(archs=(80, 90)) -> list[Variant]:
    variants = list(itertools.chain(adam_variants(), quant_variants(), spam_variants()))
    return [compile_variant(*v, arch) for arch in archs for v in variants]


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
