"""A long connection that notices it is dead or unsubscribed: pings whose answers stop (two missed) make the holder
connect again through the lease, once, with no kick loop; WeCom's 846609 (the socket no longer subscribed) is met
by subscribing again on it. Against the WebSocket stand-in taught both."""

from __future__ import annotations

import time

from services.texts import CATALOGUE
from tests.conftest import WS_BOT_ID, wait_until

ZH = CATALOGUE["zh"]


def answered(wecom, text: str = "/help") -> bool:
    """A message on the connection gets its finished reply."""
    req_id = wecom.deliver_text(WS_BOT_ID, text)
    final = wecom.final(req_id, timeout=5)
    return final is not None and final["stream"]["content"] == ZH["help"]


def test_two_missed_pongs_drop_the_connection_and_it_is_made_again(ws_gateway):
    gateway, wecom = ws_gateway(wecom_ws_heartbeat_seconds=0.3)
    assert wait_until(lambda: wecom.pings >= 2, timeout=5)
    wecom.answer_pings = False  # the link dies silently: nothing closes, nothing answers
    assert wait_until(lambda: len(wecom.subscribes) == 2, timeout=5)
    wecom.answer_pings = True
    assert wait_until(lambda: wecom.subscribed(WS_BOT_ID) == 1, timeout=5)
    assert answered(wecom)
    time.sleep(1.5)  # a bounded look (five heartbeats): answered pings keep the connection, no loop
    assert len(wecom.subscribes) == 2
    assert gateway.bot().connection.holder.state == "holding"


def test_a_socket_wecom_no_longer_counts_as_subscribed_subscribes_again(ws_gateway):
    gateway, wecom = ws_gateway(wecom_ws_heartbeat_seconds=0.3)
    connections = wecom.connections
    wecom.unsubscribe(WS_BOT_ID)  # 846609 for what the socket sends next (the next ping)
    assert wait_until(lambda: len(wecom.subscribes) == 2, timeout=5)
    assert wecom.subscribed(WS_BOT_ID) == 1
    assert wecom.connections == connections  # on the same socket: no reconnect, no lease change
    assert answered(wecom)
    assert gateway.bot().connection.holder.state == "holding"
