"""`cython -a` on the core's frame path: no line of the per-frame code touches
Python (score 0), except a function's entry (its error bookkeeping) and the
statements of the error and fallback paths named below."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "fastgw"

# Per file, the functions run per frame or per read (header prefixes).
FRAME_PATH = {
    "frame.pxi": ["cdef inline int frame_header(", "cdef inline bint close_code_valid(",
                  "cdef inline void mask_copy(", "cdef inline uint32_t mask_key(",
                  "cdef inline Py_ssize_t frame_encode(", "cdef inline Py_ssize_t close_payload("],
    "leg.pxi": ["cdef int _received(", "cdef Py_ssize_t _parse(", "cdef inline int _on_frame(",
                "cdef inline bint _accept_data(", "cdef inline int forward(", "cdef int flush(",
                "cdef int _write(", "cdef int _end_of_read(", "cdef int _clock(",
                "cdef inline int _judge(", "cdef int queue_frame("],
    "policy.pxi": ["cdef inline bint fast_pass(", "cdef void _give_back(", "cdef inline double _take("],
    "limits.pxi": ["cdef double bucket_take("],
}
# Statements that may touch Python: protocol errors and too-big frames (the connection
# ends), the transport's own write when a send() did not take everything, a clock
# that is not the real one (tests).
ALLOWED = ("self.fail(", "self._protocol_error(", "message too big\")", "self.transport.close()",
           "self.transport.write(", "self.relay.clock.now()")


def annotate(tmp_path: Path) -> dict[str, dict[int, tuple[int, str]]]:
    for f in list(SRC.glob("*.pyx")) + list(SRC.glob("*.pxd")) + list(SRC.glob("*.pxi")):
        shutil.copy(f, tmp_path / f.name)
    res = subprocess.run(
        [sys.executable, "-m", "cython", "-a", "-3", "-X", "boundscheck=False",
         "-X", "wraparound=False", "-X", "cdivision=True", "-X", "initializedcheck=False",
         "_core.pyx"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = {}
    for name in FRAME_PATH:
        page = (tmp_path / name.replace(".pxi", ".html")).read_text()
        lines = {}
        for m in re.finditer(r'<pre class="cython line score-(\d+)"[^>]*>(.*?)</pre>', page, re.S):
            text = html.unescape(re.sub(r"<[^>]+>", "", m.group(2)))
            num, _, code = text.partition(":")
            lines[int(num.strip("+ "))] = (int(m.group(1)), code)
        out[name] = lines
    return out


def statements(source: list[str], header: str) -> list[tuple[list[int], str]]:
    """The body of the function starting with header: (line numbers, text) per statement,
    a statement's continuation lines (open brackets) joined; the signature left out."""
    start = next(i for i, s in enumerate(source, 1) if s.strip().startswith(header))
    indent = len(source[start - 1]) - len(source[start - 1].lstrip())
    i = start
    while not source[i - 1].rstrip().endswith(":"):      # a signature on several lines
        i += 1
    out, cur, depth = [], None, 0
    for n in range(i + 1, len(source) + 1):
        s = source[n - 1]
        if s.strip() and len(s) - len(s.lstrip()) <= indent:
            break
        if cur is None:
            cur = ([], "")
        cur[0].append(n)
        cur = (cur[0], cur[1] + " " + s.strip())
        depth += s.count("(") - s.count(")")
        if depth <= 0:
            out.append(cur)
            cur, depth = None, 0
    return out


def test_the_frame_path_is_pure_c(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("no compiler")
    pytest.importorskip("Cython")
    scores = annotate(tmp_path)
    checked = 0
    for name, headers in FRAME_PATH.items():
        source = (SRC / name).read_text().splitlines()
        for header in headers:
            for numbers, text in statements(source, header):
                if any(a in text for a in ALLOWED):
                    continue
                for n in numbers:
                    score, code = scores[name].get(n, (0, ""))
                    assert score == 0, f"{name}:{n} touches Python: {code.strip()}"
                    checked += 1
    assert checked > 200
