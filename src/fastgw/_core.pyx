# cython: language_level=3
"""The fastgw core: the per-frame relay between a client and its backend, and the
parser of the request head that opens it.

Everything here runs per frame or per connection. It knows the WebSocket
framing (RFC 6455), the asyncio protocol interface and the limits, and
nothing else of fastgw: no configuration structs, no logging on the frame
path. The topics are in the included files (see _core.pxd for the map).
"""

include "frame.pxi"
include "hdr.pxi"
include "stats.pxi"
include "limits.pxi"
include "cluster.pxi"
include "policy.pxi"
include "hold.pxi"
include "leg.pxi"
include "relay.pxi"
include "head.pxi"
