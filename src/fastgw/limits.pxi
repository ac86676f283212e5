# The limit tables: token buckets, a keyed bucket table and a connection-count
# table, flat C tables in one memory region. Included by _core.pyx.
