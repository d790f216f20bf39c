"""Quotes (worker/contracts/quotes.py, Producer.quote) against a real redis-server, clips made by
reframe/demo.py and a loopback HTTP server read through the guarded fetcher; enqueue-time refusals
of inputs over the model's limits (REFRAME_ENQUEUE_PROBE_INPUT)."""

from __future__ import annotations

import base64
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from config import Settings
from producer import InvalidRequest, Producer
from reframe.demo import make_sample_video
from tests.security.conftest import RecordingServer, make_server
from worker.contracts.quotes import (
    Budgets,
    Headroom,
    MediaInfo,
    ModelLimits,
    Pricing,
    build_quote,
    read_budgets,
)
from worker.flow.budget import Budget

__all__ = ["make_server"]

LOOPBACK = "127.0.0.1/32"  # the test server's address, allowed for fetches like a local cluster does


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2.5 s 320x180 clip without audio."""
    return make_sample_video(
        tmp_path_factory.mktemp("quote-media") / "clip.mp4", duration_s=2.5, size="320x180", audio=False
    )


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 31 s clip: one second over the model's 30 s."""
    return make_sample_video(
        tmp_path_factory.mktemp("quote-long") / "long.mp4", duration_s=31, size="64x36", audio=False
    )


def no_room() -> Headroom:
    return Headroom(day_cap=None, day_used=0, month_cap=None, month_used=0)


def budgets(cluster: Headroom | None = None, tenant: Headroom | None = None) -> Budgets:
    big = Headroom(day_cap=100_000_000, day_used=0, month_cap=1_000_000_000, month_used=0)
    return Budgets(cluster=cluster or big, tenant=tenant or no_room(), day="2026-01-01", month="2026-01")


# ------------------------------------------------------------------------------ pricing
@pytest.mark.parametrize("price", [0.06, 0.05, 0.1, 0.0, 1.23456789, 0.0000015])
@pytest.mark.parametrize("unit_s", [1.0, 0.5, 0.0, 2.0])
def test_pricing_is_the_budgets_estimate_exactly(price: float, unit_s: float) -> None:
    # The producer may not import worker.flow, so the rule is restated; it must never drift.
    budget = Budget(
        redis.Redis(),
        prefix="{q}",
        daily_cap_usd=1,
        monthly_cap_usd=1,
        price_per_s_usd=price,
        billing_unit_s=unit_s,
    )
    pricing = Pricing.from_settings(Settings.model_construct(price_per_s_usd=price, billing_unit_s=unit_s))
    for step in range(0, 3100, 7):
        duration = step / 100
        for d in (duration, duration + 1e-7, duration + 0.000001, math.nextafter(duration, 99)):
            assert pricing.micro(d) == budget.estimate_micro(d), (price, unit_s, d)


def test_model_limits_name_their_settings() -> None:
    limits = ModelLimits(max_duration_s=30, max_input_bytes=1000)
    assert limits.problems(MediaInfo(duration_s=30.0, size_bytes=1000)) == []
    assert limits.problems(MediaInfo(duration_s=None, size_bytes=None)) == []
    found = limits.problems(MediaInfo(duration_s=31.0, size_bytes=1001))
    assert found == [
        "is 1001 bytes; the model's limit REFRAME_MAX_UPLOAD_BYTES allows 1000",
        "lasts 31.0s; the model's limit REFRAME_MAX_VIDEO_DURATION_S allows 30s",
    ]


def test_the_price_is_the_settled_cost_and_the_reservation_has_the_margin(
    make_settings: Callable[..., Settings],
) -> None:
    s = make_settings()
    q = build_quote(
        MediaInfo(duration_s=2.5, size_bytes=10, width=320, height=180),
        s,
        budgets(),
        tenant="t",
        source="url",
    )
    assert (q.billed_s, q.price_micro, q.price_usd) == (3.0, 180_000, 0.18)  # ceil(2.5 s) at $0.06
    assert (q.billable_s, q.estimate_micro) == (3.0, 180_000)  # 2.5 + 0.5 margin, still 3 s
    assert q.fits_model_limits is True and q.fits_budget_now is True and q.would_accept is True
    assert q.reasons == []
    q = build_quote(MediaInfo(duration_s=3.0, size_bytes=10), s, budgets(), tenant="t", source="url")
    assert (q.billed_s, q.price_micro) == (3.0, 180_000)
    assert (q.billable_s, q.estimate_micro) == (4.0, 240_000)  # the hold is larger than the price


