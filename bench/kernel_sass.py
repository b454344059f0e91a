#!/usr/bin/env python3
"""Instruction counts of this project's kernels, with no GPU: a kernel file compiled by NVRTC
the way src/backend/cuda/compile.rs compiles it, then each entry point's registers and spills
(ptxas) and its main loop's instructions by opcode (cuobjdump's SASS). The decode GEMMs are
often bound by what they issue, so this is the prediction to make before timing a change.

    python3 bench/kernel_sass.py kernels/grouped_gemm_quant.cu --fun 'qgemm_mxfp4_s_' \\
        [-D NAME=VALUE ...] [--arch sm_90a] [--dump]

"Main loop": the backward branch whose body holds the most MMA instructions (the k loop of a
GEMM), with every path of the loop counted: compare variants by forcing a path with -D where
the source offers one, or read --dump. Needs NVRTC (`pip install nvidia-cuda-nvrtc==13.0.88`,
found as compile.rs finds it: $FDMOE_NVRTC_DIR, else the pip package) and cuobjdump
(`pip install nvidia-cuda-cuobjdump`, or the CUDA toolkit's on $PATH)."""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def nvidia_dir(sub: str) -> Path | None:
    try:
        import nvidia  # the pip packages' namespace
    except ImportError:
        return None
    for root in nvidia.__path__:
        d = Path(root) / "cu13" / sub
        if d.is_dir():
            return d
    return None


def load_nvrtc():
    d = os.environ.get("FDMOE_NVRTC_DIR") or nvidia_dir("lib")
    if d is None:
        sys.exit("NVRTC not found: set FDMOE_NVRTC_DIR or pip install nvidia-cuda-nvrtc==13.0.88")
    libs = sorted(Path(d).glob("libnvrtc.so*"))
    if not libs:
        sys.exit(f"no libnvrtc.so in {d}")
    # NVRTC opens its builtins library by name: loaded first, globally, it is found.
    for builtins in sorted(Path(d).glob("libnvrtc-builtins.so*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(libs[0]))


def compile_cubin(path: Path, arch: str, defines: list[str]) -> tuple[bytes, str]:
    lib = load_nvrtc()
    prog = ctypes.c_void_p()
    src = path.read_bytes()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.name.encode(), 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    # compile.rs's options, plus the include folder (it inlines includes itself) and ptxas -v.
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "--device-as-default-execution-space",
            "--extra-device-vectorization", f"-I{REPO / 'kernels'}", "-Xptxas=-v"]
    if arch == "sm_90a":
        opts.append("-DFDMOE_SM90A")
    opts += [f"-D{d}" for d in defines]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    status = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace")
    if status:
        sys.exit(f"NVRTC failed ({status}):\n{text}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw, text


def ptxas_info(log: str) -> dict[str, str]:
    """Entry point -> 'R registers, S spill bytes' from ptxas -v."""
    info, fun = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            fun = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fun:
            info[fun] = f"spills {m.group(1)}/{m.group(2)} B"
        m = re.search(r"Used (\d+) registers", line)
        if m and fun:
            info[fun] = f"{m.group(1)} registers, " + info.get(fun, "")
    return info


def sass_of(cubin: bytes, fun: str) -> list[tuple[int, str]]:
    tool = shutil.which("cuobjdump") or (str(nvidia_dir("bin") / "cuobjdump") if nvidia_dir("bin") else None)
    if tool is None or not Path(tool).exists():
        sys.exit("cuobjdump not found: pip install nvidia-cuda-cuobjdump, or put the toolkit's on PATH")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-sass", "-fun", fun, f.name], capture_output=True, text=True).stdout
    ins = []
    for line in out.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,6})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    return ins


def main_loop(ins: list[tuple[int, str]]) -> list[tuple[int, str]]:
    best: tuple[int, list] = (-1, [])
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [x for x in ins if int(m.group(1), 16) <= x[0] <= addr]
            mma = sum("MMA" in x[1] for x in body)
            if (mma, len(body)) > (best[0], len(best[1])):
                best = (mma, body)
    return best[1]


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
    return text.split()[0].split(".")[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path, help="a kernel source, e.g. kernels/grouped_gemm_quant.cu")
    ap.add_argument("--fun", default="", help="regex of the entry points to report (default: all)")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="a macro, NAME or NAME=VALUE")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--dump", action="store_true", help="print each reported main loop's SASS")
    args = ap.parse_args()
    cubin, log = compile_cubin(args.file, args.arch, args.defines)
    info = ptxas_info(log)
    for fun in sorted(f for f in info if re.search(args.fun, f)):
        ins = sass_of(cubin, fun)
        loop = main_loop(ins)
        ops = Counter(opcode(t) for _, t in loop)
        mmas = ", ".join(f"{ops[k]} {k}" for k in ("HMMA", "HGMMA") if ops.get(k)) or "no MMA"
        print(f"{fun}: {info[fun]}; {len(ins)} instructions, main loop {len(loop)} ({mmas})")
        print("    " + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
        if args.dump:
            for addr, text in loop:
                print(f"    {addr:#07x} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
