"""The Snowpipe Streaming REST client, below the Celery layer (it imports nothing of it).

    models.py    ChannelStatus, OpenChannelResult: what the endpoints answer, read leniently
    encoding.py  the row contract (`encode_row`), NDJSON bodies under the 4 MB wire cap
    errors.py    HTTP outcomes -> the errors of the one tree (worker/errors.py), re-exported
    tokens.py    the two tokens of a process (key-pair JWT, scoped token), how each is fetched,
                 and what to check when Snowflake refuses one
    http.py      one httpx.Client per process (fork-safe), GuardAuth: the 401 and 410 flows
    client.py    SnowpipeClient: every endpoint through the RetryPolicy and a GuardAuth

Import from the submodules: this package imports nothing eagerly.
"""
