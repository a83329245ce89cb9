"""The Procfile as shipped, under honcho: Redis with config/redis/state.conf, the emulator with
the throwaway key registered, two workers with their own node names, one beat. Batches published
to it are committed; SIGTERM stops every process cleanly.

The only changes from `honcho start` in a checkout: free ports instead of 6399 and 8087 (the
Procfile's REDIS_PORT and EMULATOR_PORT, with the URLs to match), and a directory of the test's
own (the Procfile and a link to config/), so that .local/ is not the checkout's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
from cryptography.hazmat.primitives import serialization

from tests.support.celery import make_rows, wait_until
from tests.support.emulator import REPO_ROOT
from tests.support.redis import free_port
from worker.publish import Publisher
from worker.settings import load_settings

START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
PIPE = "EVENTS-STREAMING"


def test_keygen_from_several_processes_at_once_makes_one_matching_pair(tmp_path: Path) -> None:
    # Every line of the Procfile that needs the key runs `keygen` first, all at the same moment.
    keygen = [sys.executable, "-c", "from worker.cli import main; main()", "keygen", str(tmp_path)]

    def run(_: int) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(keygen, capture_output=True, timeout=60, check=False)

    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(run, range(6)))
    assert [run.returncode for run in runs] == [0] * 6, [run.stderr for run in runs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snowpipe_key.pem", "snowpipe_key.pub"]
    private = tmp_path / "snowpipe_key.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert (tmp_path / "snowpipe_key.pub").read_bytes() == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Honcho:
    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.log_path = directory / "honcho.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["honcho", "start", "-c", "worker=2"], cwd=directory, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, process: str) -> list[str]:
        return [line for line in self.log().splitlines() if f" {process} " in line]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # this test's process group only
                self.process.wait(10)
        return self.process.returncode


def test_the_procfile_runs_as_shipped_under_honcho(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "Procfile", tmp_path / "Procfile")
    (tmp_path / "config").symlink_to(REPO_ROOT / "config")
    redis_port, emulator_port = free_port(), free_port()
    broker_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNOWPIPE_")}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(REPO_ROOT),
        "REDIS_PORT": str(redis_port),
        "EMULATOR_PORT": str(emulator_port),
        "SNOWPIPE_BROKER_URL": broker_url,
        "SNOWPIPE_ACCOUNT_URL": f"http://127.0.0.1:{emulator_port}",
    }
    honcho = Honcho(tmp_path, env)
    try:
        wait_until(
            lambda: all(f"worker.{n}@" in honcho.log() and "ready." in "".join(
                honcho.lines(f"worker.{n}")) for n in (1, 2)) or honcho.process.poll() is not None,
            timeout=START_TIMEOUT, what="both workers ready",
        )  # fmt: skip
        assert honcho.process.poll() is None, honcho.log()

        publisher = Publisher(load_settings(require_identity=False, broker_url=broker_url))
        for batch in range(3):
            publisher.publish(make_rows(batch * 10, 10), database="DEMO", schema="PUBLIC",
                              pipe=PIPE)  # fmt: skip
        admin = httpx.Client(base_url=f"http://127.0.0.1:{emulator_port}", timeout=10)

        def committed() -> list[int]:
            params = {"database": "DEMO", "schema": "PUBLIC", "pipe": PIPE}
            answer = admin.get("/_emulator/rows", params=params)
            lines = [line for line in answer.content.splitlines() if line.strip()]
            return [int(orjson.loads(line)["row"]["id"]) for line in lines]

        wait_until(lambda: len(committed()) >= 30, timeout=60, what="30 rows committed")
        assert sorted(committed()) == list(range(30))
        admin.close()
        time.sleep(1)  # beat's first refresh round

        log = honcho.log()
        assert "no public key registered" not in log
        assert "Traceback" not in log
        # Redis runs with the state configuration: the worker found nothing to warn about.
        assert "state.persistence" not in log
        assert (tmp_path / ".local" / "appendonlydir").is_dir()
    finally:
        code = honcho.stop()
    log = honcho.log()
    for process in ("redis.1", "worker.1", "worker.2", "beat.1"):
        assert f"{process} stopped (rc=0)" in log, log[-4000:]
    # uvicorn re-raises the SIGTERM it handled, after its graceful shutdown.
    assert "emulator.1 stopped (rc=-15)" in log or "emulator.1 stopped (rc=0)" in log
    assert code in (0, 143, -15), log[-4000:]
