"""Compile the fused kernel for an NVIDIA target without a GPU (ahead of time), and report registers/spills.

The Triton interpreter executes the kernel's Python, so it cannot catch what only the GPU compiler
rejects (layouts, dot shapes, type errors in lowered code).  This module runs the real compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin) for e.g. sm_90 on a CPU-only host, and asks ptxas for the
register count and spills of the result (``ptxas -v``), which is how the default tile sizes were chosen.

    python -m kernels.aot                      # a small sweep, one line per config
    python -m kernels.aot --arch 90 --block-a 16,32 --precision ieee,tf32x3 --num-warps 4

Must run *without* TRITON_INTERPRET=1 (the interpreter replaces the kernel object); the function
:func:`compile_kernel` raises a clear error otherwise.
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
from dataclasses import dataclass

SIGNATURE = {
    "x_ptr": "*fp32", "y_ptr": "*i64", "theta_ptr": "*fp32", "h_ptr": "*fp32", "c_ptr": "*fp32",
    "bwd_ptr": "*fp32", "scr_ptr": "*fp32", "logits_ptr": "*fp32", "loss_ptr": "*fp32", "meta_ptr": "*i64",
    "T": "i32", "D": "i32", "C": "i32", "K": "i32", "theta_estride": "i64", "scr_estride": "i64",
    "r_off": "i64", "tanh_bound": "fp32", "ln_eps": "fp32",
}


def default_constexprs(**over) -> dict:
    c = dict(N=16, M=8, NP=16, MP=16, BA=16, BR=16, BC=16, BX=128, MICRO=2, BACKWARD=False, LAYER_NORM=False,
             FEED_LABEL=False, IN_IDX=0, OUT_IDX=1, ERR_IDX=0, LBL_IDX=1, USE_DOT=True, PRECISION="ieee")
    c.update(over)
    return c


def _ptxas() -> str | None:
    import triton
    cands = []
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cands += sorted(glob.glob(os.path.join(base, "ptxas*")), reverse=True)   # ptxas-blackwell first (newest)
    cands += ["/usr/local/cuda/bin/ptxas", "/usr/local/bin/ptxas"]
    return next((p for p in cands if os.path.exists(p)), None)


def compile_kernel(arch: int = 90, num_warps: int = 4, **constexprs) -> dict:
    """Compile ``vsml_episode_fwd_kernel`` for ``sm_<arch>``; returns a dict with the shared-memory
    size and, when a suitable ptxas is found, registers and spill bytes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernels.aot needs TRITON_INTERPRET unset (the interpreter replaces the kernel); "
                           "run it in a separate process without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget

    from .vsml_fused import vsml_episode_fwd_kernel

    const = default_constexprs(**constexprs)
    sig = dict(SIGNATURE)
    sig.update({k: "constexpr" for k in const})
    src = triton.compiler.ASTSource(fn=vsml_episode_fwd_kernel, signature=sig, constexprs=const)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    info = {"arch": f"sm_{arch}", "num_warps": num_warps, "shared_bytes": compiled.metadata.shared,
            "registers": None, "spill_bytes": None}
    ptxas = _ptxas()
    if ptxas is not None:
        a = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            res = subprocess.run([ptxas, f"-arch={a}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=False)
        for line in res.stderr.splitlines():
            if "Used" in line and "registers" in line:
                info["registers"] = int(line.split("Used")[1].split("registers")[0])
            if "spill stores" in line:
                info["spill_bytes"] = int(line.split("bytes spill stores")[0].split(",")[-1])
    return info


@dataclass(frozen=True)
class AotArgs:
    arch: int = 90                    # CUDA compute capability x 10 (90: H100)
    block_a: str = "16,32,64"         # comma list of BA tile sizes
    precision: str = "ieee,tf32,tf32x3"
    num_warps: str = "4"              # comma list
    backward_pass: bool = False
    layer_norm: bool = False


def main(argv: list[str] | None = None) -> None:
    from vsml.training.cli import parse
    args = parse(AotArgs, argv, prog="python -m kernels.aot", description=__doc__)
    print(f"{'precision':>9} {'BA':>4} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for prec in args.precision.split(","):
        for ba in (int(v) for v in args.block_a.split(",")):
            for nw in (int(v) for v in args.num_warps.split(",")):
                r = compile_kernel(args.arch, nw, BA=ba, PRECISION=prec, BACKWARD=args.backward_pass,
                                   LAYER_NORM=args.layer_norm)
                print(f"{prec:>9} {ba:>4} {nw:>5} {r['registers']!s:>5} {r['spill_bytes']!s:>8} "
                      f"{r['shared_bytes']:>7}", flush=True)


if __name__ == "__main__":
    main()
