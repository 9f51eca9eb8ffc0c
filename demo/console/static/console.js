// The local console: this page plays WeCom. It encrypts and signs callbacks with the bot's Token and
// EncodingAESKey (demo credentials), posts them to the real callback endpoint, checks and decrypts the replies,
// and polls each stream about once a second, rendering the cumulative markdown as WeCom's bubble would.
"use strict";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const POLL_INTERVAL_MS = 1000;
const POLL_WINDOW_MS = 6 * 60 * 1000;
const AUDIT_SWEEP_MS = 1500;  // a replica writes a finished message's audit row within a second (docs/audit.md)
let bots = [];
let config = null;  // the bot this page talks to (the picker chooses among several)
let aesKey = null;
let aesIv = null;

// --- bytes and base64 ---------------------------------------------------------------------------------------

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) { out.set(part, offset); offset += part.length; }
  return out;
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function randomHex(n) {
  return Array.from(crypto.getRandomValues(new Uint8Array(n)), b => b.toString(16).padStart(2, "0")).join("");
}

// --- WeCom crypto: SHA-1 signature; AES-256-CBC with PKCS#7 padding to 32 bytes ----------------------------

async function sign(timestamp, nonce, encrypted) {
  const joined = [config.token, String(timestamp), nonce, encrypted].sort().join("");
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-1", encoder.encode(joined)));
  return Array.from(digest, b => b.toString(16).padStart(2, "0")).join("");
}

async function encrypt(message) {
  const body = encoder.encode(message);
  const length = new Uint8Array(4);
  new DataView(length.buffer).setUint32(0, body.length);  // big-endian
  let plain = concat(crypto.getRandomValues(new Uint8Array(16)), length, body);  // receiveid is "" for a bot
  const pad = 32 - (plain.length % 32);
  plain = concat(plain, new Uint8Array(pad).fill(pad));
  // WebCrypto always adds its own 16-byte padding block: CBC makes the blocks before it exactly ours.
  const sealed = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-CBC", iv: aesIv }, aesKey, plain));
  return toBase64(sealed.subarray(0, plain.length));
}

async function decrypt(encrypted) {
  const sealed = fromBase64(encrypted);
  // WebCrypto insists on removing a 16-byte PKCS#7 block: append one that decrypts to exactly that. Encrypting
  // 16 x 0x10 with the last ciphertext block as IV yields it (CBC: P = D(E) xor previous block).
  const previous = sealed.subarray(sealed.length - 16);
  const extra = new Uint8Array(await crypto.subtle.encrypt(
    { name: "AES-CBC", iv: previous }, aesKey, new Uint8Array(16).fill(16))).subarray(0, 16);
  const plain = new Uint8Array(await crypto.subtle.decrypt(
    { name: "AES-CBC", iv: aesIv }, aesKey, concat(sealed, extra)));
  const unpadded = plain.subarray(0, plain.length - plain[plain.length - 1]);
  const length = new DataView(unpadded.buffer, unpadded.byteOffset + 16, 4).getUint32(0);
  return decoder.decode(unpadded.subarray(20, 20 + length));
}

// --- the callback exchange -------------------------------------------------------------------------------------

async function callback(payload) {
  const timestamp = String(Math.floor(Date.now() / 1000));
  const nonce = randomHex(8);
  const encrypted = await encrypt(JSON.stringify(payload));
  const signature = await sign(timestamp, nonce, encrypted);
  const url = `${config.callback_path}?msg_signature=${signature}&timestamp=${timestamp}&nonce=${nonce}`;
  const entry = logExchange(payload);
  let response;
  try {
    response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                  body: JSON.stringify({ encrypt: encrypted }) });
  } catch (error) {
    entry.fail(`network error: ${error}`);
    throw error;
  }
  const text = await response.text();
  if (response.status !== 200) {
    entry.fail(`HTTP ${response.status} ${text}`);
    throw new Error(`HTTP ${response.status}`);
  }
  if (!text) { entry.done("(empty reply)"); return null; }
  const envelope = JSON.parse(text);
  const expected = await sign(envelope.timestamp, envelope.nonce, envelope.encrypt);
  if (envelope.nonce !== nonce || envelope.msgsignature !== expected) {
    entry.fail("reply signature or nonce does not match");
    throw new Error("bad reply signature");
  }
  const reply = JSON.parse(await decrypt(envelope.encrypt));
  entry.done(reply, envelope);
  return reply;
}

