"""The compose stack and Dockerfiles, checked without a Docker engine.

The compose file is validated against the Compose specification's JSON schema after the same
variable interpolation compose does, and every command, port and NEMOTRON_* variable in it is
checked against what the servers and the CLI really accept.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dotenv import dotenv_values

from nemotron_speech.cli import build_parser
from services.asr.settings import AsrSettings
from services.llm.settings import LlmSettings
from services.runtime.settings import ServerSettings
from services.tts.settings import TtsSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose.yaml"
SCHEMA = ROOT / ".cache" / "compose-spec" / "compose_spec.json"
SETTINGS: dict[str, type[ServerSettings]] = {
    "ASR": AsrSettings,
    "TTS": TtsSettings,
    "LLM": LlmSettings,
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolated(text: str, values: dict[str, str]) -> str:
    """Compose-style `${VAR}` / `${VAR:-default}` substitution."""
    return _VARIABLE.sub(lambda m: values.get(m.group(1)) or (m.group(2) or ""), text)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = dotenv_values(ROOT / "deploy" / ".env.example")
    return {k: v or "" for k, v in values.items()}


@pytest.fixture(scope="module")
def compose(env_example: dict[str, str]) -> dict[str, Any]:
    document = yaml.safe_load(interpolated(COMPOSE.read_text(), env_example))
    assert isinstance(document, dict)
    return document


def test_compose_file_matches_the_compose_specification_schema(compose):
    if not SCHEMA.exists():
        if os.environ.get("CI"):
            pytest.fail("the Compose schema is missing; `tools/tasks.sh setup` fetches it")
        pytest.skip("run `tools/tasks.sh compose-schema` to fetch the Compose schema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(compose, schema, cls=jsonschema.Draft201909Validator)


def test_the_schema_check_is_not_vacuous(compose):
    if not SCHEMA.exists():
        pytest.skip("needs the Compose schema")
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["asr"]["healthcheck"]["retrys"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft201909Validator)


def test_stack_has_the_expected_services_profiles_and_ports(compose):
    services = compose["services"]
    assert {"asr", "tts", "llm", "speech-gpu", "jaeger", "vllm"} <= set(services)
    for name in ("asr", "tts", "llm"):
        assert services[name]["profiles"] == ["cpu"]
    assert services["speech-gpu"]["profiles"] == ["gpu"]
    assert services["speech-gpu"]["networks"]["default"]["aliases"] == ["asr", "tts", "llm"]
    devices = services["speech-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    published = {
        port.split(":")[1] for service in services.values() for port in service.get("ports", [])
    }
    assert {"8080", "8001", "8000", "16686", "4317"} <= published
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} would be published on every interface"


@pytest.mark.parametrize("name", ["bot", "bot-gpu"])
def test_bot_services_run_a_real_bot_against_the_published_server_ports(compose, name):
    service = compose["services"][name]
    parsed = build_parser().parse_args(service["command"][1:])
    assert parsed.command == "bot" and parsed.name in (
        "interleaved_streaming",
        "simple_vad",
        "vllm",
    )
    assert service["command"][-4:] == ["--host", "127.0.0.1", "--port", "7860"]
    assert service["network_mode"] == "host"  # WebRTC media ports cannot be published
    servers = compose["services"]["speech-gpu" if name == "bot-gpu" else "asr"]
    assert set(service["depends_on"]) <= set(compose["services"])
    assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())
    published = {
        port.rsplit(":", 1)[1]
        for s in ("asr", "tts", "llm", "speech-gpu")
        for port in compose["services"][s]["ports"]
    }
    for variable in ("NVIDIA_ASR_URL", "NVIDIA_TTS_URL", "NVIDIA_LLM_URL"):
        host, port = service["environment"][variable].rsplit(":", 1)
        assert host == "127.0.0.1" and port in published, variable
    assert servers["profiles"] == service["profiles"]


def test_root_compose_file_includes_the_stack_and_defaults_to_the_cpu_profile():
    root = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert root["include"] == ["deploy/compose.yaml"]
    assert root["name"] == "nemotron-speech"  # the project `nemotron-speech stack` drives
    # Plain `docker compose up` there: the project's .env picks the CPU profile.
    assert dotenv_values(ROOT / ".env") == {"COMPOSE_PROFILES": "cpu"}


def _compose_v2() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    done = subprocess.run(
        [docker, "compose", "version", "--short"], capture_output=True, text=True, timeout=30
    )
    return docker if done.returncode == 0 and _version(done.stdout)[:1] >= (2,) else None


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        ([], {"asr", "tts", "llm", "bot", "jaeger"}),
        (["gpu"], {"speech-gpu", "bot-gpu", "jaeger"}),
        (["gpu", "vllm"], {"speech-gpu", "bot-gpu", "vllm", "jaeger"}),
        (["cpu"], {"asr", "tts", "llm", "bot", "jaeger"}),
    ],
)
def test_profiles_select_one_stack_in_the_repository_root(profiles, expected):
    docker = _compose_v2()
    if docker is None:  # CI checks the same in tools/ci-containers.sh, after installing it
        pytest.skip("needs Docker Compose v2 (tools/docker-engine.sh installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    flags = [flag for name in profiles for flag in ("--profile", name)]
    done = subprocess.run(
        [docker, "compose", *flags, "config", "--services"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == expected


def _nemotron_env(environment: dict[str, str]) -> dict[str, dict[str, str]]:
    by_service: dict[str, dict[str, str]] = {"ASR": {}, "TTS": {}, "LLM": {}}
    for key, value in environment.items():
        match = re.fullmatch(r"NEMOTRON_(ASR|TTS|LLM)_(\w+)", key)
        if match:
            by_service[match.group(1)][match.group(2).lower()] = str(value)
    return by_service


@pytest.mark.parametrize("name", ["asr", "tts", "llm", "speech-gpu"])
def test_commands_environment_and_ports_are_what_the_servers_accept(compose, name):
    service = compose["services"][name]
    parser = build_parser()
    command = service["command"]
    assert command[0] == "nemotron-speech"
    parsed = parser.parse_args(command[1:])
    stages = (
        [parsed.service]
        if parsed.command == "serve"
        else service["environment"]["NEMOTRON_STAGES"].split()
    )
    healthcheck = service["healthcheck"]["test"]
    assert healthcheck[:2] == ["CMD", "nemotron-speech"]
    parser.parse_args(healthcheck[2:])  # the healthcheck is a real command of ours
    env = _nemotron_env(service["environment"])
    published = {int(port.rsplit(":", 1)[1]) for port in service["ports"]}
    for stage in stages:
        settings_cls = SETTINGS[stage.upper()]
        values = env[stage.upper()]
        unknown = set(values) - set(settings_cls.model_fields)
        assert not unknown, f"{name}: NEMOTRON_{stage.upper()}_* not accepted: {unknown}"
        settings = settings_cls(**{k: v for k, v in values.items() if k != "model" or v})
        assert settings.port in published, f"{name}: {stage} listens on {settings.port}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["asr", "tts", "llm"])
def test_cpu_services_pass_the_servers_own_config_check(compose, name):
    service = compose["services"][name]
    env = {**os.environ, **{k: str(v) for k, v in service["environment"].items()}}
    if not env.get("NEMOTRON_LLM_MODEL"):  # empty: the packaged default model
        env.pop("NEMOTRON_LLM_MODEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "nemotron_speech", *service["command"][1:], "--check-config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_env_example_documents_every_variable_the_compose_file_uses(env_example):
    used = {m.group(1) for m in _VARIABLE.finditer(COMPOSE.read_text())}
    # Set by the stack CLI or by the OpenTelemetry convention, not by the user's .env.
    derived = {
        "NEMOTRON_STAGES",
        "NEMOTRON_LLM_BACKEND",
        "NEMOTRON_LLM_MODEL",
        "NEMOTRON_VERSION",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "VLLM_VERSION",
        "JAEGER_VERSION",
    }
    assert used - derived <= set(env_example), used - derived - set(env_example)


def test_images_run_as_non_root_with_a_grpc_healthcheck():
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "deploy" / dockerfile).read_text()
        assert re.search(r"^USER 10001", text, re.MULTILINE), dockerfile
        assert 'CMD ["nemotron-speech", "health"' in text, dockerfile
        assert "deploy/install.sh" in text, "images install with the script CI uses"
    gpu = (ROOT / "deploy" / "Dockerfile.gpu").read_text()
    assert "AS vllm" in gpu and "AS runtime" in gpu


def test_the_install_path_builds_llama_cpp_for_any_host_not_the_build_host():
    import tomllib

    import llama_cpp

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]
    defines = settings["config-settings-package"]["llama-cpp-python"]
    assert defines["cmake.define.GGML_NATIVE"] == "OFF"
    gpu = (ROOT / "deploy" / "Dockerfile.gpu").read_text()
    assert "install.sh --cuda" in gpu and "CMAKE_ARGS" not in gpu
    # The library installed here was built that way: the x86-64-v3 baseline, nothing above it
    # (AVX-512 or AMX would die with SIGILL on a host without them).
    features = llama_cpp.llama_print_system_info().decode()
    if platform.machine() in ("x86_64", "AMD64"):
        assert "AVX2 = 1" in features
        assert "AVX512" not in features and "AMX" not in features, features


def test_the_images_copy_every_package_the_wheel_installs():
    import tomllib

    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    packages = wheel["targets"]["wheel"]["packages"]
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "deploy" / dockerfile).read_text()
        for package in packages:
            top = package.split("/")[0]
            assert re.search(rf"^COPY {top} {top}$", text, re.MULTILINE), (dockerfile, top)


def _version(tag: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", tag))


@pytest.mark.parametrize("env", ["example", "defaults"])
def test_vllm_serves_nemotron_3_nano_with_its_reasoning_parser(env, env_example):
    values = env_example if env == "example" else {}
    vllm = yaml.safe_load(interpolated(COMPOSE.read_text(), values))["services"]["vllm"]
    image, tag = vllm["image"].rsplit(":", 1)
    assert image == "vllm/vllm-openai"
    # v0.17.1: the first release with the built-in nemotron_v3 parser (NemotronH since v0.11.2).
    assert _version(tag) >= (0, 17, 1), tag
    command = vllm["command"]
    assert command[command.index("--reasoning-parser") + 1] == "nemotron_v3"
    assert "--trust-remote-code" in command


def test_the_in_process_vllm_extra_runs_nemotron_3_nano():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = extras["optional-dependencies"]["vllm"]
    lower = re.fullmatch(r"vllm>=([\d.]+)", requirement)
    assert lower and _version(lower.group(1)) >= (0, 12), requirement


def _dockerfile_arg(dockerfile: str, name: str) -> str:
    text = (ROOT / "deploy" / dockerfile).read_text()
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
    assert match, f"{dockerfile}: no ARG {name}"
    return match.group(1)


def test_images_build_from_a_python_base_without_an_external_frontend(compose):
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "deploy" / dockerfile).read_text()
        # A `# syntax=` line makes BuildKit pull a frontend image; the engine's own is used.
        assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE), dockerfile
        stages_from = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        bases = {base for base in stages_from if base.startswith("$")}
        assert bases == {"${PYTHON_IMAGE}"}, (dockerfile, stages_from)
    # Compose passes the same default base, which PYTHON_IMAGE (tools/docker-base.sh) replaces.
    for name in ("asr", "bot", "speech-gpu"):
        build = compose["services"][name]["build"]
        dockerfile = build["dockerfile"].removeprefix("deploy/")
        assert build["args"]["PYTHON_IMAGE"] == _dockerfile_arg(dockerfile, "PYTHON_IMAGE"), name


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_healthcheck_asks_the_stages_of_the_default_command(dockerfile):
    text = (ROOT / "deploy" / dockerfile).read_text()
    (health,) = re.findall(r"HEALTHCHECK .*\\\n\s+CMD (\[.*\])", text)
    command = json.loads(health)
    parsed = build_parser().parse_args(command[1:])
    assert parsed.command == "health" and parsed.stages == []  # from $NEMOTRON_STAGES
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.MULTILINE)
    assert json.loads(cmd)[1] == "serve-all"
    stages = re.findall(r'NEMOTRON_STAGES="([^"]*)"', text)
    assert stages and all(s.split() == ["asr", "tts", "llm"] for s in stages)


@pytest.mark.parametrize("name", ["asr", "tts", "llm", "speech-gpu"])
def test_each_container_checks_the_stages_it_serves(compose, name):
    service = compose["services"][name]
    parsed = build_parser().parse_args(service["command"][1:])
    declared = service["environment"]["NEMOTRON_STAGES"].split()
    served = [parsed.service] if parsed.command == "serve" else declared
    assert declared == served, "the image's HEALTHCHECK reads NEMOTRON_STAGES"
    health = build_parser().parse_args(service["healthcheck"]["test"][2:])
    assert health.stages in ([], served)


def test_ci_override_puts_an_otlp_receiver_of_ours_in_jaegers_place(compose):
    override = yaml.safe_load((ROOT / "deploy" / "compose.ci.yaml").read_text())
    assert set(override["services"]) == {"jaeger"}
    sink = override["services"]["jaeger"]
    assert sink["image"].split(":")[0] == compose["services"]["asr"]["image"].split(":")[0]
    assert sink["command"][:2] == ["python", "/sink/otlp_sink.py"]
    assert sink["command"][sink["command"].index("--port") + 1] == "4317"
    assert "127.0.0.1:4317:4317" in compose["services"]["jaeger"]["ports"]
    # Its own healthcheck: the image's asks for gRPC servers that this container does not run.
    assert "nemotron-speech" not in sink["healthcheck"]["test"]
    assert any(v.endswith(":/sink/otlp_sink.py:ro") for v in sink["volumes"])


@pytest.mark.timeout(60)
def test_the_otlp_sink_writes_spans_that_the_trace_report_reads(tmp_path):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    from nemotron_speech.trace_report import spans_from_otlp_json
    from tests.servers import free_port

    port = free_port()
    out = tmp_path / "traces" / "spans.jsonl"
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "otlp_sink.py"), "--port", str(port), "--out", out],
        stdout=subprocess.PIPE,
        text=True,
    )
    service = common_pb2.KeyValue(
        key="service.name", value=common_pb2.AnyValue(string_value="nemotron-asr")
    )
    span = trace_pb2.Span(
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        name="asr.finalize",
        start_time_unix_nano=1_000,
        end_time_unix_nano=2_000,
    )
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=[service]),
                scope_spans=[trace_pb2.ScopeSpans(spans=[span])],
            )
        ]
    )
    try:
        assert sink.stdout is not None
        assert "OTLP/gRPC on port" in sink.stdout.readline()  # serving from here on
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=10)
        spans = spans_from_otlp_json(out.read_text().splitlines())
        assert [(s.service, s.name, s.trace_id) for s in spans] == [
            ("nemotron-asr", "asr.finalize", bytes(range(16)).hex())
        ]
    finally:
        sink.terminate()
        assert sink.wait(timeout=15) == 0
        sink.stdout.close()  # type: ignore[union-attr]
