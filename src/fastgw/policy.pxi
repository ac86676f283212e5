# The message policies: the MessagePolicy interface, SizeLimit and RateLimit,
# and RateRule, the spec a connection's rate limits are built from. Included
# by _core.pyx; the interface and the layouts are in policy_decl.pxi.
#
# judge() runs on the frame path: C only, no Python objects, no allocation
# (close_reason, on the reject path only, builds a bytes).

from libc.stdlib cimport malloc, free

# A message whose shared bucket found no room in the limit store is over its
# limit; a delay tries again after this long (s).
cdef double TABLE_FULL_WAIT = 0.1


cdef class RateRule:
    """One message-rate-limit of a flow with the values of a connection's plan.

    `action` and `scope` are Action and Scope members; rates are per second
    (0.0: no limit of that kind), bursts in messages and bytes; `msg_key` and
    `byte_key` are the LimitStore keys of the two buckets for scope client and
    api (key_hash of a name unique to the policy and, for client, the client).
    """

    def __init__(self, str name, Action action, Scope scope, *, double msg_rate=0.0,
                 double msg_burst=1.0, double byte_rate=0.0, double byte_burst=1.0,
                 uint64_t msg_key=0, uint64_t byte_key=0):
        self.name = name
        self.action = action
        self.scope = scope
        self.msg_rate = msg_rate
        self.msg_burst = msg_burst
        self.byte_rate = byte_rate
        self.byte_burst = byte_burst
        self.msg_key = msg_key
        self.byte_key = byte_key

    def __repr__(self):
        cdef object action = self.action
        cdef object scope = self.scope
        return (f"RateRule({self.name!r}, {action.name}, {scope.name}, "
                f"msg_rate={self.msg_rate}, msg_burst={self.msg_burst}, "
                f"byte_rate={self.byte_rate}, byte_burst={self.byte_burst})")


cdef class MessagePolicy:
    """The interface of a message policy (see policy_decl.pxi)."""

    cdef int judge(self, MessageState* msg, uint8_t first_byte, Py_ssize_t size,
                   double now, bint retry) except -1:
        raise NotImplementedError

    cdef bytes close_reason(self):
        return b"message policy violation"


@cython.final
cdef class SizeLimit(MessagePolicy):
    """Messages up to `max` bytes; a larger one ends the connection (1009),
    as soon as the frame that makes it larger arrives."""

    def __init__(self, uint64_t max):
        self.max = max

    cdef int judge(self, MessageState* msg, uint8_t first_byte, Py_ssize_t size,
                   double now, bint retry) except -1:
        return REJECT if msg.size > self.max else PASS

    cdef bytes close_reason(self):
        return b"message too big"


