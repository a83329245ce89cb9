"""`snowpipe-worker keygen`: the private key is 0600 from its creation, links are refused."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from tests.support.emulator import REPO_ROOT


def keygen(directory: Path, *, umask: int = 0) -> subprocess.CompletedProcess[str]:
    # A umask of 0 would leave a file created with the default mode readable by everyone.
    return subprocess.run(
        [sys.executable, "-c", "from worker.cli import main; main()", "keygen", str(directory)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
        umask=umask,
    )  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_private_key_is_created_0600_and_kept_on_a_second_run(tmp_path: Path) -> None:
    result = keygen(tmp_path / "keys")
    assert result.returncode == 0, result.stderr
    private, public = tmp_path / "keys" / "snowpipe_key.pem", tmp_path / "keys" / "snowpipe_key.pub"
    assert mode(private) == 0o600
    assert mode(public) == 0o644
    assert mode(tmp_path / "keys") == 0o700
    first = private.read_bytes()
    assert keygen(tmp_path / "keys").returncode == 0
    assert private.read_bytes() == first  # an existing key is kept


def test_a_symlink_planted_at_the_key_path_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a key\n")
    target.chmod(0o644)
    (keys / "snowpipe_key.pem").symlink_to(target)
    result = keygen(keys)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "is a symbolic link: refusing to use it for a key file" in result.stderr
    assert target.read_text() == "not a key\n" and mode(target) == 0o644

    # A dangling link (the key would be created where it points) is refused the same way.
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "snowpipe_key.pem").symlink_to(tmp_path / "nowhere.pem")
    assert keygen(dangling).returncode == 1
    assert not (tmp_path / "nowhere.pem").exists()


def test_keygen_from_several_processes_at_once_makes_one_matching_pair(tmp_path: Path) -> None:
    # The Procfile's lines each run keygen as they start, all at the same moment.
    from cryptography.hazmat.primitives import serialization

    args = [sys.executable, "-c", "from worker.cli import main; main()", "keygen", str(tmp_path)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    processes = [subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for _ in range(4)]  # fmt: skip
    for process in processes:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    key = serialization.load_pem_private_key((tmp_path / "snowpipe_key.pem").read_bytes(), None)
    spki = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (tmp_path / "snowpipe_key.pub").read_bytes() == spki
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snowpipe_key.pem", "snowpipe_key.pub"]
