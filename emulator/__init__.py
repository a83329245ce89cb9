"""A local emulator of the Snowpipe Streaming REST API (high-performance architecture).

It imports nothing from `worker`: it is written from the protocol (docs/protocol.md), so that it
can check the worker instead of sharing its misreadings.
"""