function basePayload(msgtype) {
  const userid = document.getElementById("userid").value.trim() || "alice";
  const chatid = document.getElementById("chatid").value.trim();
  const payload = { msgid: randomHex(16), aibotid: config.aibotid, chattype: chatid ? "group" : "single",
                    from: { userid }, msgtype };
  if (chatid) payload.chatid = chatid;
  return payload;
}

// --- the chat -----------------------------------------------------------------------------------------------------

// Follow the conversation as it grows, unless the user has scrolled up to read something earlier.
const FOLLOW_SLACK_PX = 40;

function followingTheEnd(list) {
  return list.scrollHeight - list.scrollTop - list.clientHeight <= FOLLOW_SLACK_PX;
}

function changeMessages(change) {
  const list = document.getElementById("messages");
  const follow = followingTheEnd(list);
  const result = change(list);
  if (follow) list.scrollTop = list.scrollHeight;
  return result;
}

// A message as WeCom draws it: the sender's avatar and name beside the bubble (yours on the right). A system line
// (a welcome, a switch of bot) stands alone in the middle. Returns the bubble.
function addMessage(kind, html, sender) {
  return changeMessages((list) => {
    const element = document.createElement("div");
    element.className = `msg ${kind}`;
    element.innerHTML = html;
    if (kind.startsWith("system")) {
      list.appendChild(element);
      return element;
    }
    const mine = kind.startsWith("user");
    const name = sender || (mine ? currentUser() : config.display_name);
    const row = document.createElement("div");
    row.className = `row ${mine ? "mine" : "theirs"}`;
    const avatar = document.createElement("div");
    avatar.className = `avatar ${mine ? "person" : "bot"}`;
    avatar.textContent = mine ? name.slice(0, 1).toUpperCase() : "AI";
    const column = document.createElement("div");
    column.className = "column";
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = name;
    column.append(who, element);
    row.append(avatar, column);
    list.appendChild(row);
    return element;
  });
}

function currentUser() {
  return document.getElementById("userid").value.trim() || "alice";
}

// `note` stays under the bubble (a failure, a cut); `debug` (how many polls or frames it took) shows only with
// "debug details" ticked.
function showBubble(bubble, stream, finished, note, debug) {
  changeMessages(() => renderBubble(bubble, stream, finished, note, debug));
}

function renderBubble(bubble, stream, finished, note, debug) {
  let html = renderMarkdown(stream.content || "");
  for (const item of stream.msg_item || []) {
    if (item.msgtype === "image") html += `<img alt="image" src="data:image/png;base64,${item.image.base64}">`;
  }
  if (note) html += `<div class="status">${escapeHtml(note)}</div>`;
  if (debug) html += `<div class="status debug">${escapeHtml(debug)}</div>`;
  bubble.innerHTML = html;
  bubble.classList.toggle("streaming", !finished);
  bubble.dataset.finished = finished ? "true" : "false";
  bubble.dataset.streamId = stream.id;
}

async function send(content) {
  if (config.mode === "long_connection") return sendOverWebSocket(content);
  addMessage("user", escapeHtml(content));
  const payload = basePayload("text");
  payload.text = { content };
  const responseUrl = await (await fetch("/console/api/response-url", { method: "POST" })).json();
  payload.response_url = responseUrl.url;
  const bubble = addMessage("bot streaming", "…");
  let reply;
  try {
    reply = await callback(payload);
  } catch (error) {
    bubble.classList.add("failed");
    showBubble(bubble, { id: "", content: "" }, true, `callback failed: ${error.message}`);
    return;
  }
  const stream = reply.stream;
  showBubble(bubble, stream, stream.finish);
  if (reply.template_card) showCard(reply.template_card, bubble);
  const started = Date.now();
  let finished = stream.finish;
  let polls = 0;
  while (!finished && Date.now() - started < POLL_WINDOW_MS) {
    await new Promise(resolve => setTimeout(resolve, POLL_INTERVAL_MS));
    const poll = basePayload("stream");
    poll.stream = { id: stream.id };
    try {
      const next = await callback(poll);
      polls += 1;
      finished = next.stream.finish;
      if (next.template_card) showCard(next.template_card, bubble);
      showBubble(bubble, next.stream, finished, "", finished ? `finished after ${polls} poll${polls === 1 ? "" : "s"}` : "");
    } catch (error) {
      showBubble(bubble, { id: stream.id, content: bubble.textContent }, false, `poll failed (${error.message}); retrying`);
    }
    refreshRedis(stream.id);
  }
  if (!finished) showBubble(bubble, { id: stream.id, content: bubble.textContent }, true, "WeCom stopped polling (6 minutes)");
  addFeedback(bubble, stream.feedback && stream.feedback.id);
  refreshRedis(stream.id, bubble);
  setTimeout(() => refreshRedis(stream.id), AUDIT_SWEEP_MS);  // the message's audit row, written after its end
  watchResponseUrl(responseUrl.code);
}

