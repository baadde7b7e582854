"""Cloud preemption notices against a fake metadata server that answers as each cloud documents,
the watcher's deadlines, and the emergency-checkpoint policy. No Ray here."""

from __future__ import annotations

import logging
import signal
import time

import pytest

from orchestrator.cluster.emergency import Tier, plan_emergency
from orchestrator.cluster.notices import (AwsSpot, AzureScheduledEvents, GceMetadata, NoticeSourceError,
                                          cloud_sources)
from orchestrator.cluster.preemption import PreemptionWatcher
from orchestrator.config import FaultToleranceConfig, PreemptionNoticesConfig
from tests.cluster.fake_metadata import FakeMetadataServer


@pytest.fixture
def fake():
    with FakeMetadataServer() as server:
        yield server


def _gce(fake):
    return GceMetadata(fake.url + "/computeMetadata/v1")


def test_gce_preempted_gives_a_30_s_deadline(fake):
    source = _gce(fake)
    assert source.poll() is None
    fake.preempt("gce", 999)
    before = time.monotonic()
    notice = source.poll()
    assert notice.source == "gce" and "instance/preempted" in notice.reason
    assert before + 29 <= notice.deadline <= time.monotonic() + 30


def test_gce_terminate_on_host_maintenance_gives_60_s(fake):
    fake.preempt("gce", 999, maintenance=True)
    notice = _gce(fake).poll()
    assert "TERMINATE_ON_HOST_MAINTENANCE" in notice.reason
    assert notice.deadline - time.monotonic() == pytest.approx(60, abs=1)


def test_gce_answer_without_metadata_flavor_is_not_trusted(fake):
    fake.gce_flavor_header = False
    fake.preempt("gce", 999)
    with pytest.raises(NoticeSourceError, match="Metadata-Flavor"):
        _gce(fake).poll()


def test_aws_token_flow_and_instance_action_deadline(fake):
    source = AwsSpot(fake.url)
    assert source.poll() is None  # 404: nothing planned
    deadline_wall = fake.preempt("aws", 20)
    notice = source.poll()
    assert notice.source == "aws" and "terminate" in notice.reason
    expected = time.monotonic() + (deadline_wall - time.time())
    assert notice.deadline == pytest.approx(expected, abs=1.5)  # the answer has whole seconds
    puts = [r for r in fake.requests if r == ("PUT", "/latest/api/token")]
    assert len(puts) == 1  # the session token is reused


def test_aws_expired_token_is_renewed_once(fake):
    source = AwsSpot(fake.url)
    source.poll()
    fake.revoke_tokens()  # the next GET gets 401
    fake.preempt("aws", 30)
    assert source.poll() is not None
    assert [r for r in fake.requests if r[0] == "PUT"] == [("PUT", "/latest/api/token")] * 2


def test_azure_preempt_event_for_this_vm(fake):
    source = AzureScheduledEvents(fake.url)
    assert source.poll() is None
    deadline_wall = fake.preempt("azure", 25)
    notice = source.poll()
    assert notice.source == "azure" and "Preempt" in notice.reason
    assert notice.deadline == pytest.approx(time.monotonic() + deadline_wall - time.time(), abs=1.5)


def test_azure_event_for_another_vm_is_ignored(fake):
    fake.other_vm_event = True
    fake.preempt("azure", 25)
    assert AzureScheduledEvents(fake.url).poll() is None


def test_unreachable_metadata_server_is_an_error_not_a_notice():
    with pytest.raises(NoticeSourceError, match="127.0.0.1:9"):
        GceMetadata("http://127.0.0.1:9/computeMetadata/v1").poll()


def test_config_turns_on_the_chosen_sources_only():
    settings = PreemptionNoticesConfig(aws=True, azure=True, aws_endpoint="http://127.0.0.1:1")
    assert [s.name for s in cloud_sources(settings)] == ["aws", "azure"]
    assert cloud_sources(PreemptionNoticesConfig()) == []


# ---------------------------------------------------------------- the watcher

def test_watcher_polls_cloud_sources_in_the_background(fake):
    settings = PreemptionNoticesConfig(aws=True, aws_endpoint=fake.url, poll_interval_s=0.05)
    watcher = PreemptionWatcher.from_config(FaultToleranceConfig(preemption_notices=settings))
    with watcher:
        assert not watcher.requested()
        deadline_wall = fake.preempt("aws", 15)
        stop = time.monotonic() + 10
        while not watcher.requested() and time.monotonic() < stop:
            time.sleep(0.02)
    assert watcher.requested() and watcher.notice.source == "aws"
    assert watcher.deadline() == pytest.approx(time.monotonic() + deadline_wall - time.time(), abs=1.5)


def test_watcher_logs_an_unreachable_source_once(caplog):
    settings = PreemptionNoticesConfig(gce=True, gce_endpoint="http://127.0.0.1:9", poll_interval_s=0.02)
    with caplog.at_level(logging.WARNING, logger="orchestrator.cluster.preemption"):
        with PreemptionWatcher.from_config(FaultToleranceConfig(preemption_notices=settings)) as watcher:
            time.sleep(0.3)
    assert not watcher.requested()
    assert len([r for r in caplog.records if "gce" in r.getMessage()]) == 1


def test_sigterm_deadline_is_the_grace_period_or_kubernetes_grace():
    plain = FaultToleranceConfig(grace_period_s=12.0)
    kube = FaultToleranceConfig(preemption_notices=PreemptionNoticesConfig(kubernetes=True,
                                                                           kubernetes_grace_period_s=45.0))
    for config, source, grace in ((plain, "signal", 12.0), (kube, "kubernetes", 45.0)):
        with PreemptionWatcher.from_config(config) as watcher:
            signal.raise_signal(signal.SIGTERM)
            assert watcher.requested() and watcher.notice.source == source
            assert watcher.deadline() - watcher.requested_at == pytest.approx(grace)


def test_notice_without_deadline_gets_the_grace_period():
    now = [100.0]
    watcher = PreemptionWatcher(grace_s=7.0, clock=lambda: now[0])
    assert watcher.deadline() is None
    watcher.request("test")
    assert watcher.deadline() == 107.0


# ---------------------------------------------------------------- the emergency policy

@pytest.mark.parametrize("left, estimate, memory, tier", [
    (None, 5.0, False, Tier.STORAGE),    # no deadline: always save
    (10.0, 2.0, False, Tier.STORAGE),    # fits
    (10.0, None, False, Tier.STORAGE),   # first save, bounded by the deadline anyway
    (2.5, 2.0, False, Tier.NONE),        # does not fit with the commit margin
    (2.5, 2.0, True, Tier.MEMORY),       # ... but peers on other nodes stay
    (0.5, None, False, Tier.NONE),       # no time at all
])
def test_plan_emergency(left, estimate, memory, tier):
    assert plan_emergency(left, estimate, memory_ok=memory).tier is tier
