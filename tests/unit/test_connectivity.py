"""What an operator reads when the broker or the state store cannot be used: the setting, the
address with its password masked, what went wrong (credentials, permission, TLS, unreachable)
and the fix, in one line; and the TLS options each client library gets (worker/tls.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import amqp.exceptions
import pytest
import redis

from worker.celery_config import build_config
from worker.connectivity import broker_error, diagnose, state_error
from worker.redisurl import redact_url
from worker.settings import Settings, load_settings
from worker.tls import broker_ssl_options, client_context, redis_ssl_kwargs


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://user:secret@host:5672/vh", "amqp://user:***@host:5672/vh"),
        ("redis://host:6379/0?password=secret&db=1", "redis://host:6379/0?password=***&db=1"),
        ("rediss://u:p@[::1]:6380/0?password=s", "rediss://u:***@[::1]:6380/0?password=***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://:secret@[::1/0", "redis://***@[::1/0"),
    ],
)  # fmt: skip
def test_redact_url_masks_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def settings(broker: str, state: str = "") -> Settings:
    return load_settings(require_identity=False, broker_url=broker, state_url=state)


def test_a_refused_rabbitmq_login_names_the_credentials_not_a_start() -> None:
    s = settings("amqp://guest:wrong@mq:5672//", "redis://r:6379/0")
    refused = amqp.exceptions.AccessRefused(
        "Login was refused using authentication mechanism PLAIN. For details see the broker "
        "logfile.", method_sig=(10, 40), reply_code=403
    )  # fmt: skip
    message = str(broker_error(s, refused))
    assert message.startswith("the broker at amqp://guest:***@mq:5672// (SNOWPIPE_BROKER_URL) "
                              "refused the credentials (")  # fmt: skip
    assert "set the user and password RabbitMQ expects in SNOWPIPE_BROKER_URL" in message
    assert "start RabbitMQ" not in message and "wrong" not in message


def test_a_vhost_the_user_may_not_use_is_a_permission_problem() -> None:
    s = settings("amqp://guest:guest@mq:5672/other", "redis://r:6379/0")
    denied = amqp.exceptions.NotAllowed("access to vhost 'other' refused for user 'guest'",
                                        reply_code=530)  # fmt: skip
    assert diagnose(denied)[0] == "permission"
    assert "rabbitmqctl set_permissions" in str(broker_error(s, denied))


REFUSED = "invalid username-password pair or user is disabled."
NOPERM = "NOPERM this user has no permissions to run the 'get' command"
UNVERIFIED = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (redis.AuthenticationError(REFUSED), "credentials"),
        (redis.ResponseError("NOAUTH Authentication required."), "credentials"),
        (redis.ResponseError(NOPERM), "permission"),
        (ssl.SSLCertVerificationError(1, UNVERIFIED), "tls"),
        (redis.ConnectionError("Error 111 connecting to r:6379. Refused."), "unreachable"),
    ],
)
def test_redis_failures_are_told_apart(error: Exception, problem: str) -> None:
    assert diagnose(error)[0] == problem


def test_a_wrapped_failure_is_diagnosed_by_its_cause() -> None:
    try:
        try:
            raise redis.AuthenticationError("WRONGPASS invalid username-password pair")
        except redis.RedisError as exc:
            raise ConnectionError("kombu lost the connection") from exc
    except ConnectionError as outer:
        assert diagnose(outer)[0] == "credentials"


def test_the_state_store_message_says_it_defaults_to_the_broker_and_what_to_set() -> None:
    s = settings("redis://:secret@r:6379/0")
    message = str(state_error(s, redis.ResponseError("NOAUTH Authentication required.")))
    assert message.startswith(
        "the state store at redis://:***@r:6379/0 (SNOWPIPE_STATE_URL, which defaults to "
        "SNOWPIPE_BROKER_URL) refused the credentials"
    )
    assert message.endswith(
        "in SNOWPIPE_STATE_URL: redis://USER:PASSWORD@HOST:PORT/DB, or redis://:PASSWORD@HOST:PORT/DB"
    )
    unreachable = str(state_error(s, redis.ConnectionError("Connection refused.")))
    assert "start Redis there, or point SNOWPIPE_STATE_URL at a running one" in unreachable


def test_tls_urls_check_the_certificate_and_the_host_name(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    assert redis_ssl_kwargs("redis://r:6379/0") == {}
    assert redis_ssl_kwargs("rediss://r:6380/0", ca) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, "ssl_ca_certs": str(ca),
    }  # fmt: skip
    amqps = broker_ssl_options("amqps://u:p@mq:5671//", ca)
    assert amqps is not None
    assert amqps["server_hostname"] == "mq"  # the URL's host name is checked
    assert amqps["context"]["check_hostname"] is True
    assert amqps["context"]["cadata"] == ca.read_text()  # besides the system's CAs
    assert broker_ssl_options("amqp://u:p@mq:5672//") is None
    context = client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_celery_gets_the_tls_options_for_rediss_and_amqps_brokers() -> None:
    rediss = build_config(settings("rediss://r:6380/0"))
    assert rediss["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert rediss["broker_use_ssl"]["ssl_check_hostname"] is True
    amqps = build_config(settings("amqps://u:p@mq:5671//", "rediss://r:6380/0"))
    assert amqps["broker_use_ssl"]["context"]["check_hostname"] is True
    assert "broker_use_ssl" not in build_config(settings("redis://r:6379/0"))


def test_remote_control_is_scoped_to_the_deployments_queue_name() -> None:
    config = build_config(load_settings(require_identity=False, queue_name="orders.ingest"))
    assert config["control_exchange"] == "orders.ingest"
