# The request head of an upgrade, parsed in one pass over its bytes (sans-I/O): the
# Request that the phases read, or the reason of a 400. fastgw.http.head wraps it
# (the Refusal, the upgrade checks); tests/property/test_head_props.py holds it to the
# plain-Python parser it replaced, input for input.

from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memchr, memcmp


# Which bytes may be in an HTTP token (RFC 9110 5.6.2: a method, a header name).
cdef bint _TOKEN[256]
# Which bytes may not be in a request target ([\x00-\x20\x7f]) or a field value
# ([\x00-\x08\x0a-\x1f\x7f]: controls but HTAB).
cdef bint _BAD_IN_TARGET[256]
cdef bint _BAD_IN_VALUE[256]


cdef void _tables():
    cdef int c
    for c in range(256):
        _TOKEN[c] = (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122
                     or c in b"!#$%&'*+-.^_`|~")
        _BAD_IN_TARGET[c] = c <= 0x20 or c == 0x7f
        _BAD_IN_VALUE[c] = (c <= 0x1f and c != 0x09) or c == 0x7f


_tables()


cdef class Request:
    """A parsed HTTP request head: its request line and its headers, indexed by name."""

    def __init__(self, str method, str target, str version, list headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self._by_name = {}
        for name, value in headers:
            self._add(name, value)

    cdef void _add(self, str name, str value):
        cdef list values = self._by_name.get(name)
        if values is None:
            self._by_name[name] = [value]
        else:
            values.append(value)

    def get_all(self, str name) -> list:
        """The values of every header of that (lower-case) name, in order (a new list)."""
        cdef list values = self._by_name.get(name)
        return values[:] if values is not None else []

    def get(self, str name):
        """The first value of the header of that (lower-case) name, or None."""
        cdef list values = self._by_name.get(name)
        return values[0] if values else None

    def count(self, str name) -> int:
        cdef list values = self._by_name.get(name)
        return len(values) if values is not None else 0

    def tokens(self, str name) -> list:
        """The comma-separated tokens of every header of that name, lower-cased."""
        return self._tokens(name)

    cdef list _tokens(self, str name):
        cdef list out = []
        cdef list values = self._by_name.get(name)
        cdef str value, t
        if values is None:
            return out
        for value in values:
            for t in value.split(","):
                t = t.strip()
                if t:
                    out.append(t.lower())
        return out


cdef inline bint _all_token(const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t i
    for i in range(n):
        if not _TOKEN[p[i]]:
            return False
    return n > 0


cdef inline bint _any_bad(const unsigned char* p, Py_ssize_t n, bint* table):
    cdef Py_ssize_t i
    for i in range(n):
        if table[p[i]]:
            return True
    return False


cdef str _latin1(const unsigned char* p, Py_ssize_t n):
    return PyUnicode_DecodeLatin1(<const char*>p, n, NULL)


cdef str _lower_latin1(const unsigned char* p, Py_ssize_t n):
    """A header name (token bytes: ASCII) lower-cased."""
    cdef unsigned char small[128]
    cdef Py_ssize_t i
    cdef unsigned char c
    if n > 128:
        return _latin1(p, n).lower()
    for i in range(n):
        c = p[i]
        small[i] = c + 32 if 65 <= c <= 90 else c
    return _latin1(small, n)


def parse_request_head(bytes head):
    """Parse a request head (without its final CRLF CRLF): a Request, or the reason
    (a str) of the 400 it gets."""
    cdef const unsigned char* p = head
    cdef Py_ssize_t n = len(head)
    cdef Py_ssize_t end, sp1, sp2, i, colon, vstart, vend, line
    cdef const unsigned char* found
    cdef Request req
    cdef str name, value
    # The request line: three parts split by single spaces.
    found = <const unsigned char*>_find_crlf(p, n)
    end = found - p if found != NULL else n
    sp1 = sp2 = -1
    for i in range(end):
        if p[i] == 32:
            if sp1 < 0:
                sp1 = i
            elif sp2 < 0:
                sp2 = i
            else:
                return "malformed request line"
    if sp2 < 0 or sp1 == 0 or sp2 == sp1 + 1:
        return "malformed request line"
    if end - (sp2 + 1) < 7 or memcmp(p + sp2 + 1, b"HTTP/1.", 7) != 0:
        return "unsupported HTTP version"
    if not _all_token(p, sp1):
        return "malformed method"
    if p[sp1 + 1] != 47:            # "/"
        return "request target must be an absolute path"
    if _any_bad(p + sp1 + 1, sp2 - sp1 - 1, _BAD_IN_TARGET):
        return "malformed request target"
    req = Request.__new__(Request)
    req.method = _latin1(p, sp1)
    req.target = _latin1(p + sp1 + 1, sp2 - sp1 - 1)
    req.version = _latin1(p + sp2 + 1, end - sp2 - 1)
    req.headers = []
    req._by_name = {}
    # The header lines.
    line = end + 2
    while found != NULL:
        found = <const unsigned char*>_find_crlf(p + line, n - line)
        end = found - p if found != NULL else n
        colon = -1
        for i in range(line, end):
            if p[i] == 58:          # ":"
                colon = i
                break
        if colon <= line:
            return "malformed header line"
        if not _all_token(p + line, colon - line):
            return "malformed header name"
        vstart, vend = colon + 1, end
        while vstart < vend and (p[vstart] == 32 or p[vstart] == 9):
            vstart += 1
        while vend > vstart and (p[vend - 1] == 32 or p[vend - 1] == 9):
            vend -= 1
        if _any_bad(p + vstart, vend - vstart, _BAD_IN_VALUE):
            return "malformed header value"
        name = _lower_latin1(p + line, colon - line)
        value = _latin1(p + vstart, vend - vstart)
        req.headers.append((name, value))
        req._add(name, value)
        line = end + 2
    return req


cdef inline const void* _find_crlf(const unsigned char* p, Py_ssize_t n):
    """The first CR LF in p[:n], or NULL."""
    cdef const unsigned char* q
    while n >= 2:
        q = <const unsigned char*>memchr(p, 13, n - 1)
        if q == NULL:
            return NULL
        if q[1] == 10:
            return q
        n -= q + 1 - p
        p = q + 1
    return NULL


cdef inline bint _is_space(unsigned char c):
    return c == 32 or 9 <= c <= 13          # " \t\n\v\f\r"


def parse_response_head(bytes head):
    """Parse the head of a backend's answer to an upgrade (without its final CRLF CRLF):
    (status, {lower-case name: value, repeated names joined by ", "}), or the reason it is
    malformed: "status line" or "header line"."""
    cdef const unsigned char* p = head
    cdef Py_ssize_t n = len(head)
    cdef Py_ssize_t end, line, i, colon, a, b, c, d, digits
    cdef const unsigned char* found
    cdef const unsigned char* sep
    cdef int status = 0
    cdef dict headers = {}
    cdef str name, value, seen
    found = <const unsigned char*>_find_crlf(p, n)
    end = found - p if found != NULL else n
    # "HTTP/1.x SP status [SP reason]": the status ASCII digits.
    if end < 7 or memcmp(p, b"HTTP/1.", 7) != 0:
        return "status line"
    i = 7
    while i < end and p[i] != 32:
        i += 1
    i += 1
    digits = 0
    while i < end and p[i] != 32:
        if not 48 <= p[i] <= 57 or digits == 9:
            return "status line"
        status = status * 10 + (p[i] - 48)
        digits += 1
        i += 1
    if digits == 0:
        return "status line"
    line = end + 2
    while found != NULL:
        found = <const unsigned char*>_find_crlf(p + line, n - line)
        end = found - p if found != NULL else n
        sep = <const unsigned char*>memchr(p + line, 58, end - line)     # ":"
        if sep == NULL:
            return "header line"
        colon = sep - p
        a, b = line, colon
        while a < b and _is_space(p[a]):
            a += 1
        while b > a and _is_space(p[b - 1]):
            b -= 1
        c, d = colon + 1, end
        while c < d and _is_space(p[c]):
            c += 1
        while d > c and _is_space(p[d - 1]):
            d -= 1
        name = _lower_latin1(p + a, b - a)
        value = _latin1(p + c, d - c)
        seen = headers.get(name)
        headers[name] = value if seen is None else seen + ", " + value
        line = end + 2
    return status, headers


# -- the upgrade checks and the backend's request (fastgw.http.head, .forwarding) --------
# Plain-Python versions of these are the oracles of tests/property/test_upgrade_props.py.

# Headers that a request may carry once at most (400 otherwise): lower-case, as shown.
cdef tuple _SINGLE = (("host", "Host"), ("content-length", "Content-Length"),
                      ("sec-websocket-key", "Sec-WebSocket-Key"),
                      ("sec-websocket-version", "Sec-WebSocket-Version"))

# Headers never copied to the backend: hop-by-hop (RFC 9110 7.6.1), the WebSocket
# handshake's own (the gateway makes its own handshake), and those the gateway sets itself.
NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", "sec-websocket-protocol",
    "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
})
cdef frozenset _NOT_FORWARDED = NOT_FORWARDED

