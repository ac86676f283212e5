# Declarations of the WebSocket framing (RFC 6455): opcodes, the close codes
# the gateway uses, frame headers. Included by _core.pxd; the parser, the
# encoder and the masking are in frame.pxi.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    OP_CONT = 0x0
    OP_TEXT = 0x1
    OP_BINARY = 0x2
    OP_CLOSE = 0x8
    OP_PING = 0x9
    OP_PONG = 0xA
    FRAME_HEADER_MAX = 14       # 2 + 8 (64-bit length) + 4 (mask key)


cdef enum CloseCode:            # the codes the gateway sends or records itself
    CLOSE_GOING_AWAY = 1001
    CLOSE_PROTOCOL_ERROR = 1002
    CLOSE_NO_STATUS = 1005      # recorded for a CLOSE without a code (never sent)
    CLOSE_ABNORMAL = 1006       # recorded for a connection lost without a CLOSE (never sent)
    CLOSE_POLICY_VIOLATION = 1008
    CLOSE_TOO_BIG = 1009
    CLOSE_INTERNAL_ERROR = 1011
    CLOSE_BAD_GATEWAY = 1014


cdef enum FrameStatus:          # what frame_header() found
    FRAME_OK = 0
    FRAME_INCOMPLETE = 1        # the header needs more bytes
    FRAME_NON_MINIMAL = 2       # a 16-bit length below 126
    FRAME_BAD_LENGTH64 = 3      # a 64-bit length below 65536 or with its top bit set
    FRAME_RESERVED_BITS = 4     # RSV2/RSV3 set, or RSV1 without permessage-deflate
    FRAME_BAD_OPCODE = 5
    FRAME_BAD_CONTROL = 6       # a fragmented or oversized control frame
    FRAME_RSV1_CONTINUATION = 7 # RSV1 on a continuation frame (RFC 7692 6: first frame only)
    FRAME_RSV1_CONTROL = 8      # RSV1 on a control frame (RFC 7692 6: data messages only)


cdef struct FrameHeader:
    uint8_t first_byte          # FIN, RSV, opcode
    bint masked
    Py_ssize_t header           # bytes before the payload, mask key included
    uint64_t length             # payload bytes
