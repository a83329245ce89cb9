"""The Snowpipe Streaming REST client: errors, NDJSON encoding, endpoints, token wiring.

    errors.py    the error hierarchy (a tree in its docstring)
    encoding.py  rows -> NDJSON request bodies under the 4 MB wire cap
    auth.py      the two tokens of a process (key-pair JWT, scoped token) and how they are fetched
    client.py    SnowpipeClient: every endpoint through the TokenGuard and the RetryPolicy
    channel.py   ChannelWriter: sequential appends, commit tracking, reopen and replay

Import from the submodules: this package imports nothing eagerly, so that `worker.retry` can use
`worker.snowpipe.errors` without pulling in the HTTP client.
"""
