"""Alerts and where they go: the console, TensorBoard, `alerts.jsonl` in the stage folder, a webhook.

An alert is a record of something a stability check saw (a loss spike, a NaN gradient, a jump at
an epoch boundary). Delivering it never stops training: a webhook that fails is logged and skipped.
Webhook posts go out from a background thread, in order, so a slow or dead endpoint does not hold
up the training step; the end of a stage waits a few seconds for those still queued.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from stages.tb_logger import text_writers

log = logging.getLogger(__name__)


def gather_findings(trainer, found: bool, finding) -> list[tuple[int, object]]:
    """(rank, finding) of every rank that found something, [] when none did: a rank's batches and losses can
    spike where rank 0's do not. One collective when no rank found anything, a second to gather the findings
    when some rank did. Every rank must call it at the same step."""
    if not trainer.strategy.reduce_boolean_decision(found, all=False):
        return []
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [(trainer.global_rank, finding)]
    gathered: list = [None] * trainer.world_size
    dist.all_gather_object(gathered, (found, finding))
    return [(rank, finding) for rank, (found, finding) in enumerate(gathered) if found]


@dataclass
class Alert:
    stage: str
    step: int
    """Index (from 0) of the stage's optimizer step that raised it: the step judged, or for a boundary check
    the k-th step after the boundary. TensorBoard puts it on the run's step axis; alerts.jsonl and report.md's
    Alerts table keep the stage's own step, beside the stage's name."""
    epoch: int
    kind: str
    """loss_spike, grad_spike, non_finite, divergence, level_shift (instability.py); epoch_boundary,
    stage_boundary (epoch_boundary.py)."""
    value: float
    threshold: float
    action: str
    keys: list[str] = field(default_factory=list)
    """Sample keys of the offending batch(es)."""
    causes: list[str] = field(default_factory=list)
    """Likely causes the check could observe (epoch and stage boundaries)."""
    detail: str = ""
    rank: int = 0
    """The rank whose batch it was (multi-GPU runs; rank 0 delivers every rank's alerts)."""

    def line(self) -> str:
        """One readable line for the console and chat."""
        keys = f" batch keys {', '.join(self.keys[:4])}{' ...' if len(self.keys) > 4 else ''}" if self.keys else ""
        causes = f" likely causes: {', '.join(self.causes)}." if self.causes else ""
        rank = f" rank {self.rank}" if self.rank else ""
        return (
            f"[{self.kind}] stage {self.stage} step {self.step} epoch {self.epoch}{rank}: value {self.value:.4g} "
            f"vs threshold {self.threshold:.4g}; action {self.action}.{causes}{keys} {self.detail}".rstrip()
        )

    def record(self) -> dict:
        """The alert as standard JSON: a NaN or infinite value or threshold is written as "nan", "inf" or
        "-inf" (JSON has no such numbers; `float()` reads them back)."""
        record = asdict(self)
        for name in ("value", "threshold"):
            if not math.isfinite(record[name]):
                record[name] = str(float(record[name]))
        return record


def check_webhook_url(url: str) -> None:
    """An http(s) URL with a host, or a ValueError naming the key: a URL without its scheme crashed the poster
    thread at the first alert, and a file:// one counted as delivered."""
    try:  # urllib reads the port here: "h:abc" or "h:99999" failed every post (counted); "[::1" is no URL
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"stability.webhook_url: not a URL ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"stability.webhook_url: {shown_url(url)} is not an http:// or https:// URL with a host")
    if port == 0:
        raise ValueError(f"stability.webhook_url: {shown_url(url)}: port 0 takes no connection")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed post: urllib followed a 301/302/303 with a GET without the body, and its 200 counted
    as delivered (an http:// URL redirected to https://, whose endpoint never got the alert)."""

    def redirect_request(self, *args, **kwargs):
        return None


def shown_url(url: str) -> str:
    """The URL as logs show it: scheme and host, without a password, the path or the query, where a webhook's
    secret is."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme and parts.netloc:
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"
    return f"{url.split('/', 1)[0].rpartition('@')[2]}/…"  # no scheme: "hooks.slack.com/services/..."


class AlertSinks(Callback):
    """Delivers alerts of one stage. Only rank 0 should call `emit` (the callbacks see to that).

    Also a callback, so that `alerts.jsonl` follows the checkpoints: a checkpoint records how many alerts the
    file held, and a stage resumed from it drops the later ones, which the replayed steps raise again.
    """

    def __init__(
        self,
        stage: str,
        jsonl_path: str | Path | None = None,
        webhook_url: str | None = None,
        webhook_queue: int = 100,
        close_timeout: float = 10.0,
    ) -> None:
        if webhook_url:
            check_webhook_url(webhook_url)
        self.stage, self.webhook_url = stage, webhook_url
        self.jsonl_path = None if jsonl_path is None else Path(jsonl_path)
        self.counts: Counter[str] = Counter()
        self.close_timeout = close_timeout
        """Seconds the end of a stage waits for queued webhook posts."""
        self.webhook_failures = 0
        """Posts that failed, were dropped from a full queue, or were still queued or being sent when the stage
        closed (kept in checkpoints: a resumed stage counts those of the steps before its checkpoint too)."""
        # Each poster thread (one per fit) has a queue and a `closed` event of its own: close() counts the post
        # it is still sending as failed and sets the event, so that the post's outcome is not counted again.
        self._queue_size = webhook_queue
        self._posts: queue.Queue[bytes | None] = queue.Queue(maxsize=webhook_queue)  # the running poster's
        self._poster: threading.Thread | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._step_lines: tuple[int, list[str]] = (-1, [])
        """The step of the last alert and the lines of every alert at that step (see `emit`)."""

    def _lines(self) -> list[str]:
        path = self.jsonl_path
        return path.read_text().splitlines(keepends=True) if path is not None and path.is_file() else []

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        # A fresh fit (no checkpoint to resume): an earlier fit's file, of a script run again, held alerts that
        # its counts, restarted at 0, did not. A resumed one trims the file to its checkpoint (load_state_dict).
        if trainer.ckpt_path is None and trainer.is_global_zero and self.jsonl_path is not None:
            self.jsonl_path.unlink(missing_ok=True)

    @override
    def state_dict(self) -> dict:
        return {"alerts": len(self._lines()), "webhook_failures": self.webhook_failures}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        kept = self._lines()[: state_dict["alerts"]]
        self.webhook_failures = state_dict.get("webhook_failures", 0)  # a checkpoint from before it was kept: 0
        self.counts = Counter(json.loads(line)["kind"] for line in kept)
        if rank_zero_only.rank == 0 and self.jsonl_path is not None and self.jsonl_path.is_file():
            self.jsonl_path.write_text("".join(kept))

    def emit(self, alert: Alert, loggers=()) -> None:
        """Counts and writes the alert, logs it to `loggers` (the trainer's) and queues the webhook post."""
        self.counts[alert.kind] += 1
        log.warning("ALERT %s", alert.line())
        if self.jsonl_path is not None:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            with self.jsonl_path.open("a") as sink:
                sink.write(json.dumps(alert.record(), allow_nan=False) + "\n")
        for logger in loggers:
            logger.log_metrics({f"alerts/{alert.kind}": float(self.counts[alert.kind])}, step=alert.step)
        # The text goes to the writer itself: on the curriculum's logger, at the run-wide step as the scalar.
        # TensorBoard's reader keeps one text per tag and step, the last written: a second alert at a step
        # (a loss spike and a gradient spike, or two ranks' spikes) rewrites the step's text with both.
        step, lines = self._step_lines
        lines = [*lines, alert.line()] if step == alert.step else [alert.line()]
        self._step_lines = (alert.step, lines)
        for _, writer, run_step in text_writers(loggers):
            writer.add_text(f"alerts/{self.stage}", "\n\n".join(lines), global_step=run_step(alert.step))
        if self.webhook_url:
            self._enqueue(alert)

    def _enqueue(self, alert: Alert) -> None:
        """A Slack-compatible body (`text` for chat, `alert` for machines), queued for the poster thread."""
        body = json.dumps({"text": f"vlm-curriculum: {alert.line()}", "alert": alert.record()}, allow_nan=False)
        if self._poster is None:
            self._posts, self._closed = queue.Queue(maxsize=self._queue_size), threading.Event()
            self._poster = threading.Thread(
                target=self._deliver, args=(self._posts, self._closed), name="alert-webhook", daemon=True
            )
            self._poster.start()
        try:
            self._posts.put_nowait(body.encode())
        except queue.Full:  # an alert every step against a dead endpoint: the file keeps them all
            with self._lock:
                self.webhook_failures += 1
            self._log_failure(f"its queue is full ({self._queue_size} posts)")

    def _log_failure(self, why: str) -> None:
        url = shown_url(self.webhook_url)
        log.error("alert webhook %s: a post failed (%s); the alert is in alerts.jsonl", url, why)

    def _deliver(self, posts: queue.Queue, closed: threading.Event) -> None:
        while (body := posts.get()) is not None:
            headers = {"Content-Type": "application/json"}
            failure = None
            try:  # the Request too: a value it refuses must not end the thread, leaving the queue unserved
                request = urllib.request.Request(self.webhook_url, body, headers, method="POST")
                # Built per post: the proxy settings are read from the environment as a post is made.
                with urllib.request.build_opener(_NoRedirect).open(request, timeout=5) as response:
                    response.read()
            except Exception as error:  # delivery must never end a training run
                failure = str(error)
            finally:
                if failure is not None:
                    self._log_failure(failure)  # before the task is done: a join() on the queue sees the line
                with self._lock:  # counted here, or by close() once it has set `closed`: never both, never neither
                    if failure is not None and not closed.is_set():
                        self.webhook_failures += 1
                    posts.task_done()
        posts.task_done()

    def close(self) -> None:
        """Waits up to `close_timeout` seconds for the queued posts, counts those still queued and the one still
        being sent (if any) as failed, and ends the poster thread (after that post)."""
        if self._poster is None:
            return
        deadline = time.monotonic() + self.close_timeout
        while self._posts.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        unsent = 0
        while True:
            try:
                self._posts.get_nowait()
            except queue.Empty:
                break
            self._posts.task_done()
            unsent += 1
        with self._lock:  # the post being sent now, if any, may fail after the stage's done.json is written
            in_flight = self._posts.unfinished_tasks  # taken from the queue and not yet done: 0 or 1
            self.webhook_failures += unsent + in_flight
            self._closed.set()
        if unsent or in_flight:
            log.error(
                "alert webhook %s: after %g s, %d posts still queued were not sent and %d still being sent is "
                "counted as failed; the alerts are in alerts.jsonl",
                shown_url(self.webhook_url), self.close_timeout, unsent, in_flight,
            )  # fmt: skip
        self._posts.put(None)
        self._poster = None

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.close()

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.close()
