# Declarations of the limit tables (token buckets, keyed bucket table,
# connection-count table). Included by _core.pxd; defined in limits.pxi.
