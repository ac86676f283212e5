# The C-level contract of the fastgw core. Other Cython code may cimport it.
#
# The core is one extension (calls between its parts stay C calls), split by
# topic into included files; each topic's declarations are in its *_decl.pxi,
# included here in dependency order, and its code in the .pxi of the same
# name, included by _core.pyx:
#
#   frame    WebSocket framing: header parsing, encoding, masking, close codes
#   stats    a leg's counters and an API's flow statistics (FlowStats)
#   hdr      HDR histogram arrays recorded from C
#   limits   token buckets, the LimitStore interface and LimitZone
#   cluster  ClusterStore: the leased shares of cluster-wide limits, spent locally
#   policy   the message policies: Verdict, SizeLimit, RateLimit
#   hold     the hold queue of a DELAY verdict
#   leg      one side of a relayed connection (buffers, forward, flow control, close)
#   relay    a proxied connection: two legs, end of life, fatal path
#   head     the HTTP/1.1 request head of an upgrade, parsed in one pass
#
# One proxied WebSocket connection is a Relay with two Legs: the client leg
# (fastgw is the server of the client's connection) and the backend leg
# (fastgw is the client of the backend's connection).

include "frame_decl.pxi"
include "hdr_decl.pxi"
include "stats_decl.pxi"
include "limits_decl.pxi"
include "cluster_decl.pxi"
include "policy_decl.pxi"
include "hold_decl.pxi"
include "leg_decl.pxi"
include "relay_decl.pxi"
include "head_decl.pxi"
