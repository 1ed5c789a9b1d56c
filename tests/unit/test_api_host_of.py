"""ekko-api's choice of the host that takes a backup-now (app.host_of), and what POST answers
when the bus has already failed the job."""

import random

from ekko_libvirt.api.app import host_of

U = "6a1f2f0e-0000-4000-8000-00000000abcd"


def h(name, when, domains, down=False):
    return {"host": name, "last_heartbeat": when, "domains": domains, "down": down}


def test_the_host_where_it_runs_wins_over_a_newer_one_that_only_holds_it():
    # live migration: the source still lists the domain (shut off there), the target runs it
    hosts = [h("src", "2026-12-05T10:00:09Z", [{"uuid": U, "running": False}]),
             h("dst", "2026-12-05T10:00:01Z", [{"uuid": U, "running": True}])]
    for seed in range(20):
        rnd = random.Random(seed)
        shuffled = hosts[:]
        rnd.shuffle(shuffled)
        assert host_of(shuffled, U) == "dst", seed


def test_a_down_host_is_never_chosen_and_the_newest_heartbeat_breaks_ties():
    assert host_of([h("a", "2026-12-05T10:00:09Z", [{"uuid": U, "running": True}], down=True)], U) is None
    hosts = [h("old", "2026-12-05T09:59:00Z", [{"uuid": U, "running": True}]),
             h("new", "2026-12-05T10:00:00Z", [{"uuid": U, "running": True}]),
             h("dead", "2026-12-05T10:00:30Z", [{"uuid": U, "running": True}], down=True)]
    assert host_of(hosts, U) == "new"
    assert host_of([h("off", "2026-12-05T10:00:00Z", [{"uuid": U, "running": False}])], U) == "off"
    assert host_of([h("plain", "2026-12-05T10:00:00Z", [U])], U) == "plain"       # bare UUIDs
    assert host_of(hosts, "00000000-0000-4000-8000-000000000000") is None


def test_backup_now_answers_failed_when_the_bus_already_failed_it(tmp_path):
    """The agent went silent between hosts() and the request: Bus.backup_now fails the job at once;
    POST says so (state failed, the bus's error) instead of 'queued'."""
    from keystonemiddleware import fixture as ks_fixture

    from ekko_libvirt.api.app import create_app

    from .api_world import FakeBus, FakeGlance, GuestOpener, api_conf_for, make_world

    class FailingBus(FakeBus):
        def job(self, job_id):
            return {"id": job_id, "state": "failed", "result": None, "error": "agent on cmp1 is not answering"}

    w = make_world(str(tmp_path / "store"), random.Random(3))
    inst, project = next(iter(w.project_of.items()))
    auth = ks_fixture.AuthTokenFixture()
    auth.setUp()
    try:
        auth.add_token_data(token_id="tok", project_id=project, role_list=["member"], user_id="u")
        app = create_app(api_conf_for(str(tmp_path / "index.sqlite")), bus=FailingBus([inst]), glance=FakeGlance(),
                         open_guest=GuestOpener(), ekko=w.cfg)
        r = app.test_client().post(f"/v1/instances/{inst}/backups", json={}, headers={"X-Auth-Token": "tok"})
    finally:
        auth.cleanUp()
    assert r.status_code == 202, r.get_json()
    job = r.get_json()["job"]
    assert (job["state"], job["host"], job["error"]) == ("failed", "cmp1", "agent on cmp1 is not answering")
