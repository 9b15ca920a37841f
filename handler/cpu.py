"""What the CPU can do: its model and the vector/matrix flags that decide which kernels run
(AVX2, AVX-512, AVX-512 bf16, AMX). The engine picks its cpu precision from them; every
benchmark prints them, as figures compare only within one run on one machine."""

import os
import platform
from typing import Optional, Set, Tuple

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# Units that multiply bf16 natively. Without them torch converts bf16 to fp32 around each
# kernel: the base encoder ran 4x slower in bf16 than in fp32 on AVX2 (docs/benchmarks.md).
BF16_UNITS = ("amx_bf16", "avx512_bf16")


def _cpuinfo() -> Tuple[str, Set[str]]:
    """(model name, flags) from /proc/cpuinfo (Linux); elsewhere no flags."""
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
    return model, flags


def bf16_unit() -> Optional[str]:
    """The CPU's native bf16 unit ('amx_bf16' or 'avx512_bf16'), or None."""
    flags = _cpuinfo()[1]
    return next((unit for unit in BF16_UNITS if unit in flags), None)


def cpu_description() -> str:
    """'AMD EPYC (2 cores) flags: avx2 fma avx512f ...'."""
    model, flags = _cpuinfo()
    present = [flag for flag in FLAGS if flag in flags]
    return f"{model} ({os.cpu_count()} cores) flags: {' '.join(present) or 'none of ' + ' '.join(FLAGS)}"


if __name__ == "__main__":
    print(cpu_description())
