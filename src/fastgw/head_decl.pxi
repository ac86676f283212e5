# Declarations of the HTTP/1.1 request head of an upgrade (RFC 9110/9112). Included by
# _core.pxd; the parser is in head.pxi.


cdef class Request:
    cdef readonly str method
    cdef readonly str target
    cdef readonly str version
    cdef readonly list headers      # (lower-case name, value), in order
    cdef dict _by_name              # name -> its values, in order

    cdef void _add(self, str name, str value)
    cdef list _tokens(self, str name)
