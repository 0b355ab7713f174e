"""The alert sinks: alerts.jsonl, TensorBoard's text and scalars, and the webhook (callbacks/alerts.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from callbacks.alerts import Alert, AlertSinks
from callbacks.instability import InstabilityConfig, InstabilityMonitor
from tests.callbacks.toy import KeyedRegression, ToyRegression, loader, trainer


def test_alert_records_are_standard_json_and_text_lands_at_the_run_wide_step(tmp_path):
    from stages.tb_logger import CurriculumTensorBoardLogger
    from tests.tensorboard import RunEvents

    logger = CurriculumTensorBoardLogger(str(tmp_path), step_offset=1000)  # a second stage: 1000 steps before it
    sinks = AlertSinks("sft", tmp_path / "alerts.jsonl")
    sinks.emit(Alert("sft", 5, 0, "non_finite", float("nan"), float("inf"), "warn"), [logger])
    logger.experiment.flush()

    def strict(constant):
        raise AssertionError(f"not standard JSON: {constant}")

    record = json.loads((tmp_path / "alerts.jsonl").read_text(), parse_constant=strict)
    assert (record["value"], record["threshold"]) == ("nan", "inf") and float(record["threshold"]) == float("inf")
    events = RunEvents(tmp_path / "tb")
    assert [e.step for e in events.Scalars("alerts/non_finite")] == [1005]
    assert [e.step for e in events.Tensors("alerts/sft/text_summary")] == [1005]


def test_two_alerts_at_one_step_both_show_in_the_text_tensorboard_keeps(tmp_path):
    # TensorBoard's reader keeps the last text written at a tag and step: the second alert hid the first.
    from stages.tb_logger import CurriculumTensorBoardLogger
    from tests.tensorboard import RunEvents

    logger = CurriculumTensorBoardLogger(str(tmp_path))
    sinks = AlertSinks("sft", tmp_path / "alerts.jsonl")
    for kind, step in (("loss_spike", 5), ("grad_spike", 5), ("loss_spike", 6)):
        sinks.emit(Alert("sft", step, 0, kind, 9.0, 3.0, "warn"), [logger])
    logger.experiment.flush()
    last_at = {
        e.step: e.tensor_proto.string_val[0].decode()
        for e in RunEvents(tmp_path / "tb").Tensors("alerts/sft/text_summary")
    }
    assert last_at[5].count("[") == 2 and "[loss_spike]" in last_at[5] and "[grad_spike]" in last_at[5]
    assert last_at[6].startswith("[loss_spike] stage sft step 6") and last_at[6].count("[") == 1


class _Hook(BaseHTTPRequestHandler):
    """Records each post, then holds its response until `release` is set (a slow endpoint)."""

    received: list[dict] = []
    arrived = threading.Event()
    release = threading.Event()
    hang_up = False  # once released, close the connection without an answer (a failed post)

    redirect = False  # answer with a redirect, and a GET of it with 200 (an http:// URL moved to https://)

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        if _Hook.redirect:
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        _Hook.arrived.set()
        _Hook.release.wait(timeout=30)
        if _Hook.hang_up:
            self.close_connection = True
            return
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook():
    """A local webhook endpoint that answers once the test sets `_Hook.release`; its URL."""
    _Hook.received.clear()
    _Hook.arrived.clear()
    _Hook.release.clear()
    _Hook.hang_up = _Hook.redirect = False
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    _Hook.release.set()
    server.shutdown()
    server.server_close()


def test_webhook_receives_a_slack_compatible_post_without_holding_up_the_step(hook):
    sinks = AlertSinks("sft_long", webhook_url=hook)
    sinks.emit(Alert("sft_long", 7, 0, "loss_spike", 12.0, 3.0, "warn", ["k1"]))
    # emit returned while the endpoint still holds its answer (a synchronous post would have waited for its
    # 5 s timeout here, and failed).
    assert _Hook.arrived.wait(timeout=10) and not _Hook.release.is_set() and sinks.webhook_failures == 0
    _Hook.release.set()
    sinks.close()
    assert _Hook.received[-1]["text"].startswith("vlm-curriculum: [loss_spike] stage sft_long step 7")
    assert _Hook.received[-1]["alert"]["threshold"] == 3.0
    assert sinks.webhook_failures == 0 and sinks._poster is None


def test_a_dead_webhook_is_counted_not_raised():
    with socket.socket() as probe:  # a port that refuses connections once closed
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/gone"
    dead = AlertSinks("sft_long", webhook_url=dead_url)
    dead.emit(Alert("sft_long", 7, 0, "loss_spike", 12.0, 3.0, "warn"))
    dead.close()
    assert dead.webhook_failures == 1 and dead.counts["loss_spike"] == 1


def test_a_redirected_post_is_counted_as_failed(hook):
    """urllib followed the 302 with a GET without the alert, whose 200 counted as delivered."""
    _Hook.redirect = True
    sinks = AlertSinks("sft_long", webhook_url=hook)
    sinks.emit(Alert("sft_long", 7, 0, "loss_spike", 12.0, 3.0, "warn"))
    sinks.close()
    assert sinks.webhook_failures == 1


@pytest.mark.parametrize("url", ["http://h:abc/x", "https://h:99999/x", "http://h:0/x", "http://[::1/x"])
def test_a_webhook_url_with_a_bad_port_is_refused(url):
    with pytest.raises(ValueError, match="stability.webhook_url: .*([Pp]ort|IPv6)"):
        AlertSinks("sft_long", webhook_url=url)


@pytest.mark.parametrize("url", ["hooks.slack.com/services/T0/B0/secret", "file:///etc/hostname", "http:///x"])
def test_a_webhook_url_without_http_and_a_host_is_refused(url):
    # Without its scheme the URL crashed the poster thread at the first alert (every stage end then waited for
    # the queue); a file:// URL counted as delivered.
    with pytest.raises(
        ValueError, match="stability.webhook_url: .* is not an http:// or https:// URL with a host"
    ) as e:
        AlertSinks("sft_long", webhook_url=url)
    assert "secret" not in str(e.value)


def test_failed_posts_log_the_webhooks_host_not_its_secret(caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://user:pass@127.0.0.1:{probe.getsockname()[1]}/services/T0/B0/secret-token?key=k"
    dead = AlertSinks("sft_long", webhook_url=dead_url, close_timeout=0)
    dead.emit(Alert("sft_long", 7, 0, "loss_spike", 12.0, 3.0, "warn"))
    dead._posts.join()
    dead.close()
    assert f"alert webhook http://127.0.0.1:{dead_url.split(':')[3].split('/')[0]}/…: a post failed" in caplog.text
    assert "secret-token" not in caplog.text and "pass" not in caplog.text


@pytest.mark.parametrize("in_flight_fails", [False, True])
def test_posts_beyond_the_queue_or_the_close_timeout_are_counted_as_failed(hook, caplog, in_flight_fails):
    # The post being sent at the close was not counted: it failed after the stage's done.json was written, and
    # its line came among the next stage's. It counts as failed at the close, and its outcome is not counted again.
    _Hook.hang_up = in_flight_fails
    sinks = AlertSinks("sft_long", webhook_url=hook, webhook_queue=2, close_timeout=0.2)
    alerts = [Alert("sft_long", step, 0, "loss_spike", 12.0, 3.0, "warn") for step in range(5)]
    sinks.emit(alerts[0])
    assert _Hook.arrived.wait(timeout=10)  # step 0 is in flight, held by the endpoint
    for alert in alerts[1:]:
        sinks.emit(alert)  # steps 1 and 2 wait in the queue, 3 and 4 find it full
    assert sinks.webhook_failures == 2
    poster = sinks._poster
    sinks.close()  # the endpoint still holds step 0: steps 1 and 2 are not sent
    assert sinks.webhook_failures == 5
    assert "2 posts still queued were not sent and 1 still being sent is counted as failed" in caplog.text
    _Hook.release.set()
    poster.join(timeout=10)
    assert not poster.is_alive() and sinks.webhook_failures == 5
    assert (caplog.text.count("a post failed") == 3) == in_flight_fails, "2 for the full queue, 1 for the hang-up"
    assert [a["alert"]["step"] for a in _Hook.received] == [0]
    assert sinks.counts["loss_spike"] == 5  # every alert was still counted (and written, with a jsonl path)


def test_a_second_fit_with_the_same_sinks_counts_each_failed_post_once(hook, caplog):
    # The first fit's post, counted as failed at its close, was counted again when it failed later: the second
    # fit's poster had reset the flag that said so. Each fit's poster has its own queue and flag now.
    _Hook.hang_up = True
    sinks = AlertSinks("sft_long", webhook_url=hook, close_timeout=0.2)
    posters = []
    for step in (0, 1):
        sinks.emit(Alert("sft_long", step, 0, "loss_spike", 12.0, 3.0, "warn"))
        posters.append(sinks._poster)
        deadline = time.monotonic() + 10
        while not sinks._posts.empty() and time.monotonic() < deadline:  # the poster has taken it: being sent
            time.sleep(0.01)
        assert sinks._posts.empty() and sinks._posts.unfinished_tasks == 1
        sinks.close()  # the endpoint holds the first post; the second waits to be served
    assert sinks.webhook_failures == 2
    _Hook.release.set()
    for poster in posters:
        poster.join(timeout=10)
    assert sinks.webhook_failures == 2 and len(_Hook.received) == 2


def test_the_end_of_a_fit_delivers_the_queued_posts(hook):
    _Hook.release.set()  # a prompt endpoint
    sinks = AlertSinks("toy", webhook_url=hook)
    monitor = InstabilityMonitor(InstabilityConfig(action="skip"), sinks, "toy")
    trainer([monitor, sinks], max_steps=40).fit(ToyRegression({30: "nan"}), loader(KeyedRegression()))
    assert sinks._poster is None  # closed by the trainer's teardown
    assert [(a["alert"]["kind"], a["alert"]["step"]) for a in _Hook.received] == [("non_finite", 30)]