def test_unknowns_and_refusals_are_explained(make_settings: Callable[..., Settings]) -> None:
    s = make_settings()
    q = build_quote(MediaInfo(size_bytes=10), s, budgets(), tenant="t", source="url")
    assert q.price_micro is None and q.estimate_micro is None and q.would_accept is False
    assert q.fits_model_limits is None
    assert any("REFRAME_UNKNOWN_DURATION_POLICY=refuse" in r for r in q.reasons)
    reserve_max = make_settings(unknown_duration_policy="reserve_max")
    q = build_quote(MediaInfo(size_bytes=10), reserve_max, budgets(), tenant="t", source="url")
    assert q.price_micro is None and q.estimate_micro == 30 * 60_000 and q.would_accept is True
    q = build_quote(MediaInfo(duration_s=31.0, size_bytes=10), s, budgets(), tenant="t", source="url")
    assert q.fits_model_limits is False and q.would_accept is False
    assert "video_url lasts 31.0s; the model's limit REFRAME_MAX_VIDEO_DURATION_S allows 30s" in q.reasons
    tight = Headroom(day_cap=200_000, day_used=100_000, month_cap=None, month_used=0)
    q = build_quote(
        MediaInfo(duration_s=2.0, size_bytes=10), s, budgets(tenant=tight), tenant="t", source="url"
    )
    assert q.fits_budget_now is False and q.would_accept is False
    assert q.budget.tenant_day_headroom_usd == 0.1 and q.budget.tenant_month_headroom_usd is None
    assert "over tenant t's day budget now: the job would wait BLOCKED" in q.reasons
    broke = Headroom(day_cap=1_000_000, day_used=0, month_cap=100, month_used=0)
    q = build_quote(
        MediaInfo(duration_s=2.0, size_bytes=10), s, budgets(cluster=broke), tenant="t", source="url"
    )
    assert q.fits_budget_now is False
    assert "over the cluster's month budget now: the job would wait BLOCKED" in q.reasons


# ------------------------------------------------------------------------------ budgets in Redis
def redis_periods(r: redis.Redis) -> tuple[str, str]:
    seconds, _ = r.time()
    t = time.gmtime(int(seconds))
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", f"{t.tm_year:04d}-{t.tm_mon:02d}"


def test_read_budgets_reads_the_period_hashes_and_tenant_caps(
    rclient: redis.Redis, make_settings: Callable[..., Settings]
) -> None:
    s = make_settings(budget_daily_usd=10, budget_monthly_usd=100)
    empty = read_budgets(rclient, prefix="reframe", settings=s, tenant="acme")
    assert empty.cluster == Headroom(10_000_000, 0, 100_000_000, 0)
    assert empty.tenant == Headroom(None, 0, None, 0)  # no hashes, no caps: unlimited, nothing used
    day, month = redis_periods(rclient)
    rclient.hset(f"{{reframe}}:fc:budget:day:{day}", mapping={"spent": 1_000_000, "reserved": 500_000})
    rclient.hset(f"{{reframe}}:fc:budget:month:{month}", mapping={"spent": 7_000_000})
    rclient.hset(f"{{reframe}}:fc:budget:tenant:acme:day:{day}", mapping={"reserved": 120_000})
    rclient.hset(f"{{reframe}}:fc:budget:tenant:acme:month:{month}", mapping={"spent": 2_000_000})
    rclient.hset(
        "{reframe}:tenant:acme:limits", mapping={"daily_budget_usd": "0.5", "monthly_budget_usd": "3"}
    )
    rclient.hset("{reframe}:tenant:other:limits", mapping={"daily_budget_usd": "lots"})
    found = read_budgets(rclient, prefix="reframe", settings=s, tenant="acme")
    assert (found.day, found.month) == (day, month)
    assert found.cluster.room() == (8_500_000, 93_000_000)
    assert found.tenant.room() == (380_000, 1_000_000)
    other = read_budgets(rclient, prefix="reframe", settings=s, tenant="other")
    assert other.tenant.cap_unreadable == "daily_budget_usd" and other.tenant.room() == (None, None)
    q = build_quote(MediaInfo(duration_s=1.0, size_bytes=1), s, other, tenant="other", source="url")
    assert q.fits_budget_now is None and q.would_accept is False
    assert "tenant other's daily_budget_usd is not a number >= 0" in q.reasons


