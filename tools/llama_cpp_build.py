"""How `make` builds the llama.cpp peer (llama-cpp-python): natively, minus what faults here.

    python tools/llama_cpp_build.py --cmake-args   # the CMAKE_ARGS for pip, one line
    python tools/llama_cpp_build.py                # the same, explained, for people

The peer is built with GGML_NATIVE=ON, as a user on this machine would build it. The one
exception is AMX: some Intel hosts advertise it in CPUID (`amx_tile`, `amx_int8`, `amx_bf16`
in /proc/cpuinfo) while the sandbox grants no tile state, and ggml's AMX path then dies with
SIGILL. Only those features are switched off, and only when the CPU reports them.

Why a compiler launcher and not CMAKE_C_FLAGS: with GGML_NATIVE=ON ggml adds `-march=native`
as a target option, which CMake places after CMAKE_C_FLAGS, and gcc's driver expands it into
explicit `-mamx-tile -mamx-int8 ...` flags that override an earlier `-mno-amx-*` (checked with
gcc 12 on a toy CMake project: the CMAKE_C_FLAGS build still defines __AMX_INT8__, the launcher
build does not). ggml's GGML_AMX_* options are read only when GGML_NATIVE is OFF. The launcher
(`tools/cc_without_amx.sh`) appends the `-mno-amx-*` flags last, so they win.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
LAUNCHER = TOOLS / "cc_without_amx.sh"
# /proc/cpuinfo flag → the gcc/clang option that turns the feature off
FAULTING = {"amx_tile": "-mno-amx-tile", "amx_int8": "-mno-amx-int8", "amx_bf16": "-mno-amx-bf16"}


def cpu_name() -> str:
    """The CPU's model name, written beside every figure the bench tools print."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of the first CPU in /proc/cpuinfo (empty when unreadable, e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def turned_off(flags: set[str] | None = None) -> list[str]:
    """The faulting features this CPU reports, which the build leaves out."""
    flags = cpu_flags() if flags is None else flags
    return sorted(f for f in FAULTING if f in flags)


def cmake_args(flags: set[str] | None = None) -> str:
    args = ["-DGGML_NATIVE=ON"]
    if turned_off(flags):
        args += [f"-DCMAKE_C_COMPILER_LAUNCHER={LAUNCHER}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={LAUNCHER}"]
    return " ".join(args)


def describe(flags: set[str] | None = None) -> str:
    """One line for the bench output: what the peer build leaves out, and why."""
    off = turned_off(flags)
    if not off:
        return "llama.cpp peer: GGML_NATIVE=ON, nothing turned off (this CPU reports no AMX)"
    return (f"llama.cpp peer: GGML_NATIVE=ON without {', '.join(off)} "
            f"({' '.join(FAULTING[f] for f in off)}: AMX tiles fault in this sandbox)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cmake-args", action="store_true", help="print only the CMAKE_ARGS")
    args = ap.parse_args()
    print(cmake_args() if args.cmake_args else f"{describe()}\nCMAKE_ARGS={cmake_args()}")


if __name__ == "__main__":
    main()
