"""fastgw: a WebSocket API gateway with a Cython core."""

__version__ = "0.1.0"