@cython.final
cdef class RateLimit(MessagePolicy):
    """The message-rate-limits of one flow of one connection, in order.

    A message is counted once, at its first frame; its bytes are counted
    frame by frame. A shared bucket with no room in the store (take() < 0) is
    over the limit: the rule's action applies (a delay tries again after
    TABLE_FULL_WAIT), and the store counts the message (message_overflows).
    """

    def __init__(self, list rules, LimitStore store=None, double now=0.0):
        """`rules`: RateRule; `now`: when the connection's buckets start full."""
        cdef int i
        cdef MsgRule* r
        cdef RateRule spec
        self.rules = <MsgRule*>malloc(sizeof(MsgRule) * max(1, len(rules)))
        if self.rules == NULL:
            raise MemoryError()
        self.specs = rules
        self.all_local = True
        for i, spec in enumerate(rules):
            if spec.scope != SCOPE_CONNECTION:
                if store is None:
                    raise ValueError("shared scopes need a LimitStore")
                self.all_local = False
            r = &self.rules[i]
            r.action = spec.action
            r.scope = spec.scope
            r.msg_rate = spec.msg_rate
            r.msg_burst = spec.msg_burst
            r.byte_rate = spec.byte_rate
            r.byte_burst = spec.byte_burst
            r.msg_key = spec.msg_key
            r.byte_key = spec.byte_key
            r.limited = 0
            bucket_init(&r.msg_bucket, spec.msg_burst, now)
            bucket_init(&r.byte_bucket, spec.byte_burst, now)
        self.n_rules = len(rules)
        self.store = store

    def __dealloc__(self):
        if self.rules != NULL:
            free(self.rules)
            self.rules = NULL

    def limited(self):
        """Messages limited so far by each rule, in order."""
        return [self.rules[i].limited for i in range(self.n_rules)]

    cdef bytes close_reason(self):
        return b"message rate limit exceeded: " + (<RateRule>self.specs[self.rejected_rule]).name.encode()

    cdef inline double _take(self, MsgRule* rule, bint of_bytes, double now, double cost) noexcept:
        if of_bytes:
            if rule.scope == SCOPE_CONNECTION:
                return bucket_take(&rule.byte_bucket, rule.byte_rate, rule.byte_burst, now, cost)
            return self.store.take(rule.byte_key, rule.byte_rate, rule.byte_burst, now, cost)
        if rule.scope == SCOPE_CONNECTION:
            return bucket_take(&rule.msg_bucket, rule.msg_rate, rule.msg_burst, now, cost)
        return self.store.take(rule.msg_key, rule.msg_rate, rule.msg_burst, now, cost)

    cdef inline bint fast_pass(self, bint first, double size, double now) noexcept:
        """The common case, when every rule is the connection's own: take from every
        bucket in place; if one is short, give back what was taken and let
        judge() decide (it finds the buckets as they were)."""
        cdef MsgRule* rule
        cdef int i
        for i in range(self.n_rules):
            rule = &self.rules[i]
            if first and rule.msg_rate > 0.0:
                if bucket_take(&rule.msg_bucket, rule.msg_rate, rule.msg_burst, now, 1.0) > 0.0:
                    self._give_back(i, first, size, False)
                    return False
            if rule.byte_rate > 0.0:
                if bucket_take(&rule.byte_bucket, rule.byte_rate, rule.byte_burst, now, size) > 0.0:
                    self._give_back(i, first, size, True)
                    return False
        return True

    cdef void _give_back(self, int upto, bint first, double size, bint with_msg) noexcept:
        """Undo the takes of fast_pass: rules before `upto`, and rule `upto`'s message
        token when its byte bucket was the short one."""
        cdef MsgRule* rule
        cdef int i
        for i in range(upto + 1):
            rule = &self.rules[i]
            if first and rule.msg_rate > 0.0 and (i < upto or with_msg):
                rule.msg_bucket.tokens += 1.0
            if rule.byte_rate > 0.0 and i < upto:
                rule.byte_bucket.tokens += size

    cdef void _limited(self, MsgRule* rule, bint no_slot) noexcept:
        rule.limited += 1
        self.counted = True
        if no_slot:
            self.store.note_message_overflow()

    cdef int judge(self, MessageState* msg, uint8_t first_byte, Py_ssize_t size,
                   double now, bint retry) except -1:
        cdef bint first = (first_byte & 0x0F) != 0
        cdef int i = self.resume_rule
        cdef int end = self.n_rules * 2
        cdef MsgRule* rule
        cdef double wait
        cdef bint no_slot
        self.counted = False
        if not first and msg.dropping:
            return DROP
        if first and not retry:
            msg.dropping = False
        self.resume_rule = 0
        while i < end:
            rule = &self.rules[i >> 1]
            wait = 0.0
            if i & 1:
                if rule.byte_rate > 0.0:
                    wait = self._take(rule, True, now, <double>size)
            elif first and rule.msg_rate > 0.0:
                wait = self._take(rule, False, now, 1.0)
            if wait != 0.0:
                no_slot = wait < 0.0        # the store has no room: never a silent pass
                if no_slot:
                    wait = TABLE_FULL_WAIT
                if rule.action == ACTION_DELAY:
                    self.resume_rule = i
                    # At least a microsecond: a rounding-sized wait must still move
                    # the clock the held frame is judged at (see hold_release).
                    self.wait = wait if wait > 1e-6 else 1e-6
                    if first and not retry:
                        self._limited(rule, no_slot)
                    return DELAY
                if rule.action == ACTION_DROP:
                    if first:
                        self._limited(rule, no_slot)
                        msg.dropping = True
                        return DROP
                    # A later frame of a message already let through: it follows its message.
                else:
                    self._limited(rule, no_slot)
                    self.rejected_rule = i >> 1
                    return REJECT
            i += 1
        return PASS
