"""The state handle: what the middle layer may read of a session's model state.

Sessions (memoryd/sessions/) hold each session's state only to hand it back to the engine in the
next work item; the model's tensors are the worker's alone (memoryd/engine/worker.py). These four
members are everything sessions and residency read of it, and the model's `StreamState` has them
(tests/test_engine.py checks). Plain typing, no torch: the middle layer imports this, not the model.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class StateHandle(Protocol):
    """A session's model state, as the session layer sees it."""

    @property
    def position(self) -> int:
        """Tokens the state has read: the session's offset (checked against the head's after a load)."""
        ...

    @property
    def steps(self) -> int:
        """TTT steps taken (mini-batches completed): when the next periodic snapshot is due."""
        ...

    @property
    def pending_count(self) -> int:
        """Tokens read since the last step (reported by get/append; they step with the next mini-batch)."""
        ...

    def nbytes(self) -> int:
        """Device bytes the state holds: residency's byte budget counts them."""
        ...
