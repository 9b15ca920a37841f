"""The configuration files, the handler's settings (handler/settings.py) and their
rendering into the archive's model-config.yaml."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import load_properties
from settings import HANDLER_ENV, HandlerSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def render_module():
    spec = importlib.util.spec_from_file_location("render_model_config", REPO / "model-archiver" / "render_model_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def template():
    return yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())


def test_config_properties_has_the_service_settings():
    props = load_properties(REPO / "config" / "config.properties")
    assert props["inference_address"].endswith(":8080")
    assert props["metrics_address"].endswith(":8082")
    # management can load code: it must never listen on all interfaces
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert int(props["max_request_size"]) >= 150 * 1024 * 1024
    assert int(props["max_response_size"]) >= 150 * 1024 * 1024
    assert int(props["default_response_timeout"]) == 900
    assert props["enable_envvars_config"] == "true"
    assert props["enable_model_api"] == "false"
    assert int(props["number_of_netty_threads"]) > 0 and int(props["job_queue_size"]) > 0


def test_model_config_template(template):
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "deviceType"):
        assert key in template
    # TorchServe hands the worker each request as it arrives; the engine batches the windows
    assert template["asyncCommunication"] is True and template["batchSize"] == 1
    assert template["handler"]["checkpoint"] == f"whisper_{template['handler']['model']}.pth"
    assert template["handler"]["max_duration_s"] > 0


def test_template_lists_every_handler_setting_at_its_default(template):
    settings = HandlerSettings.from_yaml(template["handler"])
    names = [f.name for f in dataclasses.fields(HandlerSettings)]
    assert sorted(template["handler"]) == sorted(names)
    assert dataclasses.replace(settings, checkpoint="") == HandlerSettings()
    assert settings.checkpoint_file == "whisper_base.pth"


# ---------------------------------------------------------------- HandlerSettings


def test_settings_defaults():
    assert HandlerSettings.from_yaml(None) == HandlerSettings.from_yaml({}) == HandlerSettings()
    settings = HandlerSettings()
    assert settings.checkpoint_file == "whisper_base.pth"
    assert (settings.window_budget, settings.max_sequential_waiting) == (0, 1)
    assert settings.cpu_bf16 is None and settings.log_transcripts is False


def test_settings_are_typed_from_strings():
    settings = HandlerSettings.from_yaml({"window_budget": "12", "max_inflight_audio_s": "3600",
                                          "model": "tiny.en", "checkpoint": "w.pth"})
    assert settings.window_budget == 12 and settings.max_inflight_audio_s == 3600.0
    assert isinstance(settings.max_inflight_audio_s, float)
    assert settings.checkpoint_file == "w.pth"


def test_unknown_setting_is_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown handler settings \\['pack_short_clips'\\]") as err:
        HandlerSettings.from_yaml({"pack_short_clips": False, "window_budget": 4})
    assert "window_budget" in str(err.value)


@pytest.mark.parametrize(
    "values, name",
    [
        ({"window_budget": "many"}, "window_budget"),
        ({"max_duration_s": [1]}, "max_duration_s"),
        ({"max_inflight_audio_s": None}, "max_inflight_audio_s"),
        ({"log_transcripts": "maybe"}, "log_transcripts"),
        ({"cpu_precision": "fp16"}, "cpu_precision"),
        ({"cpu_encoder": "tensorrt"}, "cpu_encoder"),
        ({"split_long": "sometimes"}, "split_long"),
        ({"window_mode": "chunks"}, "window_mode"),
        ({"default_mode": "fast"}, "default_mode"),
    ],
)
def test_bad_settings_are_rejected(values, name):
    with pytest.raises(ValueError, match=f"handler.{name} must be"):
        HandlerSettings.from_yaml(values)


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), ("true", True), ("Yes", True), ("on", True), (1, True),
     (False, False), ("false", False), ("0", False), ("off", False), ("", False)],
)
def test_bool_settings(value, expected):
    assert HandlerSettings.from_yaml({"log_transcripts": value}).log_transcripts is expected


@pytest.mark.parametrize("precision, bf16", [("auto", None), ("bf16", True), ("fp32", False)])
def test_cpu_precision(precision, bf16):
    assert HandlerSettings.from_yaml({"cpu_precision": precision}).cpu_bf16 is bf16


@pytest.mark.parametrize("value, expected", [("auto", None), ("on", True), ("off", False)])
def test_split_long(value, expected):
    assert HandlerSettings.from_yaml({"split_long": value}).engine_split_long is expected


@pytest.mark.parametrize("encoder, expected", [("auto", None), ("torch", "torch"), ("onnxruntime", "onnxruntime")])
def test_cpu_encoder(encoder, expected):
    assert HandlerSettings.from_yaml({"cpu_encoder": encoder}).engine_cpu_encoder == expected


def test_every_environment_variable_names_a_setting():
    names = {f.name for f in dataclasses.fields(HandlerSettings)}
    assert set(HANDLER_ENV.values()) <= names
    assert all(name.startswith("WHISPER_") for name in HANDLER_ENV)


# ---------------------------------------------------------------- rendering


def test_render_sets_model_and_device(render_module, template):
    config = render_module.render(template, "tiny.en", "cpu", {})
    assert config["handler"]["model"] == "tiny.en"
    assert config["handler"]["checkpoint"] == "whisper_tiny.en.pth"
    assert config["deviceType"] == "cpu"
    assert config["asyncCommunication"] is True and config["batchSize"] == 1
    # the template itself is not modified
    assert template["handler"]["model"] == "base"


def test_render_env_overrides(render_module, template):
    env = {"WHISPER_WORKERS": "2", "WHISPER_RESPONSE_TIMEOUT_S": "600"}
    config = render_module.render(template, "base", "gpu", env)
    assert (config["minWorkers"], config["maxWorkers"], config["responseTimeout"]) == (2, 2, 600)


@pytest.mark.parametrize("env", [{"WHISPER_WORKERS": "many"}, {"WHISPER_WORKERS": "0"},
                                 {"WHISPER_RESPONSE_TIMEOUT_S": "0"}, {"WHISPER_WINDOW_BUDGET": "many"},
                                 {"WHISPER_CPU_PRECISION": "fp16"}, {"WHISPER_DEFAULT_MODE": "fast"}])
def test_render_rejects_bad_overrides(render_module, template, env):
    with pytest.raises(SystemExit):
        render_module.render(template, "base", "cpu", env)


def test_render_rejects_unknown_device(render_module, template):
    with pytest.raises(SystemExit):
        render_module.render(template, "base", "tpu", {})


def test_auto_device_without_gpu_is_cpu(render_module, template, monkeypatch):
    monkeypatch.setattr(render_module, "gpu_visible", lambda: False)
    assert render_module.render(template, "base", "auto", {})["deviceType"] == "cpu"


def test_render_handler_env_overrides(render_module, template):
    env = {
        "WHISPER_MAX_DURATION_S": "30", "WHISPER_DEFAULT_MODE": "sequential", "WHISPER_WINDOW_BUDGET": "12",
        "WHISPER_MAX_INFLIGHT_AUDIO_S": "3600", "WHISPER_CPU_PRECISION": "fp32",
        "WHISPER_CPU_ENCODER": "torch", "WHISPER_MAX_SEQUENTIAL_WAITING": "2", "WHISPER_CUDA_GRAPHS": "false",
        "WHISPER_SPLIT_LONG": "off", "WHISPER_WINDOW_MODE": "pauses",
    }
    assert set(env) == set(HANDLER_ENV)  # every variable, each once
    handler = render_module.render(template, "base", "cpu", env)["handler"]
    assert handler["max_duration_s"] == 30.0 and handler["default_mode"] == "sequential"
    assert handler["window_budget"] == 12 and isinstance(handler["window_budget"], int)
    assert handler["max_inflight_audio_s"] == 3600.0 and handler["cpu_precision"] == "fp32"
    assert handler["cpu_encoder"] == "torch" and handler["cuda_graphs"] is False
    assert handler["split_long"] == "off" and handler["window_mode"] == "pauses"
    assert handler["max_sequential_waiting"] == 2
    # the template's keys and the ones set, typed: what the handler reads back unchanged
    assert sorted(handler) == sorted(set(template["handler"]) | {HANDLER_ENV[name] for name in env})
    assert HandlerSettings.from_yaml(yaml.safe_load(yaml.safe_dump(handler))).window_budget == 12


def test_render_script_writes_the_archive_config(tmp_path):
    out = tmp_path / "model-config.yaml"
    env = {"PATH": "/usr/bin:/bin", "WHISPER_WINDOW_BUDGET": "6", "WHISPER_BATCH_SIZE": "16"}
    subprocess.run([sys.executable, str(REPO / "model-archiver" / "render_model_config.py"),
                    str(REPO / "config" / "model-config.yaml"), str(out), "--model", "tiny.en",
                    "--device", "cpu"], env=env, check=True, capture_output=True, timeout=60)
    config = yaml.safe_load(out.read_text())
    assert config["handler"]["window_budget"] == 6 and config["handler"]["model"] == "tiny.en"
    # the old batching variable has no effect: the worker stays asynchronous
    assert config["asyncCommunication"] is True and config["batchSize"] == 1


@pytest.mark.parametrize("values", [{"window_budget": -1}, {"max_duration_s": 0}, {"max_inflight_audio_s": -5},
                                    {"cpu_threads": -2}, {"max_sequential_waiting": -1},
                                    {"window_budget": 2.5}])
def test_out_of_range_settings_are_rejected(values):
    with pytest.raises(ValueError):
        HandlerSettings.from_yaml(values)
