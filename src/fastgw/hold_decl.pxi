# Declarations of the hold queue: the frames a DELAY verdict keeps back, in
# arrival order, until their wait ends. Included by _core.pxd; defined in
# hold.pxi (the queue, and the release that judges held frames again).


cdef struct HoldQueue:
    # Entries: [first byte][pad][stored size][payload size][bytes]; data frames
    # are stored as they came, a CLOSE by its unmasked payload.
    char* data
    Py_ssize_t size             # bytes used
    Py_ssize_t cap
    Py_ssize_t pos              # where the next entry to release starts
    double due                  # when the held message's wait ends (monotonic s)
    double started              # when the current hold began (monotonic s)
