"""Delivery core: channel logs in the state Redis, channel pumps, leases (docs/delivery.md).

Where each decision lives:

- a batch gets its channel offset in `log.ChannelLog.append` (one Lua script: dedup, offset,
  entry), called by the `ingest_batch` task, which then returns and Celery acknowledges;
- a commit is confirmed in `pump.ChannelPump.on_commit` (bulk channel status, polled per pipe by
  `pump.CommitPoller`), which then trims the log;
- who appends a channel is decided by `lease.LeaseTable` and `node.Balancer`.
"""