// A long-connection bot has no callback URL: WeCom's WebSocket stand-in (started by the demo) delivers the message,
// and the page shows the frames the bot answered on its req_id, as WeCom's client would.
async function sendOverWebSocket(content) {
  addMessage("user", escapeHtml(content));
  const bubble = addMessage("bot streaming", "…");
  const response = await fetch(`/console/api/ws/${encodeURIComponent(config.name)}/message`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: content }),
  });
  const sent = await response.json();
  if (!response.ok) {
    showBubble(bubble, { id: "", content: "" }, true, sent.message || "the message was not delivered");
    return;
  }
  const proactiveBefore = (await wsFrames(sent.req_id)).proactive.length;
  const started = Date.now();
  let last = null;
  while (Date.now() - started < POLL_WINDOW_MS) {
    await new Promise(resolve => setTimeout(resolve, POLL_INTERVAL_MS / 2));
    const { frames, proactive } = await wsFrames(sent.req_id);
    for (const frame of frames) {
      if (frame.template_card && !bubble.dataset.card) showCard(frame.template_card, bubble);
    }
    if (frames.length) {
      last = frames[frames.length - 1].stream;
      showBubble(bubble, last, last.finish, "", last.finish ? `${frames.length} frames over the WebSocket` : "");
      refreshRedis(last.id);
    }
    if (last && last.finish) {
      const first = frames[0].stream;
      refreshRedis(last.id, bubble);
      setTimeout(() => refreshRedis(last.id), AUDIT_SWEEP_MS);
      return addFeedback(bubble, first.feedback && first.feedback.id);
    }
    if (proactive.length > proactiveBefore) return;  // the req_id died: the rest came as aibot_send_msg (shown below)
  }
}

async function wsFrames(reqId, bot = config) {
  const url = `/console/api/ws/${encodeURIComponent(bot.name)}/frames/${encodeURIComponent(reqId)}`;
  return (await fetch(url)).json();
}

// --- 👍/👎 under a finished answer: WeCom's feedback_event, on the reply's feedback id ---------------------------

const ACCURATE = 1, INACCURATE = 2, CANCELLED = 3;

function addFeedback(bubble, feedbackId) {
  const column = bubble.parentElement;
  if (!feedbackId || !column || column.querySelector(".feedback")) return;
  const bar = document.createElement("div");
  bar.className = "feedback";
  let rated = 0;
  // The words beside each thumb: a machine without an emoji font still shows what each button does.
  for (const [type, label, title] of [[ACCURATE, "👍 有用", "accurate"], [INACCURATE, "👎 没用", "inaccurate"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.title = title;
    button.dataset.type = String(type);
    button.addEventListener("click", async () => {
      const chosen = rated === type ? CANCELLED : type;  // a second tap takes the rating back, as in WeCom
      await sendFeedback(feedbackId, chosen);
      rated = chosen === CANCELLED ? 0 : chosen;
      for (const each of bar.children) each.classList.toggle("chosen", Number(each.dataset.type) === rated);
    });
    bar.appendChild(button);
  }
  changeMessages(() => column.appendChild(bar));
}

async function sendFeedback(id, type) {
  const feedback = { id, type };
  if (config.mode === "long_connection") {
    await fetch(`/console/api/ws/${encodeURIComponent(config.name)}/feedback`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ feedback }),
    });
    return;
  }
  const payload = basePayload("event");
  payload.create_time = Math.floor(Date.now() / 1000);
  payload.event = { eventtype: "feedback_event", feedback_event: feedback };
  await callback(payload);  // WeCom expects an empty reply
}

async function watchResponseUrl(code) {
  for (let i = 0; i < 60; i++) {
    const { messages } = await (await fetch(`/console/api/response/${code}`)).json();
    if (messages.length) {
      const markdown = messages[0].markdown ? messages[0].markdown.content : JSON.stringify(messages[0]);
      addMessage("bot", renderMarkdown(markdown) + '<div class="status">separate message (response_url)</div>');
      return;
    }
    await new Promise(resolve => setTimeout(resolve, 2000));
  }
}

