"""What machine a figure was measured on: the CPU model and the vector/matrix flags that
decide which kernels run (AVX2, AVX-512, AVX-512 bf16, AMX). Printed with every benchmark:
figures compare only within one run on one machine."""

import os
import platform

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """'AMD EPYC (2 cores) flags: avx2 fma avx512f ...' from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or "unknown cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    present = [flag for flag in FLAGS if flag in flags]
    return f"{model} ({os.cpu_count()} cores) flags: {' '.join(present) or 'none of ' + ' '.join(FLAGS)}"


if __name__ == "__main__":
    print(cpu_description())
