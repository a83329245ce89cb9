"""docker-compose.yml (local emulator) and docker-compose.snowflake.yml (Snowflake), without a
Docker engine: what can be checked here is.

- both files are YAML with the services, volumes and secrets they refer to, every file they
  mount exists, and neither shares a network namespace (no `network_mode`);
- every environment variable is a real setting, and the settings load as the containers get them;
- every command is a valid invocation (`celery ... --help`, the emulator's own parser), worker
  nodes are named per container (`%h`), so replicas never share a node name;
- the local file's redis, keys, emulator and healthcheck commands run here as written, with only
  the host names, ports and volume paths changed, and `snowpipe-worker doctor` passes with the
  workers' environment against them (HTTPS to the emulator by name, trusted through the CA file;
  the state Redis's persistence as configured).

Not tested (no Docker engine on the test machines): image builds, the compose CLI's own
validation and interpolation, volume and secret mounting, DNS between containers, healthcheck
scheduling, the Redis image's defaults.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.emulator import REPO_ROOT
from tests.support.keys import key_pair
from tests.support.redis import free_port, redis_server
from worker.settings import Settings, env_name, load_settings

LOCAL = REPO_ROOT / "docker-compose.yml"
SNOWFLAKE = REPO_ROOT / "docker-compose.snowflake.yml"
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")
SETTINGS = {env_name(field) for field in Settings.model_fields} | {"SNOWPIPE_CONFIG"}


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def resolve(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against `env` (strings only)."""
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return INTERPOLATION.sub(one, value)