cdef list _NO_HEADERS = []
cdef list _ALLOW_GET = [("Allow", "GET")]
cdef list _UPGRADE_WEBSOCKET = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
cdef list _VERSION_13 = [("Sec-WebSocket-Version", "13")]


cdef bint _is_token(str s):
    """An HTTP token (RFC 9110 5.6.2): one or more token characters."""
    cdef Py_UCS4 c
    if not s:
        return False
    for c in s:
        if c > 255 or not _TOKEN[c]:
            return False
    return True


cdef inline bint _base64_char(Py_UCS4 c):
    return (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 43 or c == 47)


cdef bint _valid_key(str key):
    """A Sec-WebSocket-Key: base64 of 16 bytes (RFC 6455 4.1), as the strict decoder of
    `base64.b64decode(key, validate=True)` takes it: 22 base64 characters and "==" (the
    unused low bits of the last one are not checked, as that decoder does not)."""
    cdef Py_ssize_t i
    if len(key) != 24 or key[22] != "=" or key[23] != "=":
        return False
    for i in range(22):
        if not _base64_char(key[i]):
            return False
    return True


def check_request(Request req):
    """The checks of an upgrade request before it is routed: None, or the (status,
    reason, headers) of its refusal (405, 400)."""
    cdef list values
    cdef str name, shown
    if req.method != "GET":
        return 405, "only GET can be upgraded to a WebSocket", _ALLOW_GET[:]
    if req.version != "HTTP/1.1":
        return 400, "HTTP/1.1 is required for a WebSocket upgrade", []
    values = req._by_name.get("host")
    if values is None or len(values) != 1 or not values[0]:
        return 400, "exactly one Host header is required", []
    for name, shown in _SINGLE:
        values = req._by_name.get(name)
        if values is not None and len(values) > 1:
            return 400, f"duplicate {shown} header", []
    values = req._by_name.get("content-length")
    if "transfer-encoding" in req._by_name or (values is not None and values[0] != "0"):
        return 400, "an upgrade request has no body", []
    return None


