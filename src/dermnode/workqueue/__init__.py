"""The work-queue machinery: the state database, one claim/retry/backoff/dead-letter mechanism serving the job
queue and the delivery outbox, the worker threads, and the durable file write.

``scp/`` (receive and spool) and the pipeline use it; it imports neither them nor the analysis.
"""