async function enterChat() {
  if (config.mode === "long_connection") {
    const response = await fetch(`/console/api/ws/${encodeURIComponent(config.name)}/message`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ event: "enter_chat" }),
    });
    const sent = await response.json();
    for (let i = 0; i < 20 && response.ok; i++) {
      await new Promise(resolve => setTimeout(resolve, 250));
      const { welcome } = await wsFrames(sent.req_id);
      if (welcome) return showWelcome(welcome);
    }
    return addMessage("system", sent.message || NO_WELCOME);
  }
  const payload = basePayload("event");
  payload.create_time = Math.floor(Date.now() / 1000);
  payload.event = { eventtype: "enter_chat", enter_chat: {} };
  showWelcome(await callback(payload));
}

const NO_WELCOME = "(this bot says nothing when a chat opens: give it a welcome_message, or its Dify app an opening statement)";

function showWelcome(reply) {
  if (!reply) return addMessage("system", NO_WELCOME);
  if (reply.template_card) return showCard(reply.template_card, null);
  return addMessage("system", escapeHtml(reply.text.content));
}

// --- template cards: drawn as WeCom shows them; a tap goes back the way WeCom sends it ------------------------

function showCard(card, bubble) {
  if (bubble) bubble.dataset.card = "shown";
  const element = addMessage("bot card", "");
  drawCard(element, card);
  return element;
}

const SPENT_KEY = "#done";  // the key of an answered card's button (services/forms/cards.py, DONE_KEY)

function drawCard(element, card) {
  changeMessages(() => {
    element.innerHTML = "";
    element.dataset.taskId = card.task_id || "";
    const title = card.main_title || {};
    const head = document.createElement("div");
    head.className = "card-title";
    head.textContent = title.title || "";
    element.appendChild(head);
    if (title.desc) {
      const desc = document.createElement("div");
      desc.className = "card-desc";
      desc.textContent = title.desc;
      element.appendChild(desc);
    }
    if (card.sub_title_text) {
      const text = document.createElement("div");
      text.className = "card-text";
      text.textContent = card.sub_title_text;
      element.appendChild(text);
    }
    const selects = [];
    const selectors = card.select_list || (card.button_selection ? [card.button_selection] : []);
    for (const selector of selectors) {
      const label = document.createElement("label");
      label.textContent = `${selector.title || selector.question_key} `;
      const select = document.createElement("select");
      select.dataset.questionKey = selector.question_key;
      select.disabled = !!selector.disable;
      for (const option of selector.option_list) select.add(new Option(option.text, option.id));
      if (selector.selected_id) select.value = selector.selected_id;
      label.appendChild(select);
      element.appendChild(label);
      selects.push(select);
    }
    const buttons = card.button_list || (card.submit_button ? [card.submit_button] : []);
    for (const spec of buttons) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "card-button";
      button.textContent = spec.text;
      if (spec.key.endsWith(SPENT_KEY)) {  // an answered card's one button: it says what was chosen, nothing more
        button.classList.add("spent");
        button.disabled = true;
      } else {
        button.addEventListener("click", () => tapCard(element, card, spec.key, selects));
      }
      element.appendChild(button);
    }
    for (const jump of card.jump_list || []) {
      const link = document.createElement("a");
      link.href = "#";
      link.className = "card-question";
      link.textContent = jump.title;
      link.addEventListener("click", (event) => { event.preventDefault(); send(jump.question || jump.title); });
      element.appendChild(link);
    }
  });
}

function cardEvent(card, key, selects) {
  const event = { card_type: card.card_type, event_key: key, task_id: card.task_id || "" };
  const items = selects.map(s => ({ question_key: s.dataset.questionKey, option_ids: { option_id: [s.value] } }));
  if (items.length) event.selected_items = { selected_item: items };
  return event;
}

