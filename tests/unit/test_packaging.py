"""The wheel: it ships py.typed and the settings profiles, and keeps the local tooling in extras."""

from __future__ import annotations

import email.parser
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What the build reads: the project table, the README (its long description), the two packages.
SOURCES = ("pyproject.toml", "README.md", "worker", "emulator")
# The build backend pyproject.toml asks for: installed (the dev extra), the build needs no index.
BACKEND_VERSION = 77


def _backend_installed() -> bool:
    try:
        major = importlib.metadata.version("setuptools").split(".")[0]
    except importlib.metadata.PackageNotFoundError:
        return False
    return major.isdigit() and int(major) >= BACKEND_VERSION


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the sources (a build in the checkout leaves build/ behind)."""
    root = tmp_path_factory.mktemp("wheel")
    src, out = root / "src", root / "dist"
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(source, src / name)
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    if _backend_installed():
        args += ["--no-build-isolation", "--no-index"]  # about 5 s, offline
    # else an older setuptools here: pip fetches the backend into an isolated env (slower)
    done = subprocess.run(
        [*args, str(src)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("snowpipe_worker-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_ships_py_typed_for_both_packages(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {"worker/py.typed", "emulator/py.typed"} <= names


def test_wheel_ships_the_local_profile(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "worker/profiles/local.toml" in names  # SNOWPIPE_CONFIG=local works from a wheel
    # The production example is one of the deployment files in config/, not package data.
    assert not [n for n in names if n.startswith("config/") or "production" in n]
    local = wheel.read("worker/profiles/local.toml").decode()
    assert 'account_url = "http://127.0.0.1:' in local


def test_local_tooling_is_behind_extras_not_in_the_base_install(wheel: zipfile.ZipFile) -> None:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    message = email.parser.Parser().parsestr(wheel.read(metadata).decode())
    requires = message.get_all("Requires-Dist") or []
    base = {r.split(";")[0] for r in requires if "extra ==" not in r}
    local_only = ("fakeredis", "starlette", "uvicorn", "pytest")
    assert not [r for r in base if r.lower().startswith(local_only)]
    assert {"emulator", "local", "dev"} <= set(message.get_all("Provides-Extra") or [])

    def extra(name: str) -> list[str]:
        return [r.split(";")[0].lower() for r in requires if f'extra == "{name}"' in r]

    assert any(r.startswith("starlette") for r in extra("emulator"))
    assert "snowpipe-worker[emulator]" in extra("local")
    assert any(r.startswith("fakeredis[lua]") for r in extra("local"))
    assert "snowpipe-worker[local]" in extra("dev")


# --- A command whose extra is missing says which one, in one line --------------------------------


def test_missing_extra_names_the_extra_the_modules_and_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import extras

    assert extras.missing_extra("local", "the local stack") is None  # the dev install has it
    monkeypatch.setattr(extras, "missing_modules", lambda extra: ["fakeredis", "lupa"])
    assert extras.missing_extra("local", "snowpipe-worker run") == (
        "snowpipe-worker run needs the [local] extra (fakeredis, lupa not installed): "
        f"pip install -e '{REPO}[local]'"  # this checkout: snowpipe-worker is not on PyPI
    )
    wheel_install = extras.install_line("local", root=REPO / "worker")  # no pyproject.toml there
    assert wheel_install.startswith("pip install '/path/to/snowpipe-worker[local]'")
    assert "not on PyPI" in wheel_install


@pytest.mark.parametrize("command", ["run", "up"])
def test_run_and_up_without_the_local_extra_stop_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from typer.testing import CliRunner

    from worker import cli, devstack, extras

    monkeypatch.setattr(extras, "missing_modules", lambda extra: ["fakeredis"])
    monkeypatch.setattr(devstack.LocalStack, "start", lambda self: pytest.fail("stack started"))
    result = CliRunner().invoke(cli.app, [command])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        f"error: snowpipe-worker {command} needs the [local] extra (fakeredis not installed): "
        f"pip install -e '{REPO}[local]'"
    ]


def test_emulator_without_its_extra_says_which_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emulator import __main__ as emulator_main

    monkeypatch.setattr(emulator_main, "SERVER_MODULES", ("no_such_module_for_this_test",))
    with pytest.raises(SystemExit) as info:
        emulator_main.main(["--port", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "snowpipe-emulator needs the [emulator] extra (no_such_module_for_this_test not "
        f"installed): pip install -e '{REPO}[emulator]'\n"
    )


def test_make_run_and_up_install_the_local_extra_not_the_dev_tools(tmp_path: Path) -> None:
    for target in ("run", "up"):
        plan = subprocess.run(
            ["make", "-n", "-B", target, f"VENV={tmp_path / 'venv'}"],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        installs = [line for line in plan.splitlines() if "pip install" in line and " -e " in line]
        python = tmp_path / "venv" / "bin" / "python"
        assert installs == [f"{python} -m pip install --quiet -c constraints.txt -e '.[local]'"]
