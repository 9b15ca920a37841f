"""Render config/model-config.yaml for one build of whisper.mar.

The file in config/ is the single source of the model configuration; this fills in what
depends on the build: which model the archive carries, the device type, and the
overrides a deployment sets through the environment (the handler's are listed, with their
settings, in handler/settings.py).
"""

import argparse
import os
import shutil
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "handler"))
from settings import HANDLER_ENV, HandlerSettings  # noqa: E402  (plain module, no torch)

ENV_OVERRIDES = {  # environment variable -> (frontend key, type)
    "WHISPER_WORKERS": ("workers", int),
    "WHISPER_RESPONSE_TIMEOUT_S": ("responseTimeout", int),
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
    for name, key in HANDLER_ENV.items():
        if env.get(name):
            config["handler"][key] = env[name]
    try:  # typed and checked by the handler's own settings object
        config["handler"] = {k: v for k, v in vars(HandlerSettings.from_yaml(config["handler"])).items()
                             if k in config["handler"]}
    except ValueError as err:
        raise SystemExit(f"model-config: {err} (environment: {', '.join(HANDLER_ENV)})")
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
        f"workers={config['minWorkers']} window_budget={config['handler'].get('window_budget')}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