// A tap is a template_card_event: WeCom posts it to the callback URL with a fresh response_url (or, for a
// long-connection bot, sends it down the WebSocket); the answer updates the card.
async function tapCard(element, card, key, selects) {
  const event = cardEvent(card, key, selects);
  if (config.mode === "long_connection") {
    const response = await fetch(`/console/api/ws/${encodeURIComponent(config.name)}/click`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ event }),
    });
    const sent = await response.json();
    for (let i = 0; i < 40 && response.ok; i++) {
      await new Promise(resolve => setTimeout(resolve, 125));
      const { update } = await wsFrames(sent.req_id);
      if (update) { drawCard(element, update.template_card); break; }
    }
    return;  // a late tap: the rest of the run comes as aibot_send_msg (watchProactiveMessages shows it)
  }
  const payload = basePayload("event");
  delete payload.msgid;
  payload.create_time = Math.floor(Date.now() / 1000);
  payload.event = { eventtype: "template_card_event", template_card_event: event };
  const responseUrl = await (await fetch("/console/api/response-url", { method: "POST" })).json();
  payload.response_url = responseUrl.url;
  const reply = await callback(payload);
  if (reply && reply.template_card) drawCard(element, reply.template_card);
  watchResponseUrl(responseUrl.code);  // a late tap: the rest of the run comes as a separate message
}

// Everything each long-connection bot sends on its own (aibot_send_msg): the rest of an answer whose req_id died,
// a late form's run, a push from the push API, also one sent before the page opened. Shown once each, under the
// bot's name, whichever bot the page talks to.
const proactiveShown = {};

async function watchProactiveMessages() {
  for (;;) {
    for (const bot of bots.filter(each => each.mode === "long_connection")) {
      let proactive = [];
      try {
        ({ proactive } = await wsFrames("-", bot));
      } catch (error) {
        continue;  // the demo is starting or stopping
      }
      for (const message of proactive.slice(proactiveShown[bot.name] || 0)) {
        const markdown = message.markdown ? message.markdown.content : JSON.stringify(message);
        addMessage("bot", renderMarkdown(markdown) + '<div class="status">separate message (aibot_send_msg)</div>',
                   bot.display_name);
      }
      proactiveShown[bot.name] = proactive.length;
    }
    await new Promise(resolve => setTimeout(resolve, 1000));
  }
}

// What the bots' group robots say in their groups (the push API's webhooks, a schedule's report), shown once each.
let robotShown = 0;

async function watchRobotMessages() {
  for (;;) {
    try {
      const { messages } = await (await fetch("/console/api/robots")).json();
      for (const message of messages.slice(robotShown)) {
        const body = message.body;
        const content = body.markdown ? body.markdown.content : (body.text ? body.text.content : JSON.stringify(body));
        addMessage("bot", renderMarkdown(content) + '<div class="status">group robot (webhook)</div>',
                   `🤖 ${message.robot}`);
      }
      robotShown = messages.length;
    } catch (error) {
      // the demo is starting or stopping
    }
    await new Promise(resolve => setTimeout(resolve, 1000));
  }
}

async function refreshRedis(streamId, bubble = null) {
  const response = await fetch(`/console/api/stream/${encodeURIComponent(streamId)}?bot=${encodeURIComponent(config.name)}`);
  const info = await response.json();
  document.getElementById("redis").textContent = JSON.stringify(info, null, 2);
  if (bubble && info.meta) showRoute(bubble, info.meta);
}

// Under a finished answer: which of the bot's routes gave it (its backend), as `flask bots which` would say.
function showRoute(bubble, meta) {
  const column = bubble.parentElement;
  if (!column || !meta.backend || column.querySelector(".route")) return;
  const line = document.createElement("div");
  line.className = "route";
  line.textContent = meta.route ? `route “${meta.route}” · ${meta.backend}` : `the bot's own app · ${meta.backend}`;
  changeMessages(() => column.appendChild(line));
}

function logExchange(payload) {
  const element = document.createElement("div");
  element.className = "entry";
  element.innerHTML = `<div>→ ${escapeHtml(payload.msgtype)} ${new Date().toLocaleTimeString()}</div>` +
    `<pre>${escapeHtml(JSON.stringify(payload))}</pre>`;
  const list = document.getElementById("exchange");
  list.prepend(element);
  while (list.children.length > 30) list.lastChild.remove();
  return {
    done(reply, envelope) {
      const sealed = envelope ? `<pre>encrypted reply: ${escapeHtml(JSON.stringify(envelope).slice(0, 160))}…</pre>` : "";
      element.innerHTML += `${sealed}<div>← reply</div><pre>${escapeHtml(typeof reply === "string" ? reply : JSON.stringify(reply))}</pre>`;
    },
    fail(message) {
      element.classList.add("error");
      element.innerHTML += `<div>← error</div><pre>${escapeHtml(message)}</pre>`;
    },
  };
}