# ------------------------------------------------------------------------------ Producer.quote
def test_quote_of_a_local_file_reads_it_here(
    clip: Path, make_settings: Callable[..., Settings], rclient: redis.Redis
) -> None:
    with Producer(make_settings()) as p:
        q = p.quote(clip, tenant="acme")
    assert q.source == "file"
    assert q.duration_s == pytest.approx(2.5, abs=0.05)
    assert q.size_bytes == clip.stat().st_size
    assert (q.width, q.height) == (320, 180)
    assert (q.billed_s, q.price_micro) == (3.0, 180_000)
    assert q.budget.tenant == "acme" and q.would_accept is True
    assert rclient.dbsize() == 0  # a quote writes nothing


def test_quote_of_a_url_goes_through_the_guarded_fetcher(
    clip: Path,
    make_settings: Callable[..., Settings],
    make_server: Callable[..., RecordingServer],
) -> None:
    server = make_server()
    server.serve_bytes("/clip.mp4", clip.read_bytes())
    url = f"{server.base}/clip.mp4"
    with Producer(make_settings(fetch_allow=LOOPBACK)) as p:
        q = p.quote(url)
        by_request = p.quote({"video_url": url, "aspect_ratio": "9:16"})
    assert q.source == "url" and q.size_bytes == clip.stat().st_size and (q.width, q.height) == (320, 180)
    assert q.price_micro == 180_000 and q == by_request and q.budget.tenant == "default"
    assert all(s.headers.get("Range", "").startswith("bytes=") for s in server.seen)  # Range reads only
    with Producer(make_settings()) as strict, pytest.raises(InvalidRequest) as refused:
        strict.quote(url)  # loopback is refused unless allowed
    assert refused.value.errors[0][0] == "video_url"


def test_quote_of_a_data_uri(clip: Path, make_settings: Callable[..., Settings]) -> None:
    uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    with Producer(make_settings()) as p:
        q = p.quote(uri)
    assert q.source == "data" and q.size_bytes == clip.stat().st_size and q.price_micro == 180_000


