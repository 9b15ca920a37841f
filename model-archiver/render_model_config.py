"""Render config/model-config.yaml for one build of whisper.mar.

The file in config/ is the single source of the model configuration; this fills in what
depends on the build: which model the archive carries, the device type, and the
worker/batch overrides a deployment sets through the environment.
"""

import argparse
import os
import shutil
import subprocess
import sys

import yaml

ENV_OVERRIDES = {  # environment variable -> (frontend key, type)
    "WHISPER_WORKERS": ("workers", int),
    "WHISPER_BATCH_SIZE": ("batchSize", int),
    "WHISPER_MAX_BATCH_DELAY_MS": ("maxBatchDelay", int),
    "WHISPER_RESPONSE_TIMEOUT_S": ("responseTimeout", int),
}
HANDLER_ENV_OVERRIDES = {  # environment variable -> (handler key, type)
    "WHISPER_MAX_DURATION_S": ("max_duration_s", float),
    "WHISPER_DEFAULT_MODE": ("default_mode", str),
    "WHISPER_WINDOW_BUDGET": ("window_budget", int),
    "WHISPER_CPU_PRECISION": ("cpu_precision", str),
    # Testing only: fail a batch with an injected out-of-memory error above this much audio.
    "WHISPER_FAULT_OOM_ABOVE_S": ("fault_injection_oom_above_s", float),
}


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is visible to this process (container with --gpus)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def render(template: dict, model: str, device: str, env: dict) -> dict:
    config = dict(template)
    config["handler"] = dict(template.get("handler") or {})
    config["handler"]["model"] = model
    config["handler"]["checkpoint"] = f"whisper_{model}.pth"
    if device == "auto":
        device = "gpu" if gpu_visible() else "cpu"
    if device not in ("gpu", "cpu"):
        raise SystemExit(f"WHISPER_DEVICE must be auto, gpu or cpu, not {device!r}")
    config["deviceType"] = device
    for name, (key, cast) in ENV_OVERRIDES.items():
        if env.get(name):
            try:
                value = cast(env[name])
            except ValueError:
                raise SystemExit(f"{name} must be an integer, not {env[name]!r}")
            if value < 1:
                raise SystemExit(f"{name} must be at least 1")
            if key == "workers":
                config["minWorkers"] = config["maxWorkers"] = value
            else:
                config[key] = value
    for name, (key, cast) in HANDLER_ENV_OVERRIDES.items():
        if env.get(name):
            try:
                config["handler"][key] = cast(env[name])
            except ValueError:
                raise SystemExit(f"{name} must be a {cast.__name__}, not {env[name]!r}")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("template", help="config/model-config.yaml")
    parser.add_argument("output", help="where to write the rendered YAML")
    parser.add_argument("--model", default=os.environ.get("WHISPER_MODEL", "base"))
    parser.add_argument("--device", default=os.environ.get("WHISPER_DEVICE", "auto"))
    args = parser.parse_args()
    with open(args.template) as f:
        template = yaml.safe_load(f)
    config = render(template, args.model, args.device, os.environ)
    with open(args.output, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    print(
        f"model-config: model={args.model} deviceType={config['deviceType']} "
        f"workers={config['minWorkers']} batchSize={config['batchSize']} "
        f"maxBatchDelay={config['maxBatchDelay']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
