"""The README's tables say what the code does: the settings table is handler/settings.py
(every key, its default, its environment variable), the error table lists every code the
handler can answer with its status, and checkable claims of docs/architecture.md hold."""

import ast
import dataclasses
import re
from pathlib import Path

import errors
from settings import HANDLER_ENV, HandlerSettings

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def table_after(heading_text: str, first_column: str) -> list:
    """The rows (lists of cells) of the first table after `heading_text` whose header starts
    with `first_column`."""
    text = README[README.index(heading_text):]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def codes_in(cell: str) -> list:
    return re.findall(r"`([a-z_]+)`", cell)


def test_readme_settings_table_is_handler_settings():
    rows = table_after("`config/model-config.yaml` (packed into", "key")
    documented = {}
    for key_cell, default, env, _ in rows:
        for key in codes_in(key_cell):
            documented[key] = (default, env.strip("`"))
    fields = {f.name: f.default for f in dataclasses.fields(HandlerSettings)}
    assert set(documented) == set(fields)
    env_of = {setting: name for name, setting in HANDLER_ENV.items()}
    for key, default in fields.items():
        if key in ("model", "checkpoint"):
            continue  # set at build
        shown, env = documented[key]
        expected = str(default).lower() if isinstance(default, bool) else \
            f"{default:g}" if isinstance(default, float) else str(default)
        assert shown.strip("`") == expected, (key, shown, expected)
        assert (env or None) == env_of.get(key), (key, env, env_of.get(key))


def raised_codes() -> dict:
    """code -> status of every RequestError the handler's modules can raise."""
    classes = {name: cls for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, errors.RequestError)}
    # InvalidAudio always names its own code
    codes = {cls.code: cls.status for cls in classes.values() if cls not in (errors.RequestError, errors.InvalidAudio)}
    for path in (REPO / "handler").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes):
                continue
            cls = classes[node.func.id]
            code = next((k.value.value for k in node.keywords if k.arg == "code"), None)
            if cls is errors.InvalidAudio and node.args and isinstance(node.args[0], ast.Constant):
                code = node.args[0].value
            status = next((k.value.value for k in node.keywords if k.arg == "status"), cls.status)
            if code is not None:
                codes[code] = status
    return codes


def test_readme_error_table_lists_every_code_the_handler_answers():
    documented = {}
    for status, code_cell, _ in table_after("### Errors", "status"):
        for code in codes_in(code_cell):
            documented[code] = int(status)
    raised = raised_codes()
    assert {"empty_body", "not_audio", "decode_timeout", "ffmpeg_missing", "multiple_files", "overloaded"} <= set(raised)
    assert documented == raised


def test_only_the_runner_and_its_helpers_run_torch():
    """The scheduler, the output processor, streams and windows import no torch; the engine
    module uses no torch name itself (it imports the runner, which does)."""
    for name in ("scheduler", "outputs", "stream", "windows", "options", "settings", "errors", "formats"):
        tree = ast.parse((REPO / "handler" / f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"torch", "runner", "decoding", "onnx_encoder"}, (name, imported)
    engine = ast.parse((REPO / "handler" / "engine.py").read_text())
    assert not [n for n in ast.walk(engine) if isinstance(n, ast.Name) and n.id == "torch"]


def test_the_container_check_was_run_for_the_current_image_inputs():
    """scripts/container_check.py builds and runs the image (too long for every CI run); it
    is run after every change of what the image is built from, and docs/container.md records
    the run with the hash of those files."""
    import container_check

    recorded = (REPO / "docs" / "container.md").read_text()
    current = container_check.inputs_hash()
    assert f"sha256 {current}" in recorded, (
        f"Dockerfile, .dockerignore, serve.sh or requirements.txt changed (sha256 {current}): run "
        "scripts/container_check.py and record its table in docs/container.md")
