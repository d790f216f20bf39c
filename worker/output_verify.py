"""Is the returned video what was asked for? A pure check of a copied output against its request.

The container of the stored copy (:func:`worker.contracts.media.read_container`) is compared with the
request: its width/height with the requested aspect ratio, within a relative tolerance, and its
duration with the input's measured duration, within an absolute tolerance. A mismatch is recorded
on the job with the measured numbers (the evidence for a refund request at fal), counted in
``reframe_output_verify_total{result="mismatch"}`` and reported in the event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.contracts.media import ContainerInfo


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: ``ok`` or ``mismatch`` with the reasons and the measured numbers."""

    ok: bool
    reasons: tuple[str, ...] = ()
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> str:
        """``ok`` or ``mismatch`` (the metric label and the record's ``output_verify``)."""
        return "ok" if self.ok else "mismatch"

    def as_record(self) -> dict[str, Any]:
        """The JSON kept on the job (``output_verification``) and sent in the event."""
        return {"result": self.result, "reasons": list(self.reasons), **self.measured}


def ratio_of(aspect_ratio: str) -> float | None:
    """``"16:9"`` -> 1.777…; None when it is not ``W:H`` with positive numbers."""
    num, sep, den = aspect_ratio.partition(":")
    try:
        w, h = float(num), float(den)
    except ValueError:
        return None
    return w / h if sep and w > 0 and h > 0 else None


def verify(
    info: ContainerInfo,
    *,
    aspect_ratio: str,
    input_duration_s: float | None,
    ratio_tolerance: float,
    duration_tolerance_s: float,
) -> Verdict:
    """Check ``info`` against the request; ``input_duration_s`` None skips the duration check."""
    reasons: list[str] = []
    measured: dict[str, Any] = {
        "width": info.width,
        "height": info.height,
        "duration_s": None if info.duration_s is None else round(info.duration_s, 3),
        "codec": info.codec,
        "bytes": info.size_bytes,
        "requested_aspect_ratio": aspect_ratio,
        "input_duration_s": None if input_duration_s is None else round(input_duration_s, 3),
    }
    wanted = ratio_of(aspect_ratio)
    if info.width and info.height:
        got = info.width / info.height
        measured["aspect_ratio"] = round(got, 4)
        if wanted is not None and abs(got - wanted) / wanted > ratio_tolerance:
            reasons.append(f"aspect ratio {info.width}x{info.height} ({got:.4f}) is not {aspect_ratio}")
    else:
        reasons.append("no frame size")
    if input_duration_s is not None:
        if info.duration_s is None:
            reasons.append("no duration")
        elif abs(info.duration_s - input_duration_s) > duration_tolerance_s:
            reasons.append(f"duration {info.duration_s:.3f} s is not the input's {input_duration_s:.3f} s")
    return Verdict(ok=not reasons, reasons=tuple(reasons), measured=measured)
