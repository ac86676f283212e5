"""Gateway nodes sharing their limits through Redis (leased shares): the store and the protocol."""
