"""The connection lease of long-connection mode (services/longconn/lease.py) on every Redis topology, and after a
real Sentinel failover that loses it: one holder at a time, fencing by generation, a cool-down for all."""

import pytest
from redis.crc import key_slot

from services.keys import Keys
from services.longconn.lease import ACQUIRE, BACK_OFF, COOL_DOWN, FIRST_BACKOFF_SECONDS, RELEASE, RENEW, BotLease
from services.redis_conn import connect_redis
from tests.conftest import SENTINEL_PASSWORD, wait_until
from tests.test_scripts import keys_not_from_keys

KEYS = Keys()
BOT = "lease-bot"


def lease_pair(url: str, seconds: int = 5):
    client = connect_redis(url, 2.0, sentinel_password=SENTINEL_PASSWORD)
    return client, BotLease(client, KEYS, BOT, "A", seconds), BotLease(client, KEYS, BOT, "B", seconds)


def test_one_holder_at_a_time_on_every_topology(topology):
    client, a, b = lease_pair(topology.url)
    held = a.acquire()
    assert held is not None
    assert b.acquire() is None
    again = a.acquire()  # a new connection of the same process: a new generation, the old one is over
    assert again.generation > held.generation
    assert not a.renew(held)
    held = again
    assert a.renew(held)
    assert a.release(held)
    taken = b.acquire()
    assert taken.generation > held.generation
    assert not a.renew(held)  # the old holder learns at once that it must stop
    assert not a.cool_down(held, 300)  # kicked by its successor: no cool-down
    assert b.renew(taken) and not client.exists(KEYS.ws_cooldown(BOT))
    client.close()


def test_a_lease_that_is_not_renewed_runs_out(topology):
    client, a, b = lease_pair(topology.url, seconds=2)
    assert a.acquire() is not None
    assert wait_until(lambda: not client.exists(KEYS.ws_lease(BOT)), timeout=5)  # not renewed: it runs out
    assert b.acquire() is not None
    client.close()


def test_refused_credentials_back_every_process_off_for_a_growing_interval(topology):
    """WeCom refused the secret: nobody tries again until the interval passes; each refusal in a row doubles it up
    to the longest; an accepted subscription starts over from the first."""
    client, a, b = lease_pair(topology.url)
    intervals = []
    for _ in range(7):
        held = a.acquire()
        assert held is not None
        intervals.append(a.back_off(held))
        assert a.acquire() is None and b.acquire() is None  # the lease is dropped, and nobody may take it
        assert FIRST_BACKOFF_SECONDS - 1 <= client.ttl(KEYS.ws_backoff(BOT)) <= intervals[-1]
        client.delete(KEYS.ws_backoff(BOT))  # the interval passed
    assert intervals == [15, 30, 60, 120, 240, 300, 300]
    a.accepted()
    assert a.back_off(a.acquire()) == FIRST_BACKOFF_SECONDS
    client.close()


def test_a_cool_down_keeps_every_process_away(topology):
    client, a, b = lease_pair(topology.url)
    held = a.acquire()
    assert a.cool_down(held, 2)  # the newest holder, kicked by a subscriber that is not ours
    assert a.acquire() is None
    assert b.acquire() is None
    assert wait_until(lambda: not client.exists(KEYS.ws_cooldown(BOT)), timeout=5)  # the cool-down ends
    assert b.acquire() is not None
    client.close()


@pytest.mark.e2e
def test_after_a_failover_that_lost_the_lease_the_new_holder_is_newer(sentinel_set):
    """Asynchronous replication can lose the lease and roll the counter back; the holder that acquires next still
    gets a newer generation (never below the clock in ms), so the old holder recognises its successor."""
    sentinel_set.flush()
    client, a, b = lease_pair(sentinel_set.url)
    held = a.acquire()
    killed = sentinel_set.kill_master()
    sentinel_set.wait_for_failover(killed)
    client.delete(KEYS.ws_lease(BOT))  # what a failover that lost the last writes leaves
    client.set(KEYS.ws_generation(BOT), 1)  # ... and a counter rolled back
    taken = b.acquire()
    assert taken is not None
    assert taken.generation > held.generation
    assert not a.renew(held)
    assert not a.cool_down(held, 300)  # a kick now is our own successor's: yield, never a loop
    client.close()
    sentinel_set.restart(killed)


@pytest.mark.parametrize(
    "source",
    [ACQUIRE, RENEW, RELEASE, BACK_OFF, COOL_DOWN],
    ids=["acquire", "renew", "release", "back-off", "cool-down"],
)
def test_the_lease_scripts_touch_only_their_keys_in_one_slot(source):
    assert keys_not_from_keys(source) == []
    keys = [KEYS.ws_lease(BOT), KEYS.ws_generation(BOT), KEYS.ws_cooldown(BOT)]
    keys += [KEYS.ws_backoff(BOT), KEYS.ws_refusals(BOT)]
    assert len({key_slot(key.encode()) for key in keys}) == 1
