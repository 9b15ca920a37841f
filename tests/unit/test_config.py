"""The configuration files and their rendering into the archive's model-config.yaml."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from conftest import load_properties

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
    assert template["handler"]["checkpoint"] == f"whisper_{template['handler']['model']}.pth"
    assert template["handler"]["max_duration_s"] > 0


def test_render_sets_model_and_device(render_module, template):
    config = render_module.render(template, "tiny.en", "cpu", {})
    assert config["handler"]["model"] == "tiny.en"
    assert config["handler"]["checkpoint"] == "whisper_tiny.en.pth"
    assert config["deviceType"] == "cpu"
    # the template itself is not modified
    assert template["handler"]["model"] == "base"


def test_render_env_overrides(render_module, template):
    env = {"WHISPER_WORKERS": "2", "WHISPER_BATCH_SIZE": "16", "WHISPER_MAX_BATCH_DELAY_MS": "200"}
    config = render_module.render(template, "base", "gpu", env)
    assert (config["minWorkers"], config["maxWorkers"], config["batchSize"], config["maxBatchDelay"]) == (2, 2, 16, 200)


@pytest.mark.parametrize("env", [{"WHISPER_BATCH_SIZE": "many"}, {"WHISPER_WORKERS": "0"}])
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
    env = {"WHISPER_MAX_DURATION_S": "30", "WHISPER_FAULT_OOM_ABOVE_S": "12.5", "WHISPER_DEFAULT_MODE": "sequential"}
    handler = render_module.render(template, "base", "cpu", env)["handler"]
    assert handler["max_duration_s"] == 30.0
    assert handler["fault_injection_oom_above_s"] == 12.5
    assert handler["default_mode"] == "sequential"
    assert template["handler"]["fault_injection_oom_above_s"] == 0
