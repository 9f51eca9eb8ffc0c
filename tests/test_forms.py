"""Dify's human-input forms as WeCom template cards (docs/architecture.md, "Forms"), callback mode, over real
sockets: two gateway replicas on the test Redis, the Dify stand-in serving the form API, the WeCom simulator
polling the bubble and tapping the card. Long-connection mode and gunicorn replicas: tests/e2e/test_forms_e2e.py.
"""

import time

import pytest

from demo import dify_apps as apps
from demo import dify_standin as d
from services.forms.cards import ACTION_QUESTION
from services.forms.form import read_form
from services.forms.store import FormRecord, parse_task_id
from services.texts import CATALOGUE
from tests.conftest import KEYS, WS_BOT_ID, make_simulator, outbox_settled, wait_until
from tests.dify_captures import capture, form_reply

ZH = CATALOGUE["zh"]
DONE = " The request was handled."


def approval(**spec) -> list[tuple]:
    return [apps.workflow_started(), d.message("Need approval."), apps.form(**spec)]


def ask_and_click(sim, clicker, question="buy laptops", action="approve", userid="alice", chatid="", **click):
    """Ask on `sim`; when the card arrives, tap it on `clicker` (as `click.get('by', userid)`); returns (the
    conversation, the click's reply, seconds the click took)."""
    clicks = []
    by = click.pop("by", userid)

    def on_frame(frame):
        if "template_card" in frame and not clicks:
            started = time.monotonic()
            reply = clicker.send(clicker.card_click(frame["template_card"], action, by, chatid, **click))
            clicks.append((reply, time.monotonic() - started))

    conversation = sim.ask(question, userid, chatid, on_frame=on_frame)
    reply, took = clicks[0] if clicks else (None, None)
    return conversation, reply, took


def test_the_form_rides_as_a_card_and_a_click_on_the_other_replica_goes_on_in_the_bubble(sims, dify):
    dify.script(approval())
    conversation, reply, took = ask_and_click(sims[0], sims[1])
    assert len(conversation.cards) == 1
    card = conversation.cards[0]
    assert card["card_type"] == "button_interaction"
    assert [b["text"] for b in card["button_list"]] == ["Approve", "Reject"]
    assert card["task_id"].startswith(conversation.stream_id + "@")
    assert "Approve the purchase" in card["sub_title_text"]
    # The click is answered with the card updated (WeCom drops a click left unanswered 5 s).
    assert reply["response_type"] == "update_template_card"
    assert reply["template_card"]["task_id"] == card["task_id"]
    assert reply["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    assert [b["key"].rsplit("#", 1)[1] for b in reply["template_card"]["button_list"]] == ["done"]
    assert took < 5
    # Dify got one submission, as the run's own user; the rest of the run came into the same bubble.
    [submission] = dify.form_submissions
    assert submission["status"] == 200
    assert submission["body"]["action"] == "approve"
    assert submission["body"]["user"] == dify.chat_requests()[0]["user"]
    assert conversation.finished
    assert conversation.text == "Need approval." + DONE
    # While the form waited, the bubble showed what it asks and what to do.
    waiting = [c for c in conversation.contents() if "Approve the purchase" in c]
    assert waiting and ZH["form_choose"] in waiting[-1]


def test_a_repeated_delivery_of_the_message_leaves_the_card_to_the_polls(sims, dify, redis_client):
    """WeCom may deliver a message again although its first delivery was answered, and then keeps the bubble of the
    first: the repeat's reply shows the stream as far as it has come, but the card (one per message) is left to the
    next poll. Before, the repeat's reply took it, and a form waited for a tap on a card never shown (the fault
    campaign)."""
    dify.script(approval())
    payload = sims[0].text_message("buy laptops")
    first = sims[0].send(payload)
    stream_key = KEYS.stream(first["stream"]["id"])
    assert wait_until(lambda: redis_client.hget(stream_key, "card"), timeout=10)  # the card waits for a poll
    repeat = sims[1].send(payload)
    assert repeat["stream"]["id"] == first["stream"]["id"] and "Approve the purchase" in repeat["stream"]["content"]
    assert "template_card" not in repeat
    taps = []

    def tap(frame):
        if "template_card" in frame:
            taps.append(sims[1].send(sims[1].card_click(frame["template_card"], "approve")))

    conversation = sims[0].follow(first, on_frame=tap)
    assert len(conversation.cards) == len(taps) == 1
    assert conversation.text == "Need approval." + DONE


def test_double_clicks_and_other_members_submit_nothing_more(sims, dify):
    dify.script(approval())
    clicks = []

    def on_frame(frame):
        if "template_card" in frame:
            card = frame["template_card"]
            clicks.append(sims[1].send(sims[1].card_click(card, "reject", "bob", "team")))  # not the asker
            clicks.append(sims[0].send(sims[0].card_click(card, "approve", "alice", "team")))
            clicks.append(sims[1].send(sims[1].card_click(card, "reject", "alice", "team")))  # a second tap
            clicks.append(sims[0].send(sims[0].card_click(card, "approve", "alice", "team")))

    conversation = sims[0].ask("buy laptops", "alice", "team", on_frame=on_frame)
    stranger, first, second, third = clicks
    assert stranger["userids"] == ["bob"]  # only the stranger's card changes
    assert stranger["template_card"]["main_title"]["desc"] == ZH["form_not_yours"]
    assert "userids" not in first
    for later in (second, third):
        assert later["template_card"]["main_title"]["desc"] == ZH["form_answered"].format(choice="Approve")
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]
    assert conversation.text == "Need approval." + DONE


