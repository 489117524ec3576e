"""The runtime's defaults, in one place: the aggregator, ``nonn deploy`` and the config's ``deploy``
section all read them (standard library only, so ``nonn serve`` stays torch-free)."""
from __future__ import annotations

DEADLINE_MS = 50.0   # the aggregator answers with the devices in by then
WINDOW = 8           # requests in flight in deploy's throughput phase
DRILL_IMAGES = 600   # images streamed in deploy's fault drill (0: no drill)
DRILL_DEVICE = 0     # the device the drill kills
MAX_ROWS = 256       # rows (images) one runtime message may carry; the broker's size cap follows from it


def exchange_wait_ms(deadline_ms: float, exchanges: int) -> float:
    """How long a device waits for a peer's mid-network message: a staged device that loses its peer must
    still reach the aggregator within ``deadline_ms`` after waiting at each of its exchanges, so each wait
    takes an equal share of half the deadline."""
    return deadline_ms / (2 * max(1, exchanges))
