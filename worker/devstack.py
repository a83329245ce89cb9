"""The local stack of `make run` and `snowpipe-worker up`: broker, emulator, worker, beat.

Everything runs on loopback: an embedded Redis (fakeredis, in this process), the emulator, one
`celery worker` and one `celery beat` (subprocesses), configured by the `local` profile
(worker/profiles/local.toml) plus environment overrides for the ports actually used. A throwaway
key pair is generated under `.local/` in the current directory (where the `local` profile looks
for it) and registered with the emulator; logs go there too. Needs the [local] extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker.embedded import EmbeddedRedis, start_embedded_redis
from worker.errors import StackError as StackError  # noqa: PLC0414 (re-exported)

# The directory that holds the `worker` package: a checkout's root, or site-packages.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# Relative to the current directory, like the `local` profile's private_key_path.
LOCAL_DIR = Path(".local")
LOCAL_ACCOUNT = "LOCALDEV"
LOCAL_USER = "LOADER"
# Short scoped tokens, so even a 10-second first run shows refreshes (and beat sharing them).
LOCAL_SCOPED_TOKEN_TTL = 10
LOCAL_COMMIT_DELAY = 0.5
LOCAL_WORKER_CONCURRENCY = 16
START_TIMEOUT = 60.0


def ensure_key(directory: Path = LOCAL_DIR) -> tuple[Path, Path]:
    """A throwaway RSA key pair under `directory` (created once, 0600, links refused):
    (private PEM, public PEM). See worker/keyfiles.py."""
    from worker import keyfiles

    return keyfiles.ensure_key(directory)


@dataclass
class LocalStack:
    """A running local stack (see the module docstring); `stop()` ends every part."""

    redis_port: int = 0
    emulator_port: int = 0
    pool: str = "threads"
    concurrency: int = LOCAL_WORKER_CONCURRENCY
    root: Path = field(default_factory=LOCAL_DIR.resolve)
    redis: EmbeddedRedis | None = None
    emulator_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def start(self) -> LocalStack:
        """Start broker, emulator, worker and beat; raises StackError naming what failed."""
        from worker.extras import missing_extra

        problem = missing_extra("local", "the local stack")
        if problem is not None:
            raise StackError(problem)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        private, public = ensure_key(self.root)
        self.redis = start_embedded_redis(port=self.redis_port)
        self.emulator_url = self._start_emulator(public)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SNOWPIPE_")}
        self.env.update(
            {
                "SNOWPIPE_CONFIG": "local",
                "SNOWPIPE_ACCOUNT": LOCAL_ACCOUNT,
                "SNOWPIPE_USER": LOCAL_USER,
                "SNOWPIPE_PRIVATE_KEY_PATH": str(private),
                "SNOWPIPE_ACCOUNT_URL": self.emulator_url,
                "SNOWPIPE_BROKER_URL": self.redis.url,
            }
        )
        if (PACKAGE_ROOT / "pyproject.toml").is_file():
            # A checkout: the worker and beat import this very `worker` package, wherever they run.
            self.env["PYTHONPATH"] = str(PACKAGE_ROOT)
        celery = [sys.executable, "-m", "celery", "-A", "worker"]
        self._spawn(
            "worker",
            [*celery, "worker", "--pool", self.pool, "--concurrency", str(self.concurrency),
             "--hostname", "local@%h", "--loglevel", "INFO", "--without-gossip",
             "--without-mingle"],
        )  # fmt: skip
        self._spawn(
            "beat",
            [*celery, "beat", "--loglevel", "INFO",
             "--schedule", str(self.root / "beat-schedule")],
        )  # fmt: skip
        self._wait_log("worker", "ready.")
        return self

    def apply_env(self) -> None:
        """Make this process use the stack's settings (for publishing from it)."""
        for key, value in self.env.items():
            if key.startswith("SNOWPIPE_"):
                os.environ[key] = value

    def _start_emulator(self, public_key: Path) -> str:
        args = [
            sys.executable, "-m", "emulator", "--port", str(self.emulator_port),
            "--scoped-token-ttl", str(LOCAL_SCOPED_TOKEN_TTL),
            "--commit-delay", str(LOCAL_COMMIT_DELAY), "--accept-any-pipe",
            "--public-key", f"{LOCAL_ACCOUNT}.{LOCAL_USER}={public_key}",
            "--log-level", "warning",
        ]  # fmt: skip
        log = (self.log_dir / "emulator.log").open("wb")
        process = subprocess.Popen(  # noqa: S603 (our own interpreter and fixed arguments)
            args, stdout=subprocess.PIPE, stderr=log, env=dict(os.environ)
        )
        self.processes["emulator"] = process
        line: list[bytes] = []
        assert process.stdout is not None
        stdout = process.stdout
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        text = line[0].decode().strip() if line else ""
        if not text.startswith("listening on "):
            raise StackError(
                f"the emulator did not start (said {text!r}); see {self.log_dir / 'emulator.log'}"
            )
        return text.removeprefix("listening on ").strip()

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(  # noqa: S603 (our interpreter, fixed arguments)
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )

    def _wait_log(self, name: str, marker: str) -> None:
        path = self.log_dir / f"{name}.log"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            if marker in text:
                return
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                raise StackError(f"the {name} did not start; see {path}:\n{text[-3000:]}")
            time.sleep(0.2)

    def alive(self) -> dict[str, bool]:
        """Which processes are still running."""
        return {name: p.poll() is None for name, p in self.processes.items()}

    def stop(self) -> None:
        """Stop worker, beat and emulator (SIGTERM, then SIGKILL), then the broker."""
        for name in ("beat", "worker", "emulator"):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