def test_quote_refuses_bad_arguments(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    (tmp_path / "text.mp4").write_text("not a video\n")
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases: list[tuple[Any, dict[str, Any], str]] = [
        ("ftp://x.test/a.mp4", {}, "video_url"),
        ("http://169.254.169.254/latest/meta-data", {}, "video_url"),
        ({"video_url": "https://x.test/a.mp4", "aspect_ratio": "2:1"}, {}, "aspect_ratio"),
        (42, {}, "input"),
        ("https://x.test/a.mp4", {"tenant": "Bad Tenant"}, "tenant"),
        (
            tmp_path / "text.mp4",
            {},
            "video_url: '" + str(tmp_path / "text.mp4") + "' is not a readable video",
        ),
        (tmp_path / "empty.mp4", {}, "is empty"),
        (tmp_path / "missing.mp4", {}, "is neither a URL nor an existing file"),
        (tmp_path, {}, "is neither a URL nor an existing file"),
    ]
    with Producer(make_settings()) as p:
        for arg, kwargs, expect in cases:
            with pytest.raises(InvalidRequest) as info:
                p.quote(arg, **kwargs)
            assert expect in str(info.value), (arg, str(info.value))


def test_oversized_url_is_known_from_the_first_range_answer(
    clip: Path, make_settings: Callable[..., Settings], make_server: Callable[..., RecordingServer]
) -> None:
    """A 200 MB file: its size comes from Content-Range; nothing past the probe's limit is read."""
    head = clip.read_bytes()
    total = 200_000_000

    def huge(h: Any) -> None:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
        assert match is not None
        start, end = int(match.group(1)), min(int(match.group(2)), total - 1)
        body = (head + b"\0" * (end + 1))[start : end + 1]
        h.reply(206, body, {"Content-Type": "video/mp4", "Content-Range": f"bytes {start}-{end}/{total}"})

    server = make_server()
    server.route("/huge.mp4", huge)
    with Producer(make_settings(fetch_allow=LOOPBACK)) as p:
        q = p.quote(f"{server.base}/huge.mp4")
    assert q.size_bytes == total and q.fits_model_limits is False and q.would_accept is False
    assert (
        f"video_url is {total} bytes; the model's limit REFRAME_MAX_UPLOAD_BYTES allows 104857600"
        in q.reasons
    )


# ------------------------------------------------------------------------------ enqueue-time refusal
def test_enqueue_probe_refuses_inputs_over_the_limits_and_writes_nothing(
    clip: Path,
    long_clip: Path,
    make_settings: Callable[..., Settings],
    make_server: Callable[..., RecordingServer],
    rclient: redis.Redis,
) -> None:
    server = make_server()
    server.serve_bytes("/long.mp4", long_clip.read_bytes())
    server.serve_bytes("/clip.mp4", clip.read_bytes())
    long_url, ok_url = f"{server.base}/long.mp4", f"{server.base}/clip.mp4"
    on = make_settings(fetch_allow=LOOPBACK, enqueue_probe_input=True)
    with Producer(on) as p:
        with pytest.raises(InvalidRequest) as info:
            p.enqueue({"video_url": long_url, "aspect_ratio": "9:16"})
        assert info.value.errors == [
            (
                "video_url",
                "the video lasts 31.0s; the model's limit REFRAME_MAX_VIDEO_DURATION_S allows 30s; "
                "nothing was enqueued",
            )
        ]
        with pytest.raises(InvalidRequest) as batch:
            p.enqueue_many(
                [{"video_url": ok_url, "aspect_ratio": "1:1"}, {"video_url": long_url, "aspect_ratio": "1:1"}]
            )
        assert [field for field, _ in batch.value.errors] == ["items[1].video_url"]
        assert rclient.dbsize() == 0  # all or nothing: the good item was not written either
        job_id = p.enqueue({"video_url": ok_url, "aspect_ratio": "9:16"})
        assert p.get(job_id) is not None
    small = make_settings(fetch_allow=LOOPBACK, enqueue_probe_input=True, max_upload_bytes=1000)
    with Producer(small) as p, pytest.raises(InvalidRequest) as large:
        p.enqueue({"video_url": ok_url, "aspect_ratio": "9:16"})
    assert "REFRAME_MAX_UPLOAD_BYTES allows 1000" in str(large.value)
    # Off (the default): no fetch at enqueue; the submitter refuses it before any fal call instead.
    seen = len(server.seen)
    with Producer(make_settings(fetch_allow=LOOPBACK)) as p:
        p.enqueue({"video_url": long_url, "aspect_ratio": "9:16"})
    assert len(server.seen) == seen


def test_unreadable_input_is_left_to_the_submitter(
    make_settings: Callable[..., Settings], make_server: Callable[..., RecordingServer]
) -> None:
    server = make_server()
    server.serve_bytes("/junk.mp4", b"not a video" * 100)
    with Producer(make_settings(fetch_allow=LOOPBACK, enqueue_probe_input=True)) as p:
        assert p.enqueue({"video_url": f"{server.base}/junk.mp4", "aspect_ratio": "9:16"})
