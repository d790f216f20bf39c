"""Run a real Prometheus server for tests: scrape given targets, load rule files, query it.

Used by the live observability tests (every dashboard query and alert expression must evaluate in
a real Prometheus, not just parse) and by end-to-end tests against a local cluster. The binary is
Debian's ``prometheus`` (``scripts/ensure-prometheus`` installs it); version 2.42, so keep PromQL
to what it supports.

    server = start_prometheus(workdir, ["127.0.0.1:17300"], [Path("observability/prometheus/rules.yml")],
                              labels={"namespace": "test"})
    try:
        server.wait_targets_up(timeout_s=30)
        server.query("sum(reframe_queue_depth)")
    finally:
        server.stop()

Each server runs on a free loopback port with its own TSDB directory under ``workdir``, in its own
process group (see :mod:`reframe.localproc`), and is stopped by :meth:`PrometheusServer.stop`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reframe.localproc import ManagedProcess, free_port, spawn, wait_until

JOB_NAME = "reframe"


class PrometheusError(RuntimeError):
    """Prometheus answered with an error (bad query, not ready) or could not be reached."""


def prometheus_binary() -> str:
    """The ``prometheus`` executable on PATH."""
    path = shutil.which("prometheus")
    if path is None:
        raise FileNotFoundError(
            "prometheus is not installed: run scripts/ensure-prometheus (Debian package 'prometheus')"
        )
    return path


def _fmt_duration(seconds: float) -> str:
    """A Prometheus duration string (integer milliseconds are exact)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def render_config(
    targets: Sequence[str],
    rule_files: Sequence[Path],
    *,
    scrape_interval_s: float = 1.0,
    labels: Mapping[str, str] | None = None,
) -> str:
    """The prometheus.yml text: one job scraping ``targets`` with ``labels``, rules evaluated as often.

    JSON is valid YAML, so the config is written with :mod:`json` and needs no YAML library.
    """
    interval = _fmt_duration(scrape_interval_s)
    static: dict[str, Any] = {"targets": list(targets)}
    if labels:
        static["labels"] = dict(labels)
    config = {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            # A scrape slower than the interval is cut off; our endpoints answer in milliseconds.
            "scrape_timeout": interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [{"job_name": JOB_NAME, "static_configs": [static]}],
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass
class PrometheusServer:
    """A running Prometheus on ``127.0.0.1:port``."""

    port: int
    workdir: Path
    process: ManagedProcess
    targets: list[str]

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    # --- HTTP API ---------------------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, str] | None = None, *, timeout_s: float = 10.0) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - http://127.0.0.1 only
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            # Prometheus answers 400/422 with a JSON body naming the problem.
            try:
                body = json.loads(err.read())
            except ValueError:
                raise PrometheusError(f"GET {path}: HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            raise PrometheusError(f"GET {path}: {err}") from None
        if body.get("status") != "success":
            raise PrometheusError(
                f"GET {path} {dict(params or {})}: {body.get('errorType')}: {body.get('error')}"
            )
        return body.get("data")

    def ready(self) -> bool:
        """True once ``/-/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:  # noqa: S310 - loopback
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expr: str, *, time_s: float | None = None) -> dict[str, Any]:
        """Evaluate ``expr`` now (or at ``time_s``); returns the API's ``data`` (resultType, result).

        Raises :class:`PrometheusError` when Prometheus rejects the expression.
        """
        params = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        data: dict[str, Any] = self._get("/api/v1/query", params)
        return data

    def query_range(self, expr: str, *, start_s: float, end_s: float, step_s: float) -> dict[str, Any]:
        """``/api/v1/query_range`` data (``resultType`` matrix) of ``expr`` over [start_s, end_s]."""
        params = {"query": expr, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": f"{step_s:g}"}
        data: dict[str, Any] = self._get("/api/v1/query_range", params)
        return data

    def values(self, expr: str) -> list[float]:
        """The sample values of an instant vector/scalar query (empty when no series)."""
        data = self.query(expr)
        if data["resultType"] == "vector":
            return [float(item["value"][1]) for item in data["result"]]
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        raise PrometheusError(f"{expr}: unexpected result type {data['resultType']}")

    def targets_status(self) -> list[dict[str, Any]]:
        """The active targets (``scrapeUrl``, ``health``, ``lastError``, labels)."""
        data = self._get("/api/v1/targets", {"state": "active"})
        return list(data.get("activeTargets", []))

    def wait_targets_up(self, timeout_s: float = 30.0) -> None:
        """Wait until every configured target was scraped successfully.

        The target list is empty for a few seconds after start (docs/tooling-notes.md §5), so this polls.
        Raises ``TimeoutError`` naming the targets that are not up and their last errors.
        """

        def all_up() -> bool:
            active = self.targets_status()
            return len(active) == len(self.targets) and all(t.get("health") == "up" for t in active)

        try:
            wait_until(all_up, timeout_s=timeout_s, interval_s=0.25, what="Prometheus targets up")
        except TimeoutError:
            try:
                detail = [
                    (t.get("scrapeUrl"), t.get("health"), t.get("lastError")) for t in self.targets_status()
                ]
            except PrometheusError as err:
                detail = [("?", "unknown", str(err))]
            raise TimeoutError(
                f"Prometheus targets {self.targets} not up after {timeout_s:.0f}s; "
                f"active targets: {detail or 'none yet (discovery takes a few seconds)'}"
            ) from None

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule (``name``, ``query``, ``health``, ``lastError``, ``state``), flattened."""
        data = self._get("/api/v1/rules")
        return [rule for group in data.get("groups", []) for rule in group.get("rules", [])]

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        data = self._get("/api/v1/alerts")
        return list(data.get("alerts", []))

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and leave its files in ``workdir``."""
        self.process.stop(timeout_s=10)


def start_prometheus(
    workdir: Path,
    targets: list[str],
    rule_files: list[Path],
    scrape_interval_s: float = 1.0,
    *,
    labels: Mapping[str, str] | None = None,
    ready_timeout_s: float = 30.0,
) -> PrometheusServer:
    """Start Prometheus on a free loopback port scraping ``targets`` (``host:port``) with ``rule_files``.

    ``labels`` are added to every scraped series (e.g. ``{"namespace": "test"}``, which the dashboard
    and alert queries filter on). Waits until the server is ready; raises ``RuntimeError`` with the
    log tail if it exits or does not become ready.
    """
    binary = prometheus_binary()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config_path = workdir / f"prometheus-{port}.yml"
    config_path.write_text(
        render_config(targets, rule_files, scrape_interval_s=scrape_interval_s, labels=labels)
    )
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / f'prometheus-data-{port}'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
    process = spawn(f"prometheus-{port}", argv, log_dir=workdir)
    server = PrometheusServer(port=port, workdir=workdir, process=process, targets=list(targets))

    def ready_or_dead() -> bool:
        # Stop waiting as soon as the process exits (bad config): no point in the full timeout.
        return not process.alive() or server.ready()

    with contextlib.suppress(TimeoutError):  # reported below with the log tail
        wait_until(
            ready_or_dead, timeout_s=ready_timeout_s, interval_s=0.1, what=f"Prometheus on port {port}"
        )
    if not process.alive() or not server.ready():
        tail = process.log_tail()
        process.stop(timeout_s=5)
        raise RuntimeError(f"Prometheus did not start (config {config_path}):\n{tail}")
    return server