def test_a_form_a_failover_took_back_is_open_again_for_the_tap_on_its_card(sims, dify, redis_client):
    """The form's record was lost after its card went out (a failover before a replica held it): the waiting worker
    writes it again, and the user's tap goes on in the bubble instead of meeting "not one of ours"."""
    dify.script(approval())
    clicks = []

    def on_frame(frame):
        if "template_card" in frame and not clicks:
            card = frame["template_card"]
            key = KEYS.form(*parse_task_id(card["task_id"]))
            redis_client.delete(key)
            assert wait_until(lambda: redis_client.hget(key, "status") == "open", timeout=5)
            clicks.append(sims[1].send(sims[1].card_click(card, "approve", "alice")))

    conversation = sims[0].ask("buy laptops", "alice", on_frame=on_frame)
    assert clicks[0]["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]
    assert conversation.text == "Need approval." + DONE


def test_a_form_whose_card_a_failover_took_back_before_any_poll_is_shown_again(sims, dify, redis_client, monkeypatch):
    """A failover in the second the form was opened took back its record and, with it, the stream's prompt and card,
    though a replica had answered each write (the 10-minute Sentinel run of seed 50: another replica was promoted).
    Before, the waiting worker opened the form again but nothing placed its card again: no reply carried one, and
    the bubble ended asking for it (`lost` 1). Finding the form gone, the worker now writes both again."""
    from services.forms.service import FormService

    dify.script(approval())
    wait, lost = FormService.wait, []

    def failover_then_wait(self, ticket, *args, **kwargs):
        if not lost:  # the failover: the form's record, and what the stream showed of it, are gone
            stream_id, _ = parse_task_id(ticket.task_id)
            redis_client.delete(KEYS.form(*parse_task_id(ticket.task_id)))
            lost.append(redis_client.hdel(KEYS.stream(stream_id), "card", "prompt"))
        return wait(self, ticket, *args, **kwargs)

    monkeypatch.setattr(FormService, "wait", failover_then_wait)
    conversation, reply, _ = ask_and_click(sims[0], sims[1])
    assert lost == [2]
    assert len(conversation.cards) == 1
    assert reply["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]
    assert conversation.text == "Need approval." + DONE


def test_a_form_that_expired_updates_the_card_and_submits_nothing(sims, dify):
    dropped = " Nobody approved; the request was dropped."
    timeout_path = [d.message(dropped), apps.workflow_done({"answer": dropped}), d.end()]
    dify.script(approval(expires_in=1, timeout=timeout_path))

    def late(frame):
        if "template_card" in frame:
            time.sleep(1.2)

    clicks = []

    def on_frame(frame):
        late(frame)
        if "template_card" in frame:
            clicks.append(sims[1].send(sims[1].card_click(frame["template_card"], "approve")))

    conversation = sims[0].ask("buy laptops", on_frame=on_frame)
    assert clicks[0]["template_card"]["main_title"]["desc"] == ZH["form_expired_card"]
    assert dify.form_submissions == []
    assert conversation.finished  # the bubble followed the run's timeout path, and says why
    assert conversation.text == "Need approval. Nobody approved; the request was dropped.\n\n" + ZH["form_timed_out"]


def test_dify_refusing_the_answer_412_ends_the_bubble_saying_so(sims, dify):
    dify.script(approval())

    def on_frame(frame):
        if "template_card" in frame:
            for form in dify.forms.values():
                form["status"] = "submitted"  # answered elsewhere (Dify's web app): Dify answers 412
            sims[1].send(sims[1].card_click(frame["template_card"], "approve"))

    conversation = sims[0].ask("buy laptops", on_frame=on_frame)
    assert [s["status"] for s in dify.form_submissions] == [412]
    assert conversation.text.endswith(ZH["form_expired"])


def test_text_inputs_are_taken_from_the_next_messages(sims, dify):
    inputs = [apps.text_input("reason", "Reason"), apps.text_input("budget", "Budget code")]
    dify.script(approval(actions=(("submit", "Send", "primary"),), inputs=inputs))
    notes = []

    def on_frame(frame):
        if "template_card" in frame:
            for value in ("new hires", "CC-42"):
                notes.append(sims[1].send(sims[1].text_message(value))["stream"]["content"])

    conversation = sims[0].ask("buy laptops", on_frame=on_frame)
    assert notes[0].startswith(ZH["form_value_noted"].format(label="Reason"))
    assert ZH["form_type_value"].format(label="Budget code") in notes[0]
    assert ZH["form_submitted"].format(choice="Send") in notes[1]
    [submission] = dify.form_submissions
    assert submission["body"]["inputs"] == {"reason": "new hires", "budget": "CC-42"}
    assert submission["body"]["action"] == "submit"
    assert len(dify.chat_requests()) == 1  # the values were never questions for Dify
    assert conversation.text == "Need approval." + DONE


def test_a_click_before_the_text_inputs_asks_for_them_first(sims, dify):
    dify.script(approval(inputs=[apps.text_input("reason", "Reason")]))
    replies = []

    def on_frame(frame):
        if "template_card" in frame:
            replies.append(sims[1].send(sims[1].card_click(frame["template_card"], "approve")))
            sims[0].send(sims[0].text_message("team growth"))
            replies.append(sims[1].send(sims[1].card_click(frame["template_card"], "approve")))

    conversation = sims[0].ask("buy laptops", on_frame=on_frame)
    assert replies[0]["template_card"]["main_title"]["desc"] == ZH["form_needs_values"].format(label="Reason")
    assert replies[0]["userids"] == ["alice"]
    assert replies[1]["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    assert dify.form_submissions[0]["body"]["inputs"] == {"reason": "team growth"}
    assert conversation.text == "Need approval." + DONE


def test_one_select_rides_beside_the_buttons_as_their_selection(sims, dify):
    """A form with one select: a button_interaction card whose `button_selection` offers the options (ids o0, o1:
    an option may be any text), the actions its buttons; the option's text is submitted."""
    dify.script(approval(inputs=[apps.select_input("size", ["13 inch", "15 inch"], "Size")]))
    conversation, reply, _ = ask_and_click(sims[0], sims[1], action="reject", selected={"size": "15 inch"})
    card = conversation.cards[0]
    assert card["card_type"] == "button_interaction"
    assert [o["id"] for o in card["button_selection"]["option_list"]] == ["o0", "o1"]
    assert [b["text"] for b in card["button_list"]] == ["Approve", "Reject"]
    assert reply["template_card"]["button_selection"]["disable"] is True
    assert reply["template_card"]["button_selection"]["selected_id"] == "o1"
    [submission] = dify.form_submissions
    assert submission["body"]["action"] == "reject"
    assert submission["body"]["inputs"] == {"size": "15 inch"}


def test_several_selects_become_a_multiple_interaction_card(sims, dify):
    sizes = apps.select_input("size", ["13 inch", "15 inch"], "Size")
    colours = apps.select_input("colour", ["灰", "银"])
    dify.script(approval(inputs=[sizes, colours]))
    selected = {"size": "15 inch", "colour": "银", ACTION_QUESTION: "reject"}
    conversation, reply, _ = ask_and_click(sims[0], sims[1], selected=selected)
    card = conversation.cards[0]
    assert card["card_type"] == "multiple_interaction"
    assert [s["question_key"] for s in card["select_list"]] == ["size", "colour", ACTION_QUESTION]
    assert reply["template_card"]["select_list"][0]["disable"] is True
    [submission] = dify.form_submissions
    assert submission["body"]["action"] == "reject"
    assert submission["body"]["inputs"] == {"size": "15 inch", "colour": "银"}


def test_a_click_after_the_bubble_ended_sends_the_rest_through_the_clicks_response_url(make_pair, dify):
    a, b = make_pair(stream_window_seconds=22)  # the bubble waits 2 s for the click, then ends
    sim, other = make_simulator(a.url), make_simulator(b.url)
    dify.script(approval())
    conversation = sim.ask("buy laptops")
    assert conversation.finished
    assert ZH["form_waiting"] in conversation.text
    click = other.card_click(conversation.cards[0], "approve")
    reply = other.send(click)
    assert reply["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    message = other.inbox.wait_for(click["response_url"], timeout=10)
    assert message is not None
    assert message["markdown"]["content"] == ZH["form_rest"] + "\n\n" + DONE.strip()
    assert len(dify.form_submissions) == 1
    sim.close()
    other.close()


def test_a_second_form_in_one_run_is_answered_by_typing_its_choice(sims, dify):
    second = apps.form("Confirm delivery address?", actions=(("yes", "Yes", "primary"), ("no", "No", "default")))
    dify.script(approval(branches={"*": [d.sleep(0.2), d.message(" Approved."), second]}))
    typed = []

    def on_frame(frame):
        if "template_card" in frame:
            sims[1].send(sims[1].card_click(frame["template_card"], "approve"))
        elif "Confirm delivery" in frame["stream"]["content"] and not typed:
            typed.append(sims[1].send(sims[1].text_message("yes"))["stream"]["content"])

    conversation = sims[0].ask("buy laptops", on_frame=on_frame)
    assert len(conversation.cards) == 1  # one card per message: the second form is answered by typing
    assert typed == [ZH["form_submitted"].format(choice="Yes")]
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve", "yes"]
    assert conversation.text == "Need approval. Approved." + DONE


def test_a_draining_replica_hands_a_waiting_form_over_at_once(pair, dify):
    a, b = pair
    sim = make_simulator([a.url, b.url])  # the message on a (its worker waits there), polls on both
    dify.script(approval())
    drained = []

    def on_frame(frame):
        if "template_card" in frame:
            started = time.monotonic()
            a.gateway.drain(10)  # SIGTERM: a stopping replica waits for no form
            drained.append(time.monotonic() - started)
            sim.send(sim.card_click(frame["template_card"], "approve"), replica=1)

    conversation = sim.ask("buy laptops", on_frame=on_frame)
    assert drained[0] < 2
    assert conversation.text == "Need approval." + DONE  # b resumed the run to its pause, then went on
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]
    sim.close()


def test_a_form_delivered_by_email_says_so(sims, dify):
    dify.script(apps.input_required(before="I need your approval first."))
    conversation = sims[0].ask("book the trip")
    assert conversation.text == "I need your approval first.\n\n" + ZH["form_elsewhere"]


def test_an_event_with_empty_data_is_read_from_the_form_api(sims, dify):
    dify.script(approval(bare=True))
    conversation, reply, _ = ask_and_click(sims[0], sims[1])
    assert [b["text"] for b in conversation.cards[0]["button_list"]] == ["Approve", "Reject"]
    assert conversation.text == "Need approval." + DONE


@pytest.mark.parametrize(
    "task_id, key",
    [("forged", "forged#approve"), ("AAAAAAAAAAAAAAAAAAAAAA@0123456789ab", "AAAAAAAAAAAAAAAAAAAAAA@0123456789ab#x")],
)
def test_clicks_on_unknown_or_forged_cards_get_an_empty_200(sims, task_id, key):
    click = sims[0].card_click({"task_id": task_id, "button_list": [{"key": key}]})
    response = sims[0].post(click)
    assert response.status_code == 200
    assert response.content == b""


def test_read_form_takes_the_form_apis_answer_over_the_events():
    event = {"form_token": "t", "form_content": "old", "node_title": "Step"}
    fetched = {
        "form_content": "new",
        "user_actions": [{"id": "ok", "title": "OK", "button_style": "primary"}],
        "inputs": [{"type": "select", "output_variable_name": "s", "options": [{"value": "1", "label": "One"}]}],
        "expiration_time": 2_000_000_000_000,  # milliseconds
    }
    form = read_form(event, fetched, "run-1")
    assert (form.content, form.title, form.expires_at) == ("new", "Step", 2_000_000_000.0)
    assert form.card_selects[0].options == (("1", "One"),)
    assert form.action("ok").title == "OK" and form.action("1").id == "ok" and form.action("ok ").id == "ok"


def test_a_snapshots_form_is_read_with_the_rendered_text_and_difys_defaults():
    """A resumed run's snapshot gives the form's raw template (03); the form's GET (04) has the text rendered, and
    Dify 1.14's defaults are objects: the text input with one is not asked for, and its value is submitted."""
    snapshot = next(
        e for e in capture("03-events-paused-snapshot.sse") if e != "ping" and e["event"].startswith("human")
    )
    form = read_form(snapshot["data"], form_reply(), "run-1")
    assert form.content == "Please review the request: deploy v2 to prod"
    assert [(i.name, i.default) for i in form.in_chat] == [("comment", "looks good")]
    record = FormRecord("s@0", form, "open", "alice", "", "", "", "u", "s", values={})
    assert record.missing == []


# --- cards beyond forms ------------------------------------------------------------------------------------------


def test_questions_suggested_after_an_answer_ride_on_its_final_reply(sims, dify):
    dify.parameters["suggested_questions_after_answer"] = {"enabled": True}
    dify.script(d.answer("Laptops are ordered through the IT portal."))
    conversation = sims[0].ask("how do I order a laptop?")
    assert conversation.finished and conversation.text == "Laptops are ordered through the IT portal."
    [card] = conversation.cards
    assert "template_card" in conversation.frames[-1]  # on the final reply
    assert card["card_type"] == "text_notice"
    assert [j["question"] for j in card["jump_list"]] == dify.suggestions
    assert all(j["type"] == 3 for j in card["jump_list"])


def test_without_suggestions_enabled_the_answer_carries_no_card(sims, dify):
    dify.script(d.answer("Plain answer."))
    conversation = sims[0].ask("hello")
    assert conversation.cards == [] and conversation.text == "Plain answer."


def test_an_answer_after_a_form_gets_no_second_card(sims, dify):
    dify.parameters["suggested_questions_after_answer"] = {"enabled": True}
    dify.script(approval())
    conversation, _, _ = ask_and_click(sims[0], sims[1])
    assert len(conversation.cards) == 1 and conversation.cards[0]["card_type"] == "button_interaction"


# --- long-connection mode --------------------------------------------------------------------------------------

WS_BOT = WS_BOT_ID


def test_on_a_long_connection_the_card_rides_on_a_frame_and_the_click_is_answered_on_its_req_id(ws_gateway, dify):
    _, wecom = ws_gateway()
    dify.script(approval())
    message = wecom.deliver_text(WS_BOT, "buy laptops")
    assert wait_until(lambda: wecom.cards(message), timeout=10)
    [card] = wecom.cards(message)
    started = time.monotonic()
    click = wecom.deliver_card_click(WS_BOT, card, "approve")
    update = wecom.updated(click)
    assert time.monotonic() - started < 5
    assert update["response_type"] == "update_template_card"
    assert update["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    final = wecom.final(message, timeout=20)
    assert final["stream"]["content"] == "Need approval." + DONE
    assert len(wecom.cards(message)) == 1
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]
    assert wecom.proactive == []


def test_on_a_long_connection_a_late_click_sends_the_rest_with_send_msg_once(ws_gateway, dify, redis_client):
    _, wecom = ws_gateway(stream_window_seconds=22)
    dify.script(approval())
    message = wecom.deliver_text(WS_BOT, "buy laptops")
    final = wecom.final(message, timeout=20)
    assert ZH["form_waiting"] in final["stream"]["content"]
    click = wecom.deliver_card_click(WS_BOT, wecom.cards(message)[0], "reject")
    assert wecom.updated(click)["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Reject")
    assert wait_until(lambda: wecom.proactive, timeout=20)
    assert outbox_settled(redis_client, WS_BOT)
    [sent] = wecom.proactive
    assert sent["msgtype"] == "markdown" and sent["chatid"] == "alice"
    assert sent["markdown"]["content"] == ZH["form_rest"] + "\n\n" + DONE.strip()
    assert [s["body"]["action"] for s in dify.form_submissions] == ["reject"]


def test_on_a_long_connection_double_taps_and_strangers_submit_nothing_more(ws_gateway, dify):
    _, wecom = ws_gateway()
    dify.script(approval())
    message = wecom.deliver_text(WS_BOT, "buy laptops")
    assert wait_until(lambda: wecom.cards(message), timeout=10)
    [card] = wecom.cards(message)
    stranger = wecom.updated(wecom.deliver_card_click(WS_BOT, card, "reject", userid="bob"))
    first = wecom.updated(wecom.deliver_card_click(WS_BOT, card, "approve"))
    second = wecom.updated(wecom.deliver_card_click(WS_BOT, card, "reject"))
    assert stranger["userids"] == ["bob"] and stranger["template_card"]["main_title"]["desc"] == ZH["form_not_yours"]
    assert first["template_card"]["main_title"]["desc"] == ZH["form_submitted"].format(choice="Approve")
    assert second["template_card"]["main_title"]["desc"] == ZH["form_answered"].format(choice="Approve")
    assert wecom.final(message, timeout=20)["stream"]["content"] == "Need approval." + DONE
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]


def test_on_a_long_connection_text_inputs_come_from_the_next_messages(ws_gateway, dify):
    _, wecom = ws_gateway()
    dify.script(approval(actions=(("submit", "Send", "primary"),), inputs=[apps.text_input("reason", "Reason")]))
    message = wecom.deliver_text(WS_BOT, "buy laptops")
    assert wait_until(lambda: wecom.cards(message), timeout=10)
    reply = wecom.final(wecom.deliver_text(WS_BOT, "new hires"), timeout=10)
    assert ZH["form_submitted"].format(choice="Send") in reply["stream"]["content"]
    assert wecom.final(message, timeout=20)["stream"]["content"] == "Need approval." + DONE
    [submission] = dify.form_submissions
    assert submission["body"]["inputs"] == {"reason": "new hires"} and len(dify.chat_requests()) == 1


def test_on_a_long_connection_an_expired_form_updates_the_card(ws_gateway, dify):
    _, wecom = ws_gateway()
    dify.script(approval(expires_in=1))
    message = wecom.deliver_text(WS_BOT, "buy laptops")
    assert wait_until(lambda: wecom.cards(message), timeout=10)
    time.sleep(1.2)
    update = wecom.updated(wecom.deliver_card_click(WS_BOT, wecom.cards(message)[0], "approve"))
    assert update["template_card"]["main_title"]["desc"] == ZH["form_expired_card"]
    assert ZH["form_timed_out"] in wecom.final(message, timeout=20)["stream"]["content"]
    assert dify.form_submissions == []
