"""Key loading, fingerprint, account normalisation and JWT claims for Snowflake key-pair auth."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tests.support.keys import key_pair
from worker.auth.guard import Token, TokenGuard
from worker.auth.keypair import (
    MAX_JWT_LIFETIME_SECONDS,
    KeyPairError,
    KeyPairJWT,
    load_private_key,
    normalize_account,
    normalize_user,
    public_key_fingerprint,
    token_from_jwt,
)
from worker.settings import Settings

PASSPHRASE = b"correct horse battery staple"
NOW = 1_700_000_000


def _same_key(a: object, b: object) -> bool:
    def numbers(k: object) -> object:
        return k.private_numbers()  # type: ignore[attr-defined]

    return bool(numbers(a) == numbers(b))


# --- Loading --------------------------------------------------------------------------------------


def test_loads_unencrypted_pkcs8_pem() -> None:
    kp = key_pair()
    assert _same_key(load_private_key(kp.private_pem), kp.private_key)


def test_loads_encrypted_pkcs8_pem_with_passphrase(tmp_path: Path) -> None:
    kp = key_pair()
    pem = kp.write_private(tmp_path / "k.p8", passphrase=PASSPHRASE).read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    assert _same_key(load_private_key(pem, PASSPHRASE), kp.private_key)
    assert _same_key(load_private_key(pem.decode(), PASSPHRASE.decode()), kp.private_key)


def test_loads_pkcs1_pem(tmp_path: Path) -> None:
    kp = key_pair()
    pem = kp.write_private(tmp_path / "k.pem", pkcs1=True).read_bytes()
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert _same_key(load_private_key(pem), kp.private_key)


def test_loads_encrypted_pkcs1_pem(tmp_path: Path) -> None:
    kp = key_pair()
    pem = kp.write_private(tmp_path / "k.pem", pkcs1=True, passphrase=PASSPHRASE).read_bytes()
    assert b"Proc-Type: 4,ENCRYPTED" in pem
    assert _same_key(load_private_key(pem, PASSPHRASE), kp.private_key)
    with pytest.raises(KeyPairError, match="encrypted and no passphrase"):
        load_private_key(pem)


def test_loads_base64_der_without_pem_header() -> None:
    kp = key_pair()
    der = kp.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    text = base64.encodebytes(der)  # wrapped over several lines, as people paste it
    assert _same_key(load_private_key(text), kp.private_key)


def test_passphrase_given_for_unencrypted_key_is_ignored() -> None:
    kp = key_pair()
    assert _same_key(load_private_key(kp.private_pem, PASSPHRASE), kp.private_key)


def test_wrong_passphrase_says_so_without_revealing_it(tmp_path: Path) -> None:
    pem = key_pair().write_private(tmp_path / "k.p8", passphrase=PASSPHRASE).read_bytes()
    with pytest.raises(KeyPairError, match="passphrase is wrong") as info:
        load_private_key(pem, b"not-the-passphrase", source=str(tmp_path / "k.p8"))
    message = str(info.value)
    assert "SNOWPIPE_PRIVATE_KEY_PASSPHRASE" in message
    assert str(tmp_path / "k.p8") in message
    assert "not-the-passphrase" not in message
    assert info.value.__cause__ is None  # no chained exception carrying key bytes


@pytest.mark.parametrize("passphrase", [None, b""], ids=["none", "empty"])
def test_missing_passphrase_for_encrypted_key(tmp_path: Path, passphrase: bytes | None) -> None:
    pem = key_pair().write_private(tmp_path / "k.p8", passphrase=PASSPHRASE).read_bytes()
    with pytest.raises(KeyPairError, match="encrypted and no passphrase is set"):
        load_private_key(pem, passphrase)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "is empty"),
        (b"hello, this is not a key", "not a readable private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a readable"),
        (key_pair().public_pem, "is a public key, not a private key"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a private key"),
    ],
    ids=["empty", "text", "garbage-pem", "public-key", "certificate"],
)
def test_data_that_is_not_a_private_key_is_refused(data: bytes, expected: str) -> None:
    with pytest.raises(KeyPairError, match=expected) as info:
        load_private_key(data, source="SNOWPIPE_PRIVATE_KEY")
    assert "SNOWPIPE_PRIVATE_KEY" in str(info.value)


def test_truncated_key_is_refused_without_echoing_its_content() -> None:
    pem = key_pair().private_pem
    body = pem.splitlines()
    truncated = b"\n".join([*body[: len(body) // 2], body[-1]])
    with pytest.raises(KeyPairError, match="not a readable private key") as info:
        load_private_key(truncated)
    assert body[1].decode() not in str(info.value)


@pytest.mark.parametrize(
    ("key", "label"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "an EC key"),
        (ed25519.Ed25519PrivateKey.generate(), "an Ed25519 key"),
    ],
    ids=["ec", "ed25519"],
)
def test_non_rsa_key_is_refused_with_the_fix(key: object, label: str) -> None:
    pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyPairError, match=f"{label}; Snowflake .* needs an RSA key"):
        load_private_key(pem)


# --- Fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_der_subject_public_key_info() -> None:
    kp = key_pair()
    spki = serialization.load_pem_public_key(kp.public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert public_key_fingerprint(kp.private_key) == expected
    assert public_key_fingerprint(kp.private_key.public_key()) == expected
    # The known bug: hashing the PKCS#1 public key gives a different (wrong) fingerprint.
    pkcs1 = kp.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    assert expected != "SHA256:" + base64.b64encode(hashlib.sha256(pkcs1).digest()).decode()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_fingerprint_matches_snowflake_docs_openssl_recipe(tmp_path: Path) -> None:
    kp = key_pair()
    key_file = kp.write_private(tmp_path / "rsa_key.p8")
    # Snowflake docs: openssl rsa -pubout -outform DER | openssl dgst -sha256 -binary | base64
    der = subprocess.run(
        ["openssl", "pkey", "-in", str(key_file), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der, check=True, capture_output=True
    ).stdout
    assert public_key_fingerprint(kp.private_key) == "SHA256:" + base64.b64encode(digest).decode()


# --- Account and user -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("account", "expected"),
    [
        ("xy12345", "XY12345"),
        ("xy12345.us-east-1", "XY12345"),
        ("xy12345.us-east-2.aws", "XY12345"),
        ("myorg-myaccount", "MYORG-MYACCOUNT"),
        ("MyOrg-MyAccount", "MYORG-MYACCOUNT"),
        ("myorg_myaccount", "MYORG_MYACCOUNT"),
        ("  xy12345.eu-west-1  ", "XY12345"),
        ("myaccount-12345.global", "MYACCOUNT"),
        ("xy12345.us-east-1.snowflakecomputing.com", "XY12345"),
        ("https://myorg-myaccount.snowflakecomputing.com/", "MYORG-MYACCOUNT"),
    ],
)
def test_account_normalisation(account: str, expected: str) -> None:
    assert normalize_account(account) == expected


@pytest.mark.parametrize("account", ["", "   ", ".us-east-1"])
def test_empty_account_is_refused(account: str) -> None:
    with pytest.raises(KeyPairError, match="SNOWPIPE_ACCOUNT"):
        normalize_account(account)


def test_user_is_upper_cased_and_empty_user_refused() -> None:
    assert normalize_user(" jsmith ") == "JSMITH"
    with pytest.raises(KeyPairError, match="SNOWPIPE_USER"):
        normalize_user(" ")


# --- JWT ------------------------------------------------------------------------------------------


def _decode(token: str) -> dict[str, object]:
    public = key_pair().private_key.public_key()
    return jwt.decode(token, public, algorithms=["RS256"], options={"verify_exp": False})


def test_jwt_claims_and_signature() -> None:
    kp = key_pair()
    minter = KeyPairJWT(
        kp.private_key, account="xy12345.us-east-1", user="jsmith", lifetime_seconds=600
    )
    token = minter.mint(now=NOW)
    claims = _decode(token)
    fp = public_key_fingerprint(kp.private_key)
    assert claims == {
        "iss": f"XY12345.JSMITH.{fp}",
        "sub": "XY12345.JSMITH",
        "iat": NOW,
        "exp": NOW + 600,
    }
    assert jwt.get_unverified_header(token)["alg"] == "RS256"


def test_jwt_lifetime_is_capped_at_59_minutes() -> None:
    minter = KeyPairJWT(key_pair().private_key, account="a", user="u", lifetime_seconds=3600)
    claims = _decode(minter.mint(now=NOW))
    assert claims["exp"] == NOW + MAX_JWT_LIFETIME_SECONDS == NOW + 3540
    assert minter.lifetime == 3540


def test_jwt_role_claim() -> None:
    minter = KeyPairJWT(key_pair().private_key, account="a", user="u", role="INGEST_ROLE")
    assert _decode(minter.mint(now=NOW))["scp"] == "session:role:INGEST_ROLE"
    no_role = KeyPairJWT(key_pair().private_key, account="a", user="u", role=" ")
    assert "scp" not in _decode(no_role.mint(now=NOW))


def test_jwt_token_is_a_guard_fetch() -> None:
    minter = KeyPairJWT(
        key_pair().private_key,
        account="a",
        user="u",
        lifetime_seconds=120,
        wall_clock=lambda: float(NOW),
    )
    token = minter.token()
    assert token.lifetime == 120.0
    assert token.expires_at == NOW + 120
    assert _decode(token.value)["iat"] == NOW
    guard = TokenGuard(minter.token, name="jwt", jitter_fraction=0.0)
    assert _decode(guard.get())["sub"] == "A.U"


def test_minter_refuses_pem_instead_of_a_key_object() -> None:
    with pytest.raises(KeyPairError, match="load it once"):
        KeyPairJWT(key_pair().private_pem, account="a", user="u")  # type: ignore[arg-type]


def test_minter_repr_shows_no_key() -> None:
    minter = KeyPairJWT(key_pair().private_key, account="a", user="u")
    assert "PRIVATE" not in repr(minter) and "A.U.SHA256:" in repr(minter)


def test_from_settings_loads_an_encrypted_key_file(tmp_path: Path) -> None:
    kp = key_pair()
    path = kp.write_private(tmp_path / "rsa_key.p8", passphrase=PASSPHRASE)
    settings = Settings(
        account="myorg-acct",
        user="svc",
        role="LOADER",
        private_key_path=path,
        private_key_passphrase=PASSPHRASE.decode(),
        jwt_lifetime_seconds=900,
    )
    minter = KeyPairJWT.from_settings(settings, wall_clock=lambda: float(NOW))
    claims = _decode(minter.mint())
    assert claims["sub"] == "MYORG-ACCT.SVC"
    assert claims["exp"] == NOW + 900
    assert claims["scp"] == "session:role:LOADER"


def test_from_settings_names_the_key_file_on_a_wrong_passphrase(tmp_path: Path) -> None:
    path = key_pair().write_private(tmp_path / "rsa_key.p8", passphrase=PASSPHRASE)
    settings = Settings(
        account="a", user="u", private_key_path=path, private_key_passphrase="wrong-one"
    )
    with pytest.raises(KeyPairError, match=r"rsa_key\.p8: the passphrase is wrong") as info:
        KeyPairJWT.from_settings(settings)
    assert "wrong-one" not in str(info.value)


def test_from_settings_with_pem_text_in_the_environment_setting() -> None:
    settings = Settings(account="a", user="u", private_key=key_pair().public_pem.decode())
    with pytest.raises(KeyPairError, match="SNOWPIPE_PRIVATE_KEY is a public key"):
        KeyPairJWT.from_settings(settings)


# --- Tokens received from a server ----------------------------------------------------------------


def test_token_from_jwt_reads_lifetime_from_its_own_claims() -> None:
    minter = KeyPairJWT(key_pair().private_key, account="a", user="u", lifetime_seconds=300)
    value = minter.mint(now=NOW)
    # Our clock is an hour off: the lifetime still comes from exp - iat.
    token = token_from_jwt(value, wall_clock=lambda: float(NOW + 3600))
    assert token == Token(value, 300.0, float(NOW + 300))


def test_token_from_jwt_falls_back_for_opaque_tokens() -> None:
    token = token_from_jwt("opaque-token", fallback_lifetime=55 * 60, wall_clock=lambda: 100.0)
    assert (token.lifetime, token.expires_at) == (3300.0, 3400.0)
