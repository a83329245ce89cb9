"""Key-pair JWT checks at the token exchange and scoped-token checks on the ingest host."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import jwt
import pytest

from tests.contract.refclient import GRANT_TYPE, RefClient, mint_jwt, spki_fingerprint
from tests.support.emulator import RunningEmulator, Starter
from tests.support.keys import key_pair

ACCOUNT, USER = "AUTHACCT", "LOADER"
DB, SCHEMA, PIPE = "DB", "PUBLIC", "AUTH-STREAMING"


@pytest.fixture(scope="module")
def registered(shared_emulator: RunningEmulator) -> RunningEmulator:
    shared_emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    return shared_emulator


@pytest.fixture
def client(registered: RunningEmulator) -> Iterator[RefClient]:
    c = RefClient(registered.url, ACCOUNT, USER, key_pair().private_key)
    yield c
    c.close()


def assert_jwt_invalid(response: httpx.Response) -> None:
    """401 {"code":"390144","message":"JWT token is invalid. [<uuid>]"}.

    See docs/protocol.md#errors.
    """
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["code"] == "390144"
    assert body["message"].startswith("JWT token is invalid. [")
    uuid.UUID(body["message"][len("JWT token is invalid. [") : -1])


def test_valid_jwt_gets_a_scoped_token(client: RefClient) -> None:
    response = client.request_token(scope="127.0.0.1")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.count(".") == 2


def test_jwt_in_form_assertion_field_is_accepted(client: RefClient) -> None:
    response = client.http.post(
        f"{client.url}/oauth/token",
        data={"grant_type": GRANT_TYPE, "scope": "127.0.0.1", "assertion": client.jwt()},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200, response.text


def test_millisecond_iat_and_exp_are_accepted(client: RefClient) -> None:
    response = client.request_token(token=client.jwt(millis=True), scope="127.0.0.1")
    assert response.status_code == 200, response.text


def test_scope_with_role_is_accepted(client: RefClient) -> None:
    response = client.request_token(scope="127.0.0.1 session:role:LOADER_ROLE")
    assert response.status_code == 200, response.text


def test_wrong_scope_is_a_400(client: RefClient) -> None:
    response = client.request_token(scope="other.host.example")
    assert response.status_code == 400
    assert response.json()["code"] == "ERR_INVALID_SCOPE"


def test_wrong_key_is_rejected(client: RefClient) -> None:
    other = key_pair("unregistered")
    token = mint_jwt(other.private_key, ACCOUNT, USER)
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_signature_by_another_key_under_the_right_fingerprint_is_rejected(
    client: RefClient,
) -> None:
    token = mint_jwt(
        key_pair("unregistered").private_key, ACCOUNT, USER,
        fingerprint_of=key_pair().private_key,
    )
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_unknown_user_is_rejected(client: RefClient) -> None:
    token = mint_jwt(key_pair().private_key, ACCOUNT, "SOMEONE_ELSE")
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_lower_case_account_is_rejected(client: RefClient) -> None:
    token = mint_jwt(key_pair().private_key, ACCOUNT.lower(), USER.lower(), upper=False)
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_iss_not_matching_sub_is_rejected(client: RefClient) -> None:
    now = int(time.time())
    fp = spki_fingerprint(key_pair().private_key)
    token = jwt.encode(
        {"iss": f"OTHER.USER.{fp}", "sub": f"{ACCOUNT}.{USER}", "iat": now, "exp": now + 60},
        key_pair().private_key,
        algorithm="RS256",
    )
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_expired_jwt_is_rejected(client: RefClient) -> None:
    token = client.jwt(iat=time.time() - 600, lifetime=300)
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_expired_millisecond_jwt_is_rejected(client: RefClient) -> None:
    token = client.jwt(iat=time.time() - 600, lifetime=300, millis=True)
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_lifetime_over_an_hour_is_accepted_but_valid_one_hour_after_iat(
    client: RefClient,
) -> None:
    # Snowflake's connector mints exp = iat + 24 h; the service takes it for one hour.
    fresh = client.jwt(lifetime=86400)
    assert client.request_token(token=fresh, scope="127.0.0.1").status_code == 200
    stale = client.jwt(iat=time.time() - 3660, lifetime=86400)
    assert_jwt_invalid(client.request_token(token=stale, scope="127.0.0.1"))


def test_iat_far_in_the_future_is_rejected(client: RefClient) -> None:
    token = client.jwt(iat=time.time() + 300, lifetime=600)
    assert_jwt_invalid(client.request_token(token=token, scope="127.0.0.1"))


def test_small_clock_skew_is_tolerated(client: RefClient) -> None:
    token = client.jwt(iat=time.time() + 20, lifetime=600)
    assert client.request_token(token=token, scope="127.0.0.1").status_code == 200


def test_hostname_requires_a_valid_jwt(client: RefClient) -> None:
    token = mint_jwt(key_pair("unregistered").private_key, ACCOUNT, USER)
    assert_jwt_invalid(client.get_hostname(token=token))


def test_ingest_call_without_scoped_token_is_401(client: RefClient) -> None:
    client.connect()
    client.scoped_token = "not-a-token"
    assert_jwt_invalid(client.open_channel(DB, SCHEMA, PIPE, "x"))


def test_key_pair_jwt_is_not_a_scoped_token(client: RefClient) -> None:
    client.connect()
    client.scoped_token = client.jwt()
    assert_jwt_invalid(client.open_channel(DB, SCHEMA, PIPE, "x"))


def test_expire_tokens_makes_every_issued_scoped_token_fail(emulator: RunningEmulator) -> None:
    emulator.register_key(ACCOUNT, USER, key_pair().public_pem)
    c = RefClient(emulator.url, ACCOUNT, USER, key_pair().private_key).connect()
    opened = c.open(DB, SCHEMA, PIPE, "exp")
    emulator.expire_tokens()
    response = c.append(
        DB, SCHEMA, PIPE, "exp", [{"a": 1}],
        continuation_token=opened["next_continuation_token"], end="1",
    )
    assert_jwt_invalid(response)
    c.connect()  # a new exchange works again, and the continuation chain is intact
    response = c.append(
        DB, SCHEMA, PIPE, "exp", [{"a": 1}],
        continuation_token=opened["next_continuation_token"], end="1",
    )
    assert response.status_code == 200, response.text
    c.close()


def test_scoped_token_expires_after_its_ttl(emulator_starter: Starter) -> None:
    with emulator_starter("--scoped-token-ttl", "1") as emu:
        emu.register_key(ACCOUNT, USER, key_pair().public_pem)
        c = RefClient(emu.url, ACCOUNT, USER, key_pair().private_key).connect()
        assert c.scoped_token is not None
        exp = jwt.decode(c.scoped_token, options={"verify_signature": False})["exp"]
        assert exp - time.time() <= 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            response = c.open_channel(DB, SCHEMA, PIPE, "ttl")
            if response.status_code == 401:
                break
            time.sleep(0.1)
        assert_jwt_invalid(response)
        assert time.time() >= exp
        c.close()
