# WebSocket framing (RFC 6455): header parsing, frame encoding, masking and
# close codes. Included by _core.pyx; the constants and structs are in
# frame_decl.pxi.
#
# Everything here runs per frame: C only, no Python objects, no allocation
# (frame_error_reason, on the error path only, returns a constant).

from libc.string cimport memcpy

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<endian.h>" nogil:
    uint64_t htobe64(uint64_t)
    uint64_t be64toh(uint64_t)


cdef inline int frame_header(const char* p, Py_ssize_t avail, FrameHeader* h,
                             bint deflate) noexcept nogil:
    """Decode the frame header at p (avail bytes there) into h. FRAME_OK, or
    FRAME_INCOMPLETE while the header is not all there, or the first RFC 6455
    violation found (in this order: lengths, reserved bits, opcode, control
    frame rules). With `deflate` (permessage-deflate negotiated, RFC 7692) RSV1
    may be set on the first frame of a data message (a TEXT or BINARY frame).
    The mask direction and the size bounds are the caller's."""
    cdef uint8_t b0, b1, op, len7
    cdef uint16_t len16
    cdef uint64_t length
    cdef Py_ssize_t header
    if avail < 2:
        return FRAME_INCOMPLETE
    b0 = <uint8_t>p[0]
    b1 = <uint8_t>p[1]
    op = b0 & 0x0F
    len7 = b1 & 0x7F
    if len7 < 126:
        length = len7
        header = 2
    elif len7 == 126:
        if avail < 4:
            return FRAME_INCOMPLETE
        memcpy(&len16, p + 2, 2)
        length = ntohs(len16)
        header = 4
        if length < 126:
            return FRAME_NON_MINIMAL
    else:
        if avail < 10:
            return FRAME_INCOMPLETE
        memcpy(&length, p + 2, 8)
        length = be64toh(length)
        header = 10
        if length >> 63 or length < 65536:
            return FRAME_BAD_LENGTH64
    if b0 & 0x70:                   # rare: the common path pays this one test only
        if (b0 & 0x30) or not deflate:
            return FRAME_RESERVED_BITS
        if op == OP_CONT:
            return FRAME_RSV1_CONTINUATION
        if OP_CLOSE <= op <= OP_PONG:
            return FRAME_RSV1_CONTROL
    if op > OP_BINARY and (op < OP_CLOSE or op > OP_PONG):
        return FRAME_BAD_OPCODE
    if op >= OP_CLOSE and (not (b0 & 0x80) or length > 125):
        return FRAME_BAD_CONTROL
    h.first_byte = b0
    h.masked = b1 >> 7
    h.length = length
    h.header = header + 4 if h.masked else header
    return FRAME_OK


cdef bytes frame_error_reason(int status):
    """The close reason for a FrameStatus violation."""
    if status == FRAME_NON_MINIMAL:
        return b"non-minimal frame length"
    if status == FRAME_BAD_LENGTH64:
        return b"invalid 64-bit frame length"
    if status == FRAME_RESERVED_BITS:
        return b"reserved bits set without extension"
    if status == FRAME_RSV1_CONTINUATION:
        return b"RSV1 set on a continuation frame"
    if status == FRAME_RSV1_CONTROL:
        return b"RSV1 set on a control frame"
    if status == FRAME_BAD_OPCODE:
        return b"invalid opcode"
    return b"fragmented or oversized control frame"


cdef inline bint close_code_valid(uint16_t code) noexcept nogil:
    # RFC 6455 7.4: codes that may appear on the wire.
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999


cdef inline void mask_copy(char* dst, const char* src, Py_ssize_t n, uint32_t mask) noexcept nogil:
    """Copy n bytes from src to dst, XORed with the 4-byte mask key as laid in memory."""
    cdef uint64_t m64 = (<uint64_t>mask << 32) | <uint64_t>mask
    cdef uint64_t v
    cdef Py_ssize_t i = 0
    cdef const uint8_t* key = <const uint8_t*>&mask
    while i + 8 <= n:
        memcpy(&v, src + i, 8)
        v ^= m64
        memcpy(dst + i, &v, 8)
        i += 8
    while i < n:
        dst[i] = <char>(<uint8_t>src[i] ^ key[i & 3])
        i += 1


cdef inline uint32_t mask_key(uint32_t* rng) noexcept nogil:
    # xorshift32: mask keys need not be secret here, only varied.
    rng[0] ^= rng[0] << 13
    rng[0] ^= rng[0] >> 17
    rng[0] ^= rng[0] << 5
    return rng[0]


cdef inline Py_ssize_t frame_encode(char* p, uint8_t first_byte, const char* payload,
                                    Py_ssize_t size, bint masked, uint32_t* rng) noexcept nogil:
    """Write one frame at p (room for size + FRAME_HEADER_MAX bytes), masked
    with a fresh key when `masked`; return its length."""
    cdef char* start = p
    cdef uint16_t len16
    cdef uint64_t len64
    cdef uint32_t mask
    cdef uint8_t mask_bit = 0x80 if masked else 0
    p[0] = <char>first_byte
    if size < 126:
        p[1] = <char>(mask_bit | <uint8_t>size)
        p += 2
    elif size < 65536:
        p[1] = <char>(mask_bit | 126)
        len16 = htons(<uint16_t>size)
        memcpy(p + 2, &len16, 2)
        p += 4
    else:
        p[1] = <char>(mask_bit | 127)
        len64 = htobe64(<uint64_t>size)
        memcpy(p + 2, &len64, 8)
        p += 10
    if masked:
        mask = mask_key(rng)
        memcpy(p, &mask, 4)
        p += 4
        mask_copy(p, payload, size, mask)
    elif size:
        memcpy(p, payload, size)
    return (p - start) + size


cdef inline Py_ssize_t close_payload(char* out, int code, const char* reason,
                                     Py_ssize_t size) noexcept nogil:
    """A CLOSE frame's payload (at most 125 bytes) at out: the code, then the
    reason cut at a character boundary, as it must stay UTF-8 (RFC 6455 5.5.1)."""
    cdef uint16_t be_code = htons(<uint16_t>code)
    memcpy(out, &be_code, 2)
    if size > 123:
        size = 123
        while size > 0 and (<uint8_t>reason[size] & 0xC0) == 0x80:
            size -= 1
    if size > 0:
        memcpy(out + 2, reason, size)
    else:
        size = 0
    return size + 2