// --- markdown, the subset WeCom renders (HTML is escaped first, so answers cannot inject markup) ----------------

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  return text
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/\*([^*]+)\*/g, "<em>$1</em>")
    .replace(/!\[([^\]]*)\]\((https?:[^)\s]+)\)/g, '<img alt="$1" src="$2">')
    .replace(/\[([^\]]+)\]\((https?:[^)\s]+)\)/g, '<a href="$2" target="_blank" rel="noopener">$1</a>');
}

function renderMarkdown(source) {
  let text = escapeHtml(source);
  text = text.replace(/&lt;think&gt;([\s\S]*?)(&lt;\/think&gt;|$)/g,
                      (_, inner) => `<details class="think"><summary>thinking</summary>${inner}</details>`);
  const out = [];
  let list = null;
  let table = null;
  const closeBlocks = () => {
    if (list) { out.push(`</${list}>`); list = null; }
    if (table) { out.push("</table>"); table = null; }
  };
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      closeBlocks();
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      out.push(`<pre><code>${code.join("\n")}</code></pre>`);
      continue;
    }
    let match;
    if ((match = line.match(/^(#{1,6})\s+(.*)$/))) {
      closeBlocks(); out.push(`<h${match[1].length}>${inline(match[2])}</h${match[1].length}>`);
    } else if ((match = line.match(/^\s*[-*+]\s+(.*)$/)) || (match = line.match(/^\s*\d+[.)]\s+(.*)$/))) {
      const kind = /^\s*\d/.test(line) ? "ol" : "ul";
      if (table) { out.push("</table>"); table = null; }
      if (list !== kind) { if (list) out.push(`</${list}>`); out.push(`<${kind}>`); list = kind; }
      out.push(`<li>${inline(match[1])}</li>`);
    } else if ((match = line.match(/^&gt;\s?(.*)$/))) {
      closeBlocks(); out.push(`<blockquote>${inline(match[1])}</blockquote>`);
    } else if (/^\s*(-{3,}|\*{3,})\s*$/.test(line)) {
      closeBlocks(); out.push("<hr>");
    } else if (/^\s*\|.*\|\s*$/.test(line)) {
      if (/^\s*\|[\s:|-]+\|\s*$/.test(line)) continue;  // the header separator row
      if (list) { out.push(`</${list}>`); list = null; }
      if (!table) { out.push("<table>"); table = true; }
      const cells = line.trim().slice(1, -1).split("|").map(cell => `<td>${inline(cell.trim())}</td>`);
      out.push(`<tr>${cells.join("")}</tr>`);
    } else if (line.trim() === "") {
      closeBlocks();
    } else {
      closeBlocks(); out.push(`<p>${inline(line)}</p>`);
    }
  }
  closeBlocks();
  return out.join("");
}

// --- start -------------------------------------------------------------------------------------------------------------

async function useBot(index) {
  config = bots[index];
  const overWebSocket = config.mode === "long_connection";
  document.getElementById("hint").textContent = overWebSocket
    ? "local console (demo mode): messages reach this bot as WeCom's WebSocket stand-in delivers them"
    : "local console (demo mode): this page plays WeCom against the real callback endpoint";
  document.getElementById("exchange-title").textContent = overWebSocket ? "Callback exchange (other bots)" : "Callback exchange";
  if (overWebSocket) return;  // no callback crypto: WeCom's WebSocket carries it
  const keyBytes = fromBase64(config.encoding_aes_key + "=");
  aesIv = keyBytes.slice(0, 16);
  aesKey = await crypto.subtle.importKey("raw", keyBytes, "AES-CBC", false, ["encrypt", "decrypt"]);
}

async function start() {
  bots = (await (await fetch("/console/api/config")).json()).bots;
  await useBot(0);
  const picker = document.getElementById("bot");
  bots.forEach((bot, index) => picker.add(new Option(`${bot.name} (${bot.callback_path})`, index)));
  document.getElementById("bot-picker").hidden = bots.length < 2;
  picker.addEventListener("change", async () => {
    await useBot(Number(picker.value));
    addMessage("system", `now talking to ${escapeHtml(config.name)}`);
  });
  const form = document.getElementById("composer");
  const input = document.getElementById("input");
  form.addEventListener("submit", event => {
    event.preventDefault();
    const content = input.value.trim();
    if (!content) return;
    input.value = "";
    send(content);
  });
  input.addEventListener("keydown", event => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("enter").addEventListener("click", enterChat);
  document.getElementById("debug").addEventListener("change", event => {
    document.body.classList.toggle("debug", event.target.checked);
  });
  document.body.dataset.ready = "true";
  watchProactiveMessages();
  watchRobotMessages();
}

start();
