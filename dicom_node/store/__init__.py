"""Persistence: the index schema and named queries, the archive files, the durable queues.

``db`` (schema, connections), ``archive`` (instance files + rows), ``queue`` (the durable-queue
primitive and the scoring jobs), ``outbox`` (the delivery queue), ``studies`` (study queries),
``resultsets`` (exactly-once result folders). Nothing outside this package writes SQL.
"""
