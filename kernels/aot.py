"""Compile the fused kernels for an NVIDIA target without a GPU (ahead of time), and report what the compiled
code contains: registers, spills, shared memory, and the matrix instructions (mma.sync / wgmma in the PTX,
HMMA / HGMMA in the SASS when nvdisasm is present) plus the dots of the TTGIR per loop nest.

The Triton interpreter executes the kernel's Python, so it cannot catch what only the GPU compiler
rejects (layouts, dot shapes, type errors in lowered code).  This module runs the real compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin) for e.g. sm_90 on a CPU-only host, and asks ptxas for the
register count and spills of the result (``ptxas -v``), which is how the default tile sizes were chosen.

    python -m kernels.aot                                   # v1 sweep (precision x BA), one line per config
    python -m kernels.aot --kernel v2                       # v2: episode + layer kernels, default tile
    python -m kernels.aot --kernel v1,v2 --maxnreg 168      # register cap (Triton's maxnreg; 0 = none)
    python -m kernels.aot --kernel v2 --rows 64,128 --num-warps 4,8 --precision tf32x3,ieee
    python -m kernels.aot --kernel v1,v2 --loops            # + the dots of the TTGIR per loop nest
    python -m kernels.aot --kernel v1,v2 --bilinear         # the bilinear cell (SubLSTMConfig.bilinear)

Must run *without* TRITON_INTERPRET=1 (the interpreter replaces the kernel object); the function
:func:`compile_kernel` raises a clear error otherwise.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

SIGNATURE = {
    "x_ptr": "*fp32", "y_ptr": "*i64", "theta_ptr": "*fp32", "h_ptr": "*fp32", "c_ptr": "*fp32",
    "bwd_ptr": "*fp32", "scr_ptr": "*fp32", "logits_ptr": "*fp32", "loss_ptr": "*fp32", "meta_ptr": "*i64",
    "T": "i32", "D": "i32", "C": "i32", "K": "i32", "theta_estride": "i64", "scr_estride": "i64",
    "r_off": "i64", "tanh_bound": "fp32", "logit_scale": "fp32", "ln_eps": "fp32",
}

#: argument types of the v2 kernels (pointers *fp32 unless listed; i32 / i64 / fp32 scalars)
_V2_TYPES = {
    "y_ptr": "*i64", "meta_ptr": "*i64",
    "T": "i32", "D": "i32", "C": "i32", "K": "i32", "t": "i32", "k": "i32", "S": "i32",
    "write_fwd": "i32", "write_bwd": "i32", "zero_err": "i32",
    "theta_estride": "i64", "scr_estride": "i64", "f_off": "i64", "r_off": "i64", "r_stride": "i64",
    "p_off": "i64", "p_stride": "i64", "tanh_bound": "fp32", "logit_scale": "fp32", "ln_eps": "fp32",
}


def default_constexprs(**over) -> dict:
    c = dict(N=16, M=8, NP=16, MP=16, BA=16, BR=16, BC=16, BX=128, MICRO=2, BACKWARD=False, LAYER_NORM=False,
             FEED_LABEL=False, IN_IDX=0, OUT_IDX=1, ERR_IDX=0, LBL_IDX=1, USE_DOT=True, PRECISION="ieee",
             BILINEAR=False)
    c.update(over)
    return c


def default_constexprs_v2(kernel: str = "episode", **over) -> dict:
    """Constexprs of a v2 kernel at the paper's cell (N=16, M=8) and a 784->10 layer: ROWS=64 (the GPU
    default), TAP = TBP = 16, BR = 32."""
    c = dict(N=16, M=8, NP=16, MP=16, ROWS=64, TAP=16, TBP=16, BR=32, BC=16, MICRO=2,
             BACKWARD=False, LAYER_NORM=False, FEED_LABEL=False, IN_IDX=0, OUT_IDX=1, ERR_IDX=0, LBL_IDX=1,
             PRECISION="tf32x3", FAST=True, BILINEAR=False)
    c.update(over)
    # partial-sum width as the host's _launch sets it: MP for per-pair read-outs (LayerNorm or bilinear), else NP
    c.setdefault("RW", c["MP"] if (c["LAYER_NORM"] or c["BILINEAR"]) else c["NP"])
    from .vsml_fused_v2 import vsml_v2_episode_kernel, vsml_v2_finish_kernel, vsml_v2_layer_kernel
    fn = {"episode": vsml_v2_episode_kernel, "layer": vsml_v2_layer_kernel,
          "finish": vsml_v2_finish_kernel}[kernel]
    names = set(fn.arg_names)
    return {k: v for k, v in c.items() if k in names}


def _ptxas() -> str | None:
    import triton
    cands = []
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cands += sorted(glob.glob(os.path.join(base, "ptxas*")), reverse=True)   # ptxas-blackwell first (newest)
    cands += ["/usr/local/cuda/bin/ptxas", "/usr/local/bin/ptxas"]
    return next((p for p in cands if os.path.exists(p)), None)


def _nvdisasm() -> str | None:
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    return p if os.path.exists(p) else None


def _check_env() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernels.aot needs TRITON_INTERPRET unset (the interpreter replaces the kernel); "
                           "run it in a separate process without TRITON_INTERPRET=1")


def _report(compiled, arch: int, num_warps: int, sass: bool = False) -> dict:
    """Resources and matrix instructions of a compiled kernel (ptxas -v on its PTX)."""
    ptx = compiled.asm["ptx"]
    ttgir = compiled.asm["ttgir"]
    info = {"arch": f"sm_{arch}", "num_warps": num_warps, "shared_bytes": compiled.metadata.shared,
            "registers": None, "spill_bytes": None, "stack_bytes": None,
            "ptx_mma": len(re.findall(r"\bmma\.sync\.", ptx)),
            "ptx_wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
            "ptx_fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
            "ttgir_dots": len(re.findall(r"= tt\.dot ", ttgir)) + len(re.findall(r"= ttng\.warp_group_dot ", ttgir)),
            "ttgir": ttgir, "ptx": ptx}
    ptxas = _ptxas()
    if ptxas is not None:
        a = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = os.path.join(tmp, "k.ptx")
            cubin = os.path.join(tmp, "k.cubin")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            res = subprocess.run([ptxas, f"-arch={a}", "-v", ptx_path, "-o", cubin],
                                 capture_output=True, text=True, check=False)
            if sass and _nvdisasm() and os.path.exists(cubin):
                dis = subprocess.run([_nvdisasm(), "-c", cubin], capture_output=True, text=True, check=False).stdout
                info["sass_hmma"] = len(re.findall(r"\bHMMA\.", dis))
                info["sass_hgmma"] = len(re.findall(r"\bHGMMA\.", dis))
                info["sass_mufu"] = len(re.findall(r"\bMUFU\.", dis))
                info["sass_stl"] = len(re.findall(r"\bSTL\b", dis))
        for line in res.stderr.splitlines():
            if "Used" in line and "registers" in line:
                info["registers"] = int(line.split("Used")[1].split("registers")[0])
            if "spill stores" in line:
                info["spill_bytes"] = int(line.split("bytes spill stores")[0].split(",")[-1])
            if "bytes stack frame" in line:
                info["stack_bytes"] = int(line.strip().split(" bytes stack frame")[0].split()[-1])
    return info


def compile_kernel(arch: int = 90, num_warps: int = 4, maxnreg: int | None = None, sass: bool = False,
                   **constexprs) -> dict:
    """Compile v1's ``vsml_episode_fwd_kernel`` for ``sm_<arch>``; returns a dict with the shared-memory
    size and, when a suitable ptxas is found, registers and spill bytes (plus instruction counts)."""
    _check_env()
    import triton
    from triton.backends.compiler import GPUTarget

    from .vsml_fused import vsml_episode_fwd_kernel

    const = default_constexprs(**constexprs)
    sig = dict(SIGNATURE)
    sig.update({k: "constexpr" for k in const})
    src = triton.compiler.ASTSource(fn=vsml_episode_fwd_kernel, signature=sig, constexprs=const)
    opts = dict(num_warps=num_warps)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return _report(compiled, arch, num_warps, sass)


def compile_kernel_v2(kernel: str = "episode", arch: int = 90, num_warps: int = 4, num_stages: int = 1,
                      maxnreg: int | None = None, sass: bool = False, **constexprs) -> dict:
    """Compile a kernel-v2 program (``kernel``: "episode" = split_a 1, all ticks in one launch; "layer" =
    one layer update of grid (E, S); "finish" = the reduction launch) for ``sm_<arch>``."""
    _check_env()
    import triton
    from triton.backends.compiler import GPUTarget

    from . import vsml_fused_v2 as v2

    fn = {"episode": v2.vsml_v2_episode_kernel, "layer": v2.vsml_v2_layer_kernel,
          "finish": v2.vsml_v2_finish_kernel}[kernel]
    const = default_constexprs_v2(kernel, **constexprs)
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        else:
            sig[name] = _V2_TYPES.get(name, "*fp32")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    info = _report(compiled, arch, num_warps, sass)
    info["kernel"] = f"v2-{kernel}"
    return info


def _loc_resolver(ttgir: str):
    defs = dict(re.findall(r"^(#loc\d+) = (loc\(.*\))$", ttgir, re.M))

    def resolve(loc: str, depth: int = 0) -> str:
        d = defs.get(loc, "")
        if depth > 30:
            return "?"
        m = re.match(r'loc\("([^"]+)":(\d+):\d+\)', d)
        if m:
            return f"{os.path.basename(m.group(1))}:{m.group(2)}"
        m = re.match(r'loc\(callsite\((#loc\d+) at (#loc\d+)\)\)', d)
        if m:
            return resolve(m.group(1), depth + 1)
        m = re.match(r'loc\((?:"[^"]*"\()?(#loc\d+)\)?\)', d)
        if m:
            return resolve(m.group(1), depth + 1)
        return "?"
    return resolve


def loop_dots(ttgir: str) -> list[str]:
    """The TTGIR's functions, loop nest (scf.for / scf.if) and every dot: its shape, precision and source
    line.  One line per op, indented by nesting depth (relative to the function body); this is what the
    compiled code executes per iteration.  ``dot ... ieee [standard.py]`` is a ``tl.sum`` of a broadcast
    product that the compiler turned into an FMA dot."""
    resolve = _loc_resolver(ttgir)
    out = []
    base = None
    for line in ttgir.splitlines():
        s = line.strip()
        ind = len(line) - len(line.lstrip())
        is_for = " scf.for " in f" {s} " or s.startswith("scf.for")
        is_if = "scf.if " in s
        is_dot = "= tt.dot " in s or "= ttng.warp_group_dot " in s
        if s.startswith("tt.func"):
            name = re.search(r'@"?([^"\s(]+)', s)
            fname = name.group(1) if name else "?"
            out.append(f"func {re.sub(r'^.*[.]', '', fname.split('__')[0]) if '.' in fname else fname}")
            continue
        if not (is_for or is_if or is_dot):
            continue
        base = ind if base is None else min(base, ind)
        m = re.search(r"loc\((#loc\d+)\)\s*$", s)
        src = resolve(m.group(1)) if m else "?"
        if is_dot:
            shp = re.findall(r"tensor<(\d+)x(\d+)xf32", s)
            mem = re.findall(r"memdesc<(\d+)x(\d+)xf32", s)
            dims = shp[:1] + (mem[:1] if mem else shp[1:2])
            mk = f"{dims[0][0]}x{dims[0][1]} @ {dims[1][0]}x{dims[1][1]}" if len(dims) == 2 else "?"
            prec = "tf32" if "tf32" in s or "inputPrecision = 0" in s else "ieee"
            op = "wgmma" if "warp_group_dot" in s else "dot"
            out.append(f"{' ' * (ind - base)}{op} {mk} {prec}  [{src}]")
        else:
            out.append(f"{' ' * (ind - base)}{'for' if is_for else 'if'}  [{src}]")
    return out


# ------------------------------------------------------------------------------------------------
# roofline: the FLOPs the compiled code executes, counted from the loop nests printed by --loops


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def executed_flops_v1(dims, ba: int = 16, micro: int = 2, backward: bool = False, np_: int = 16,
                      mp: int = 16) -> dict:
    """FLOPs of v1's dots per example (all FMA dots at precision ieee), as its TTGIR executes them: per
    (a-tile, b) iteration 4 F dots + 4 gate dots per micro-step + the forward readout (+ the backward
    readout when the layer sends one): the F dots sit *inside* the b loop (see ``--loops``), not once
    per a-tile.  Plus the R dots once per layer update (4 per block of BR outputs)."""
    def update(k, a, b, fwd, bwd):
        br = max(min(1 << max(0, max(bb for _, bb in dims) - 1).bit_length(), 64), 16)
        per_iter = (4 + 4 * micro + fwd + bwd) * 2 * ba * np_ * np_      # every dot is [BA,16] x [16,16]
        return _cdiv(a, ba) * b * per_iter + _cdiv(b, br) * 4 * 2 * br * mp * np_
    total = 0
    for k, (a, b) in enumerate(dims):
        total += update(k, a, b, 1, 0 if backward else int(k > 0))
        if backward:
            total += update(k, a, b, 0, int(k > 0))
    return {"fma_dot_flops": total, "tensor_flops": 0}


def executed_flops_v2(dims, rows: int = 64, micro: int = 2, backward: bool = False, layer_norm: bool = False,
                      precision: str = "tf32x3", br: int = 32, n: int = 16, m: int = 8) -> dict:
    """FLOPs of v2's dots per example, as its TTGIR executes them (``--loops``): per tile (ROWS pairs) and
    micro-step one [ROWS, NP] x [NP, 4NP] gate dot in ``p3`` passes (3 for tf32x3); per tile and layer
    update the one-hot sums (``p2`` passes: [TBP, ROWS] x [ROWS, RW] forward, [TAP, ROWS] x [ROWS, RW]
    backward) and, with LayerNorm, the per-pair readout dots; per layer update F (A rows) and R (B rows)
    in blocks of BR; the backward projection [TAP, NP] x [NP, MP] per a-group in FMAs (no LN)."""
    from .vsml_fused_v2 import layer_tiling
    np_, mp = max(16, n), max(16, m)
    rw = mp if layer_norm else np_
    g4 = 4 * np_
    p3 = 3 if precision == "tf32x3" else 1
    p2 = 2 if precision == "tf32x3" else 1
    tiling, tap, tbp = layer_tiling(dims, rows)
    tensor, fma = 0, 0

    def update(k, fwd, bwd):
        a, b = dims[k]
        _, _, nb, ag = tiling[k]
        t = micro * p3 * 2 * rows * np_ * g4
        if fwd:
            t += (p3 * 2 * rows * np_ * mp if layer_norm else 0) + p2 * 2 * tbp * rows * rw
        if bwd:
            t += (p3 * 2 * rows * np_ * mp if layer_norm else 0) + p2 * 2 * tap * rows * rw
        t *= ag * nb
        t += (_cdiv(a, br) + _cdiv(b, br)) * p3 * 2 * br * mp * g4
        f = ag * 2 * tap * np_ * mp if (bwd and not layer_norm) else 0
        f += _cdiv(b, br) * 2 * br * rw * mp if (fwd and not layer_norm) else 0
        return t, f

    for k in range(len(dims)):
        t, f = update(k, 1, 0 if backward else int(k > 0))
        tensor, fma = tensor + t, fma + f
        if backward:
            t, f = update(k, 0, int(k > 0))
            tensor, fma = tensor + t, fma + f
    key = "tensor_flops" if precision != "ieee" else "fma_dot_flops"
    out = {"tensor_flops": 0, "fma_dot_flops": fma}
    out[key] += tensor
    return out


def roofline_rows(nets=((784, (), 10), (784, (32,), 10)), micro: int = 2) -> list[dict]:
    """Per example, forward-only: nominal FLOPs, executed dot FLOPs of v1 (BA=16) and v2 (64 rows, tf32x3),
    transcendental (MUFU) ops and HBM bytes of the state."""
    rows = []
    for d, hidden, c in nets:
        sizes = [d, *hidden, c]
        dims = list(zip(sizes[:-1], sizes[1:]))
        pairs = sum(a * b for a, b in dims)
        rows.append(dict(
            net="-".join(map(str, sizes)), pairs=pairs,
            nominal=pairs * micro * 4608,
            v1=executed_flops_v1(dims, micro=micro)["fma_dot_flops"],
            v2=executed_flops_v2(dims, micro=micro),
            v2_ieee=executed_flops_v2(dims, micro=micro, precision="ieee")["fma_dot_flops"],
            mufu_v1=pairs * micro * 16 * 10, mufu_v2=pairs * micro * 16 * 8,
            state_bytes=pairs * 16 * 4 * 4))
    return rows


def _fmt(r: dict, label: str) -> str:
    extra = ""
    if "sass_hmma" in r:
        extra = f" {r['sass_hmma']:>5} {r['sass_hgmma']:>5} {r['sass_mufu']:>5}"
    return (f"{label:<34} {r['num_warps']:>5} {r['registers']!s:>5} {r['spill_bytes']!s:>7} {r['shared_bytes']:>7} "
            f"{r['ptx_mma']:>5} {r['ptx_wgmma']:>6} {r['ptx_fma_f32']:>6} {r['ttgir_dots']:>5}{extra}")


@dataclass(frozen=True)
class AotArgs:
    arch: int = 90                    # CUDA compute capability x 10 (90: H100)
    kernel: str = "v1"                # v1, v2 (episode + layer + finish kernels), or both: v1,v2
    block_a: str = "16,32,64"         # v1: comma list of BA tile sizes (inputs a per tile)
    rows: str = "64"                  # v2: comma list of tile sizes (pairs per tile)
    precision: str = ""               # comma list; default ieee,tf32,tf32x3 for v1, tf32x3,ieee for v2
    num_warps: str = ""               # comma list; default 4 for v1, the v2 default tile's (8) for v2
    maxnreg: int = -1                 # register cap per thread; -1: none for v1, the v2 default tile's (168); 0: none
    backward_pass: bool = False
    layer_norm: bool = False
    bilinear: bool = False            # the bilinear cell (constexpr BILINEAR)
    sass: bool = False                # also count HMMA / HGMMA / MUFU in the SASS (nvdisasm)
    loops: bool = False               # print the TTGIR loop nest with its dots
    roofline: bool = False            # print the executed-FLOP counts per example (no compile) and exit


def main(argv: list[str] | None = None) -> None:
    from vsml.training.cli import parse
    args = parse(AotArgs, argv, prog="python -m kernels.aot", description=__doc__)
    precision = args.precision or None
    num_warps = args.num_warps or None
    maxnreg = None if args.maxnreg < 0 else args.maxnreg
    if args.roofline:
        print("| per example, forward-only, N=16, M=8, 2 micro-ticks | " + " | ".join(
            r["net"] for r in roofline_rows()) + " |")
        print("|---|" + "---:|" * len(roofline_rows()))
        rr = roofline_rows()
        lines = [
            ("sub-LSTM pairs", lambda r: f"{r['pairs']:,}"),
            ("nominal FLOPs (4608 per pair and micro-step)", lambda r: f"{r['nominal'] / 1e6:.1f} M"),
            ("v1 executed dot FLOPs (fp32 FMA)", lambda r: f"{r['v1'] / 1e6:.1f} M"),
            ("v2 tf32x3 executed tensor-core FLOPs", lambda r: f"{r['v2']['tensor_flops'] / 1e6:.1f} M"),
            ("v2 tf32x3 executed FMA-dot FLOPs", lambda r: f"{r['v2']['fma_dot_flops'] / 1e6:.2f} M"),
            ("v2 ieee executed dot FLOPs (fp32 FMA)", lambda r: f"{r['v2_ieee'] / 1e6:.1f} M"),
            ("MUFU ops v1 (5 exp + 5 div) / v2 (5 ex2 + 3 rcp)",
             lambda r: f"{r['mufu_v1'] / 1e6:.2f} M / {r['mufu_v2'] / 1e6:.2f} M"),
            ("HBM bytes: h, c read + written (256 B per pair)", lambda r: f"{r['state_bytes'] / 1e6:.2f} MB"),
        ]
        for name, f in lines:
            print(f"| {name} | " + " | ".join(f(r) for r in rr) + " |")
        return
    from .vsml_fused_v2 import GPU_CONFIGS
    _, v2_nw, _, v2_cap = GPU_CONFIGS[0]
    cap_v1 = maxnreg or None
    cap_v2 = (maxnreg or None) if maxnreg is not None else v2_cap
    warps_v1 = num_warps or "4"
    warps_v2 = num_warps or str(v2_nw)
    print(f"sm_{args.arch}, maxnreg v1 {cap_v1} / v2 {cap_v2}; mma / wgmma / fma = PTX instructions (mma.sync, "
          f"wgmma.mma_async, fma.rn.f32); dots = tt.dot + warp_group_dot ops in the TTGIR")
    print(f"{'kernel / precision / tile':<34} {'warps':>5} {'regs':>5} {'spill B':>7} {'smem B':>7} "
          f"{'mma':>5} {'wgmma':>6} {'fma':>6} {'dots':>5}" + (" HMMA HGMMA  MUFU" if args.sass else ""))
    loops = []
    kernels = args.kernel.split(",")
    for kern in kernels:
        if kern == "v1":
            for prec in (precision or "ieee,tf32,tf32x3").split(","):
                for ba in (int(v) for v in args.block_a.split(",")):
                    for nw in (int(v) for v in warps_v1.split(",")):
                        r = compile_kernel(args.arch, nw, cap_v1, args.sass, BA=ba, PRECISION=prec,
                                           BACKWARD=args.backward_pass, LAYER_NORM=args.layer_norm,
                                           BILINEAR=args.bilinear)
                        print(_fmt(r, f"v1 {prec} BA={ba}"), flush=True)
                        loops.append((f"v1 {prec} BA={ba} warps={nw}", r["ttgir"]))
        elif kern == "v2":
            for prec in (precision or "tf32x3,ieee").split(","):
                for rows in (int(v) for v in args.rows.split(",")):
                    for nw in (int(v) for v in warps_v2.split(",")):
                        for which in ("episode", "layer", "finish"):
                            if which == "finish" and (prec != (precision or "tf32x3").split(",")[0]
                                                      or rows != int(args.rows.split(",")[0])):
                                continue          # the reduction kernel has no dots of its own tiling
                            over = dict(PRECISION=prec, ROWS=rows, LAYER_NORM=args.layer_norm,
                                        BACKWARD=args.backward_pass, BILINEAR=args.bilinear)
                            r = compile_kernel_v2(which, args.arch, nw, 1, cap_v2, args.sass, **over)
                            print(_fmt(r, f"v2-{which} {prec} rows={rows}"), flush=True)
                            loops.append((f"v2-{which} {prec} rows={rows} warps={nw}", r["ttgir"]))
        else:
            raise SystemExit(f"unknown kernel {kern!r} (v1, v2)")
    if args.loops:
        for label, ttgir in loops:
            print(f"\n## TTGIR loop nest and dots: {label}")
            print("\n".join(loop_dots(ttgir)))


if __name__ == "__main__":
    main()
