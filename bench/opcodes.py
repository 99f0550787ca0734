"""Counting the Python bytecodes a measured loop executes (both benchmarks' ``--bytecodes``).

Deterministic, unlike time: on the same interpreter wall time follows the bytecodes a path
executes more closely than its machine instructions (an auth path's extra code is
bytecode-dense). Work done in C (a digest, SQLite, a signature check) is not counted.
"""

from __future__ import annotations

import sys
from typing import Any


class OpcodeCounter:
    """Pass :meth:`marker` as a measured loop's marker: its first call starts counting the
    ``sys.settrace`` opcode events of every frame entered from then on (in this thread), its
    second call stops. :attr:`count` is the total; the caller resets it."""

    def __init__(self) -> None:
        self.count = 0

    def _on_opcode(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.count += 1
        return self._on_opcode

    def _on_call(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_lines = False
        frame.f_trace_opcodes = True
        return self._on_opcode

    def marker(self) -> None:
        sys.settrace(self._on_call if sys.gettrace() is None else None)
