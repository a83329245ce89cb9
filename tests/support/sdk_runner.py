"""Drive Snowflake's official SDK (`snowpipe-streaming`) in its own process, for the SDK tests.

Run as `python -m tests.support.sdk_runner PLAN.json`. The SDK's native core starts threads and
process-wide state at import, so it never runs inside the pytest process: a test writes a plan,
runs this module in a subprocess (with `SSL_CERT_FILE` pointing at the emulator's CA) and reads
the one `SDK_RESULT {...}` line it prints last.

Plan keys: url, account, user, private_key_file, database, schema, pipe, channel, batches,
rows_per_batch, timeout_seconds. Optional: table (use `from_table`, pipe `<table>-STREAMING`),
role, client_name, first_offset, properties (more SDK configuration keys, passed as given),
admin_after_batch ({"0": "/_emulator/expire-tokens"}: POST that admin path once batch 0 is
flushed), linger_seconds (keep the client open that long after the commit, so that its
background token refresh can be observed), null_note_ids (ids whose `note` is sent as null, for a
table that rejects them) and elastic (append through the client's Elastic channel
with `append_rows_with_wait`, waiting for each batch's acknowledgement, instead of a named channel).
Rows are `{"id": n, "batch": b, "note": "..."}` with offset token `str(n)`, so a test can check
that every id arrived exactly once.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import httpx

RESULT_PREFIX = "SDK_RESULT "


def _status_dict(status: Any) -> dict[str, Any]:
    return {
        "status_code": status.status_code,
        "latest_committed_offset_token": status.latest_committed_offset_token,
        "rows_inserted": status.rows_inserted_count,
        "rows_error_count": status.rows_error_count,
    }


def _admin_post(url: str, path: str) -> None:
    # The same CA the SDK trusts (SSL_CERT_FILE) verifies the emulator's admin API.
    ca = os.environ.get("SSL_CERT_FILE")
    response = httpx.post(url + path, verify=ca if ca else True, timeout=10)
    response.raise_for_status()


def run(plan: dict[str, Any]) -> dict[str, Any]:
    """Open a channel, append the planned batches one flush each, wait for the commit, close."""
    from snowflake.ingest.streaming import StreamingIngestClient

    timeout = int(plan["timeout_seconds"])
    properties: dict[str, Any] = {
        "url": plan["url"],
        "account": plan["account"],
        "user": plan["user"],
        # PEM text: the SDK also takes `private_key_file`, but text is what most callers pass.
        "private_key": Path(plan["private_key_file"]).read_text(),
    }
    if plan.get("role"):
        properties["role"] = plan["role"]
    properties.update(plan.get("properties", {}))
    result: dict[str, Any] = {"ok": False}
    started = time.monotonic()
    name = plan.get("client_name", "emulator-sdk-test")
    if plan.get("table"):
        # Table mode: the SDK derives the pipe name `<table>-STREAMING` itself.
        client = StreamingIngestClient.from_table(
            name, plan["database"], plan["schema"], plan["table"], properties=properties
        )
    else:
        client = StreamingIngestClient(
            name, plan["database"], plan["schema"], plan["pipe"], properties=properties
        )
    try:
        result["client_seconds"] = round(time.monotonic() - started, 2)
        if plan.get("elastic"):
            result.update(_run_elastic(client, plan, timeout))
            return result
        channel, status = client.open_channel(plan["channel"])
        result["open_status"] = _status_dict(status)
        first = int(plan.get("first_offset", 0))
        next_id = first
        null_notes = set(plan.get("null_note_ids", []))
        for batch in range(int(plan["batches"])):
            rows = [
                {
                    "id": next_id + i, "batch": batch,
                    "note": None if next_id + i in null_notes else f"row {next_id + i}",
                }
                for i in range(int(plan["rows_per_batch"]))
            ]
            channel.append_rows(rows, str(next_id), str(next_id + len(rows) - 1))
            next_id += len(rows)
            # One flush per batch keeps every request small (inline rowset mode).
            channel.initiate_flush()
            channel.wait_for_flush(timeout)
            admin_path = plan.get("admin_after_batch", {}).get(str(batch))
            if admin_path:
                _admin_post(plan["url"], admin_path)
        last = next_id - 1
        channel.wait_for_commit(
            lambda token: token is not None and int(token) >= last, timeout_seconds=timeout
        )
        result["committed_seconds"] = round(time.monotonic() - started, 2)
        result["final_status"] = _status_dict(channel.get_channel_status())
        time.sleep(float(plan.get("linger_seconds", 0)))
        channel.close(timeout_seconds=timeout)
        result["ok"] = True
    finally:
        client.close(timeout_seconds=timeout)
    return result


def _run_elastic(client: Any, plan: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Append every planned batch through the Elastic channel; each must be acknowledged."""
    channel = client.get_elastic_channel()
    out: dict[str, Any] = {"channel_name": channel.channel_name}
    next_id = 0
    for batch in range(int(plan["batches"])):
        rows = [
            {"id": next_id + i, "batch": batch, "note": f"row {next_id + i}"}
            for i in range(int(plan["rows_per_batch"]))
        ]
        future = channel.append_rows_with_wait(rows, f"batch-{batch}")
        channel.initiate_flush()
        future.result(timeout=timeout)
        next_id += len(rows)
    out["final_status"] = _status_dict(channel.get_channel_status())
    out["ok"] = True
    return out


def main(argv: list[str]) -> int:
    """Run the plan in argv[1]; print `SDK_RESULT {json}` last; exit 0 only when it committed."""
    plan = json.loads(Path(argv[1]).read_text())
    try:
        result = run(plan)
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