@pytest.fixture(params=[LOCAL, SNOWFLAKE], ids=["local", "snowflake"])
def compose(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_services_refer_only_to_what_is_defined_and_share_no_network_namespace(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    secrets = set(compose.get("secrets") or {})
    for name, service in services.items():
        assert "network_mode" not in service, name
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), name
        assert set(service.get("secrets", [])) <= secrets, name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith(("./", "/")):
                assert (REPO_ROOT / source).exists(), f"{name} mounts {source}: no such file"
            else:
                assert source in volumes, f"{name} mounts an undeclared volume {source}"
    assert {"redis", "worker", "beat", "prometheus"} <= set(services)
    assert services["prometheus"]["profiles"] == ["monitoring"]


def test_every_environment_variable_is_a_setting(compose: dict[str, Any]) -> None:
    env = compose["x-snowpipe-env"]
    assert set(env) <= SETTINGS, sorted(set(env) - SETTINGS)
    for service in compose["services"].values():
        if "environment" in service:
            assert service["environment"] == env  # every Celery service gets the same settings


def celery_commands() -> Iterator[tuple[str, list[str]]]:
    for path in (LOCAL, SNOWFLAKE):
        for name, service in load(path)["services"].items():
            command = service.get("command", [])
            if command[:1] == ["celery"]:
                yield f"{path.name}:{name}", command


def test_every_worker_node_name_is_unique_per_container() -> None:
    workers = [cmd for where, cmd in celery_commands() if cmd[3] == "worker"]
    assert len(workers) == 2
    for command in workers:
        name = command[command.index("-n") + 1]
        assert name.endswith("@%h"), name  # the container's hostname: one per replica
    assert workers[0] == workers[1]  # the same node in both files


@pytest.mark.parametrize(
    "command", sorted({tuple(cmd) for _, cmd in celery_commands()}), ids=lambda c: c[3]
)
def test_the_celery_commands_are_valid(command: tuple[str, ...], tmp_path: Path) -> None:
    # --help after the options: an unknown option fails first. (The app loads its settings on
    # import: any valid ones will do.)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNOWPIPE_")}
    env |= {"SNOWPIPE_ACCOUNT": "A", "SNOWPIPE_USER": "U",
            "SNOWPIPE_PRIVATE_KEY_PATH": str(key_pair("compose").write_private(tmp_path / "k"))}
    done = subprocess.run(
        [sys.executable, "-m", *command, "--help"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Usage: python -m celery" in done.stdout


def test_the_snowflake_file_loads_as_settings_with_the_required_variables(tmp_path: Path) -> None:
    compose = load(SNOWFLAKE)
    given = {"SNOWPIPE_ACCOUNT": "myorg-myaccount", "SNOWPIPE_USER": "LOADER",
             "SNOWFLAKE_KEY_FILE": "./key.p8"}  # fmt: skip
    env = {k: resolve(v, given) for k, v in compose["x-snowpipe-env"].items() if v is not None}
    assert env["SNOWPIPE_PRIVATE_KEY_PATH"] == "/run/secrets/snowpipe_key"  # where the secret is
    assert resolve(compose["secrets"]["snowpipe_key"]["file"], given) == "./key.p8"
    env["SNOWPIPE_PRIVATE_KEY_PATH"] = str(key_pair("compose").write_private(tmp_path / "k.pem"))
    s = load_settings(**{k.removeprefix("SNOWPIPE_").lower(): v for k, v in env.items()})
    assert s.account_url == "https://myorg-myaccount.snowflakecomputing.com"
    assert s.role is None and s.private_key_passphrase is None  # left out when not given
    with pytest.raises(KeyError, match="SNOWPIPE_ACCOUNT"):
        resolve(compose["x-snowpipe-env"]["SNOWPIPE_ACCOUNT"], {})


def test_the_local_file_runs_here_as_written_and_doctor_passes(tmp_path: Path) -> None:
    """The redis, keys, emulator and healthcheck commands and the workers' environment, run
    here with the container names, ports and volumes moved: emulator -> localhost, 8087 -> a
    free port, /keys and /data -> directories of this test, redis:6379 -> a redis-server of
    this test with the mounted configuration file."""
    services = load(LOCAL)["services"]
    redis_command = services["redis"]["command"]
    (mount,) = [m for m in services["redis"]["volumes"] if m.startswith("./")]
    source, target = mount.split(":")[:2]
    assert redis_command == ["redis-server", target]
    with redis_server(tmp_path / "redis", str(REPO_ROOT / source)) as redis_port:
        run_local_stack_here(services, tmp_path, redis_port)


def run_local_stack_here(services: dict[str, Any], tmp_path: Path, redis_port: int) -> None:
    assert services["emulator"]["command"][1:3] == ["--host", "emulator"]  # the name in the URL
    port = free_port()
    keys, data = tmp_path / "keys", tmp_path / "data"
    data.mkdir()

    def here(text: str) -> str:
        text = text.replace("redis://redis:6379/", f"redis://127.0.0.1:{redis_port}/")
        text = re.sub(r"\bemulator\b(?!-ca)", "localhost", text)
        text = text.replace("8087", str(port))
        return text.replace("/keys", str(keys)).replace("/data", str(data))

    def run(command: list[str]) -> list[str]:
        return [here(part) for part in command]

    bin_dir = Path(sys.executable).parent
    keygen = subprocess.run(
        [str(bin_dir / "snowpipe-worker"), *run(services["keys"]["command"])[1:]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert keygen.returncode == 0, keygen.stderr
    emulator = subprocess.Popen(
        [str(bin_dir / "snowpipe-emulator"), *run(services["emulator"]["command"])[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert emulator.stdout is not None
        assert emulator.stdout.readline().startswith("listening on https://localhost:")
        check = run(services["emulator"]["healthcheck"]["test"])
        assert check[:2] == ["CMD", "python"]
        healthy = subprocess.run([sys.executable, *check[2:]], capture_output=True, text=True,
                                 timeout=30, check=False)  # fmt: skip
        assert healthy.returncode == 0, healthy.stderr

        env = {k: v for k, v in os.environ.items() if not k.startswith("SNOWPIPE_")}
        env |= {k: here(resolve(v, {})) for k, v in services["worker"]["environment"].items()}
        env["PYTHONPATH"] = str(REPO_ROOT)
        doctor = subprocess.run(
            [sys.executable, "-c", "from worker.cli import main; main()", "doctor"], env=env,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert f"account URL: https://localhost:{port} answers" in doctor.stdout
        assert "token exchange: scoped token issued for LOCALDEV.LOADER" in doctor.stdout
        assert "state persistence: appendonly yes, appendfsync always" in doctor.stdout
    finally:
        emulator.terminate()
        emulator.wait(20)


def test_no_instruction_leaves_an_invalid_file() -> None:
    # The old advice ("drop the emulator and keys services") broke network_mode: service:emulator.
    for path in (LOCAL, SNOWFLAKE, REPO_ROOT / "README.md", *REPO_ROOT.glob("docs/*.md")):
        assert "drop the emulator" not in path.read_text().lower(), path
