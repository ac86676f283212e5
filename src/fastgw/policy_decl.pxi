# Declarations of the message policies: what a flow (the messages one leg
# receives) is judged by, message by message. Included by _core.pxd (after
# limits_decl.pxi); defined in policy.pxi.
#
# The interface is MessagePolicy.judge(msg, first_byte, size, now, retry),
# called for each data frame of the flow (a message's first frame: opcode !=
# 0; its last: FIN in first_byte) with the message's state (its size so far
# included), the time (monotonic seconds, the relay's clock) and whether the
# same frame is judged again after a DELAY. It returns a Verdict:
#
#   PASS    relay the frame
#   REJECT  end the connection (the policy's close code and reason)
#   DELAY   hold the frame, and what follows it, `wait` seconds (hold.pxi),
#           then judge it again with retry set
#   DROP    discard the frame (a message dropped at its first frame is
#           dropped whole: its later frames are DROP too)
#
# Pingora's body filter, returning an optional delay, is the shape. Two
# policies exist: SizeLimit (message-size-limit and the upgrade's
# max-message-size), judged as a frame arrives, and RateLimit (every
# message-rate-limit of the flow), judged when the frame's turn comes (after
# the frames held before it). A policy that needs the whole message (JSON
# validation: buffer, unmask, judge) is a further MessagePolicy judged after
# RateLimit in Leg._judge: it answers DELAY until the message's last frame
# has arrived (its frames wait in the hold queue, where it can read them),
# then PASS, REJECT or DROP for the whole message.

from libc.stdint cimport uint8_t, uint64_t


cpdef enum Verdict:
    PASS = 0
    REJECT = 1
    DELAY = 2
    DROP = 3


cpdef enum Action:              # what a rate limit does to a message over it
    ACTION_REJECT = 0
    ACTION_DELAY = 1
    ACTION_DROP = 2


cpdef enum Scope:               # whose bucket a rate limit takes from
    SCOPE_CONNECTION = 0        # the connection's own (in the RateLimit)
    SCOPE_CLIENT = 1            # the client's, in the LimitStore (key per client)
    SCOPE_API = 2               # the API's, in the LimitStore


cdef struct MessageState:
    # The data message a leg is receiving.
    bint in_message             # inside a fragmented message
    bint dropping               # the message being received is dropped
    uint64_t size               # bytes of the current message so far


cdef struct MsgRule:
    # One message-rate-limit of a flow, with the values of the connection's plan.
    uint8_t action              # Action
    uint8_t scope               # Scope
    double msg_rate             # messages per second; 0: no message limit
    double msg_burst
    double byte_rate            # bytes per second; 0: no byte limit
    double byte_burst
    uint64_t msg_key            # LimitStore keys for scope client / api
    uint64_t byte_key
    BucketState msg_bucket      # buckets for scope connection
    BucketState byte_bucket
    uint64_t limited            # messages this rule rejected, delayed or dropped


cdef class RateRule:
    # The spec of one message-rate-limit for one connection (policies.py
    # builds it from the configuration and the client's plan).
    cdef:
        readonly str name
        readonly Action action
        readonly Scope scope
        readonly double msg_rate, msg_burst, byte_rate, byte_burst
        readonly uint64_t msg_key, byte_key


cdef class MessagePolicy:
    cdef:
        readonly double wait    # after DELAY: seconds to hold (> 0)
        bint counted            # the last verdict limited a new message (count it once)
    cdef int judge(self, MessageState* msg, uint8_t first_byte, Py_ssize_t size,
                   double now, bint retry) except -1
    # After REJECT: the close reason (the client gets 1008 with it, the backend 1001).
    cdef bytes close_reason(self)


@cython.final
cdef class SizeLimit(MessagePolicy):
    cdef readonly uint64_t max  # bytes of a message; larger ones end the connection (1009)


@cython.final
cdef class RateLimit(MessagePolicy):
    cdef:
        MsgRule* rules
        int n_rules
        int resume_rule         # where a delayed message resumes its checks
        int rejected_rule       # the rule of the last REJECT
        readonly bint all_local # every rule is scope connection (fast_pass applies)
        LimitStore store        # for scope client / api, or None
        list specs              # the RateRules (their names for close reasons; often shared)
    cdef inline bint fast_pass(self, bint first, double size, double now) noexcept
    cdef void _give_back(self, int upto, bint first, double size, bint with_msg) noexcept
    cdef inline double _take(self, MsgRule* rule, bint of_bytes, double now, double cost) noexcept
    cdef void _limited(self, MsgRule* rule, bint no_slot) noexcept