def check_websocket(Request req, allowed):
    """The WebSocket headers of a routed request: the offered subprotocols that `allowed`
    (a frozenset, None: any) lets through, in the client's order (a list), or the
    (status, reason, headers) of its refusal (426, 400)."""
    cdef list values
    cdef list offered = []
    cdef str value, p
    if "websocket" not in req._tokens("upgrade") or "upgrade" not in req._tokens("connection"):
        return 426, "this endpoint speaks WebSocket only", _UPGRADE_WEBSOCKET[:]
    values = req._by_name.get("sec-websocket-version")
    if values is None or len(values) != 1 or values[0] != "13":
        return 426, "unsupported Sec-WebSocket-Version", _VERSION_13[:]
    values = req._by_name.get("sec-websocket-key")
    if values is None or len(values) != 1 or not _valid_key(values[0]):
        return 400, "missing or malformed Sec-WebSocket-Key", []
    values = req._by_name.get("sec-websocket-protocol")
    if values is None:
        return offered
    for value in values:
        for p in value.split(","):
            p = p.strip(" \t")
            if not p:
                continue            # empty list elements are ignored (RFC 9110 5.6.1)
            if not _is_token(p):
                return 400, "malformed Sec-WebSocket-Protocol", []
            if allowed is None or p in allowed:
                offered.append(p)
    return offered


cdef str _forwarded_value(str value):
    """A Forwarded parameter value: a token as it is, else a quoted-string."""
    if _is_token(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def backend_headers(Request req, str peer_ip, str node, bint secure, list offered,
                    admission=None, str extensions=None):
    """The client's end-to-end headers plus the forwarding headers, for the backend's
    upgrade request: (name, value) in order. `node` is the peer's address as a Forwarded
    for= value (identity.forwarded_node); the rest as fastgw.http.forwarding.backend_headers."""
    cdef list connection = req._tokens("connection")
    cdef list out = []
    cdef list xff = []
    cdef list forwarded = []
    cdef str name, value, client_ip = peer_ip
    cdef str proto = "https" if secure else "http"
    cdef str host, element
    cdef bint trusted = False
    strip = None
    if admission is not None:
        strip = admission.strip_headers
        client_ip, trusted = admission.client_ip, admission.peer_trusted
    for name, value in req.headers:
        if name == "x-forwarded-for":
            xff.append(value)
        elif name == "forwarded":
            forwarded.append(value)
        elif not (name in _NOT_FORWARDED or name in connection
                  or (strip is not None and name in strip)):
            out.append((name, value))
    values = req._by_name.get("host")
    host = (values[0] or "") if values else ""
    xff.append(peer_ip)
    out.append(("X-Forwarded-For", ", ".join(xff)))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Forwarded-Host", host))
    out.append(("X-Real-IP", client_ip))
    element = "for=" + node + ";host=" + _forwarded_value(host) + ";proto=" + proto
    if trusted:
        forwarded.append(element)
        out.append(("Forwarded", ", ".join(forwarded)))
    else:
        out.append(("Forwarded", element))
    if admission is not None:
        out.extend(admission.add_headers)
    if offered:
        out.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
    if extensions:
        out.append(("Sec-WebSocket-Extensions", extensions))
    return out


def upgrade_request(str start, str key, list headers):
    """The bytes of the backend's upgrade request: `start` (the request line and the fixed
    header lines, CRLF between them), the Sec-WebSocket-Key, then `headers` ((name, value)),
    latin-1 (a character beyond it raises UnicodeEncodeError)."""
    cdef list lines = [start, "Sec-WebSocket-Key: " + key]
    cdef str name, value
    for name, value in headers:
        lines.append(name + ": " + value)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")
