"""Retransmission timers derived from the measured round-trip time (RFC 6298's estimator).

A fixed timer is wrong in both directions: on this testbed a round trip is ~0.1-0.3 ms, so
a 5 ms timer makes every lost packet cost 20x a round trip; on a loaded machine or a real
network a round trip can exceed a tight fixed timer, and every packet is sent twice. The
collectives therefore keep SRTT and RTTVAR from their own samples (Karn's rule: never from
a retransmitted packet) and time out after SRTT + 4 RTTVAR, clamped to [min_s, max_s].

Back-off: the first ``linear`` expiries without progress keep the RTO (like Linux's
linear timeouts for thin streams: a short message that lost its last packet at random
must not wait 1 + 2 + 4 ms for its third try); later ones double it, up to max_s, for a
peer that is away. The clamps: ``min_s`` (0.5 ms by default) keeps scheduling noise of a
busy host from firing rounds for nothing; ``max_s`` bounds the back-off so that a lossy
but live path still gets a retry many times a second (the cost of one round is at most a
window of packets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_RTO_S = 0.0005
MAX_RTO_S = 0.05
INITIAL_RTO_S = 0.005  # before the first sample (RFC 6298 says 1 s for the Internet)


@dataclass
class RetransmitTimer:
    """SRTT/RTTVAR from samples, the RTO from them, and exponential back-off."""

    initial_s: float = INITIAL_RTO_S
    min_s: float = MIN_RTO_S
    max_s: float = MAX_RTO_S
    linear: int = 2  # expiries before the back-off starts doubling
    srtt_s: float | None = field(default=None, init=False)
    rttvar_s: float = field(default=0.0, init=False)
    backoffs: int = field(default=0, init=False)
    samples: int = field(default=0, init=False)

    def sample(self, rtt_s: float) -> None:
        """One round-trip measurement of a packet sent once (Karn's rule: the caller
        never passes a sample for a retransmitted packet)."""
        if rtt_s < 0:
            return
        if self.srtt_s is None:
            self.srtt_s, self.rttvar_s = rtt_s, rtt_s / 2
        else:
            self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - rtt_s)
            self.srtt_s = 0.875 * self.srtt_s + 0.125 * rtt_s
        self.samples += 1

    @property
    def rto_s(self) -> float:
        """The timeout without back-off."""
        if self.srtt_s is None:
            base = self.initial_s
        else:
            base = self.srtt_s + 4 * self.rttvar_s
        return min(self.max_s, max(self.min_s, base))

    @property
    def current_s(self) -> float:
        """The timeout to arm now: the RTO doubled per expiry since the last progress."""
        doublings = max(0, min(self.backoffs - self.linear, 16))
        return min(self.max_s, self.rto_s * (2 ** doublings))

    def expired(self) -> None:
        self.backoffs += 1

    def progress(self) -> None:
        self.backoffs = 0

    def as_dict(self) -> dict:
        """For stats: what the timer measured (ms)."""
        return {"srtt_ms": None if self.srtt_s is None else round(self.srtt_s * 1e3, 4),
                "rttvar_ms": round(self.rttvar_s * 1e3, 4), "rto_ms": round(self.rto_s * 1e3, 4),
                "rtt_samples": self.samples}
