#!/usr/bin/env python3
"""Say which device the service will use, and refuse a GPU that cannot be used.

Prints the NVIDIA driver (nvidia-smi), torch's version and CUDA build, and the device the
worker will run on. With --device gpu (WHISPER_DEVICE=gpu) and no GPU torch can use, exits
1 naming the driver this torch build needs: torch from PyPI is built for CUDA 13.0, which
needs a driver of the R580 branch or newer; older drivers need another build of torch
(the image's TORCH_INDEX_URL build argument, serve.sh's WHISPER_TORCH_INDEX_URL).

    check_device.py --device auto|gpu|cpu
"""

import argparse
import shutil
import subprocess
import sys

# The oldest driver branch each CUDA major version runs on (NVIDIA's minor-version
# compatibility: any 13.x runtime on R580+, any 12.x on R525+).
DRIVER_FOR_CUDA = {13: "R580 (580.65 or newer)", 12: "R525 (525.60 or newer)", 11: "R450 (450.80 or newer)"}


def driver_version() -> str:
    """The host's NVIDIA driver as nvidia-smi reports it, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "none (no nvidia-smi: no NVIDIA driver visible; in a container, run it with --gpus)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else \
        f"unknown (nvidia-smi: {(out.stderr or out.stdout).strip()[:200]})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"])
    args = parser.parse_args(argv)
    import torch

    cuda = torch.version.cuda
    usable = args.device != "cpu" and torch.cuda.is_available()
    chosen = f"cuda:0 ({torch.cuda.get_device_name(0)})" if usable else "cpu"
    driver = driver_version() if args.device != "cpu" else "not asked for"
    print(f"[device] driver: {driver}; torch {torch.__version__}, CUDA build {cuda or 'none (CPU build)'}; "
          f"device: {chosen}", file=sys.stderr)
    if args.device == "gpu" and not usable:
        needs = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]), f"one supporting CUDA {cuda}") if cuda else None
        reason = (f"this torch ({torch.__version__}) is built for CUDA {cuda}, which needs an NVIDIA driver of "
                  f"the {needs} branch; the host's driver: {driver}. Upgrade the driver, or use a torch built for "
                  "an older CUDA (docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126)"
                  if cuda else f"this torch ({torch.__version__}) is a CPU build")
        print(f"[device] error: WHISPER_DEVICE=gpu, but no GPU can be used: {reason}. "
              "WHISPER_DEVICE=cpu runs on the CPU.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
