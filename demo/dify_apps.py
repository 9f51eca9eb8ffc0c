"""Scenario steps for Dify's newer app types and events (docs/protocol.md, Dify), for the Dify
stand-in (demo/dify_standin.py): the agent app's closing message, text chunks labelled message_file, reasoning,
annotation replies, a run paused for a person, workflow runs with and without text chunks, chatflow answers."""

from __future__ import annotations

import io
import re
import time

from PIL import Image, ImageDraw

from demo.dify_standin import answer, end, event, knowledge_text, message, sleep, tool_file

# --- scenario steps ------------------------------------------------------------------------------------------


def agent_answer(text: str, pieces: int = 4) -> list[tuple]:
    """Dify's newer Agent app: agent_message deltas, then one `message` carrying the whole answer again."""
    size = max(1, -(-len(text) // pieces))
    deltas = [event("agent_message", answer=text[i : i + size]) for i in range(0, len(text), size)]
    return [*deltas, message(text), end()]


def agent_with_a_tool(english: bool) -> list[tuple]:
    """The demo's agent: it calls a weather tool that takes a few seconds (the bubble names the tool while it runs),
    then answers; its closing message, which repeats the whole answer, is shown once."""
    tool = {"id": "thought-1", "position": 1, "thought": "", "tool": "weather", "tool_input": '{"city": "Shanghai"}'}
    text = (
        "Shanghai is sunny today, 22 °C. (The agent called its weather tool: the bubble named it while it ran.)"
        if english
        else "上海今天晴，22 °C。（智能体调用了天气工具：工具运行时，气泡显示了它的名字。）"
    )
    called = event("agent_thought", **tool, observation="")
    answered = event("agent_thought", **tool, observation='{"weather": "sunny", "temperature": 22}')
    return [called, sleep(4.0), answered, *agent_answer(text)]


def file_then_text(url: str, text: str, pieces: int = 3) -> list[tuple]:
    """An assistant file first, so every later text chunk of the message arrives labelled `message_file`."""
    size = max(1, -(-len(text) // pieces))
    chunks = [
        event("message_file", answer=text[i : i + size], belongs_to="assistant") for i in range(0, len(text), size)
    ]
    file = event("message_file", type="image", belongs_to="assistant", url=url, id="file-1")
    return [file, *chunks, end()]


def reasoning(text: str, final: bool = False) -> tuple:
    """A chatflow LLM node's separated reasoning (not answer text)."""
    return event("reasoning_chunk", data={"reasoning": text, "is_final": final, "node_id": "llm"})


def annotation_answer(text: str) -> list[tuple]:
    """An annotation reply: the stored answer, one character per chunk every 10 ms, then message_end naming it."""
    steps: list[tuple] = []
    for character in text:
        steps += [message(character), sleep(0.01)]
    metadata = {"annotation_reply": {"id": "annotation-1", "account": {"id": "a1", "name": "admin"}}, "usage": {}}
    return [*steps, event("message_end", metadata=metadata)]


def input_required(before: str = "") -> list[tuple]:
    """A run that stops for a person, whose form the service API cannot drive (a null form_token: delivered by
    e-mail): some text, human_input_required, workflow_paused, and the stream ends."""
    form = {"form_token": None, "form_content": "Approve?", "expiration_time": int(time.time()) + 3600}
    return [*([message(before)] if before else []), event("human_input_required", data=form), paused()]


APPROVE_REJECT = (("approve", "Approve", "primary"), ("reject", "Reject", "default"))


def form(
    content: str = "Approve the purchase of 3 laptops?",
    actions=APPROVE_REJECT,
    branches: dict | None = None,
    inputs: list | None = None,
    **spec,
) -> tuple:
    """A Human Input node: the run pauses here for a form (the stand-in serves it at /form/human_input/{token});
    after its answer, the run goes on with `branches[action]` (or `branches["*"]`)."""
    if branches is None:
        branches = {"*": [sleep(0.3), message(" The request was handled."), workflow_done({"answer": "ok"}), end()]}
    return ("form", {"content": content, "actions": actions, "branches": branches, "inputs": inputs or [], **spec})


def text_input(name: str, label: str = "", default: str = "") -> dict:
    """A form input the user types, as Dify 1.14 describes it (`default`: a constant default, which the gateway
    submits without asking). Dify gives no label; a test may add one (the gateway shows it instead of the name)."""
    spec = {"type": "paragraph", "output_variable_name": name}
    spec["default"] = {"type": "constant", "selector": [], "value": default}
    return spec | ({"label": label} if label else {})


def select_input(name: str, options: list[str], label: str = "") -> dict:
    """A form input chosen from options."""
    return {"type": "select", "output_variable_name": name, "label": label or name, "options": options}


def approval_run(before: str, english: bool) -> list[tuple]:
    """The demo's approval app: a chatflow that asks for an approval and answers after it."""
    if english:
        content, approved, rejected = "**Purchase request**: 3 laptops, 21,000 CNY. Approve?", "Approved", "Rejected"
        actions = APPROVE_REJECT
    else:
        content, approved, rejected = "**采购申请**：笔记本电脑 3 台，共 21,000 元。是否同意？", "已同意", "已拒绝"
        actions = (("approve", "同意", "primary"), ("reject", "拒绝", "default"))

    def after(verdict: str) -> list[tuple]:
        text = f"\n\n**{verdict}**. " + ("The requester has been told." if english else "已通知申请人。")
        deltas = answer(text, pieces=4)[:-1]  # without its message_end: the run's end comes after its outputs
        return [sleep(0.4), *deltas, workflow_done({"answer": text}), end()]

    branches = {"approve": after(approved), "reject": after(rejected)}
    title = "Approval" if english else "审批"
    return [workflow_started(), message(before), form(content, actions, branches, title=title)]


def paused() -> tuple:
    return event("workflow_paused", data={"paused_nodes": ["human"], "reasons": ["human_input_required"]})


def workflow_started() -> tuple:
    return event("workflow_started", data={"workflow_id": "wf-1", "inputs": {}})


def text_chunk(text: str) -> tuple:
    return event("text_chunk", data={"text": text, "from_variable_selector": ["llm", "text"]})


def workflow_done(outputs: dict | None = None, status: str = "succeeded", error: str | None = None) -> tuple:
    data = {"status": status, "outputs": outputs or {}, "error": error, "elapsed_time": 0.4, "total_tokens": 21}
    return event("workflow_finished", data=data)


def workflow_run(text: str, pieces: int = 4, chunks: bool = True, output: str = "text", delay: float = 0.0):
    """A workflow app's run: its answer in text_chunks (or, without `chunks`, only in the output `output`)."""
    size = max(1, -(-len(text) // pieces))
    steps: list[tuple] = [workflow_started(), event("node_started", data={"node_id": "llm", "node_type": "llm"})]
    if chunks:
        for i in range(0, len(text), size):
            steps.append(text_chunk(text[i : i + size]))
            if delay:
                steps.append(sleep(delay))
    return [*steps, workflow_done({output: text, "other": 7})]


def chatflow_answer(text: str, pieces: int = 4, delay: float = 0.0) -> list[tuple]:
    """A chatflow (advanced-chat) answer: workflow events around message deltas, outputs.answer at the end."""
    size = max(1, -(-len(text) // pieces))
    steps: list[tuple] = [workflow_started()]
    for i in range(0, len(text), size):
        steps.append(message(text[i : i + size]))
        if delay:
            steps.append(sleep(delay))
    return [*steps, workflow_done({"answer": text}), end()]


def demo_workflow(query: str, language: str) -> list[tuple]:
    """The unscripted answer of a workflow app."""
    if language == "en":
        text = f"**Workflow run** (Dify stand-in)\n\nThe workflow read your input “{query[:200]}” and produced this."
    else:
        text = f"**工作流运行结果**（Dify 替身）\n\n工作流读取了你的输入「{query[:200]}」，生成了这段结果。"
    return workflow_run(text, pieces=12, delay=0.05)


def demo_extra(query: str, language: str) -> list[tuple] | None:
    """Unscripted demo answers that show the newer events: 'think' (reasoning first: shown with
    SHOW_REASONING=true), 'agent' (the agent app's closing message), 'form' or '审批' (a run that waits for a
    person's approval, shown as a card), 'report' or '报告' (an agent that makes a chart and a PDF), 'handbook' or
    '手册' (a knowledge-base answer with a picture and its sources), 'search' or '搜索' (a slow tool: the status
    line while it runs), 'mask' or '屏蔽' (words the demo's content rules mask, one split over two deltas)."""
    words = set(re.findall(r"[a-z]+", query.lower()))
    english = language == "en"
    if "think" in words:
        thought = "The user wants to see reasoning. " if english else "用户想看看推理过程。"
        answer = "Here is the answer after thinking." if english else "这是思考之后的回答。"
        return [reasoning(thought), reasoning("…", final=True), message(answer), end()]
    if "agent" in words:
        return agent_with_a_tool(english)
    if "report" in words or "报告" in query:
        return report_answer(english)
    if "form" in words or "approve" in words or "审批" in query:
        return approval_run("I need an approval first." if english else "需要先审批。", english)
    if "handbook" in words or "手册" in query:
        return knowledge_answer(english)
    if "search" in words or "搜索" in query:
        return slow_tool_answer(english)
    if "mask" in words or "屏蔽" in query:
        return masked_words_answer(english)
    return None


def masked_words_answer(english: bool) -> list[tuple]:
    """An answer naming words of the demo's content rules (demo/content-rules.txt), one split over two deltas: the
    bubble shows them masked, and never half of one."""
    if english:
        parts = [
            "The file mentions the code name 绝密",
            "代号 once, ",
            "and a phone number 138-1234-",
            "5678. ",
            "Done.",
        ]
    else:
        parts = ["文件里提到了绝密", "代号一次，", "还有一个电话 138-1234-", "5678。", "就这些。"]
    steps = []
    for part in parts:
        steps += [message(part), sleep(0.4)]
    return [*steps, end()]


def knowledge_answer(english: bool) -> list[tuple]:
    """A knowledge-base answer: its text holds the knowledge base's picture as a relative Dify link (the gateway
    puts the picture under the bubble), and message_end names the documents it drew on (listed as sources)."""
    text = "Employees get 12 days of annual leave." if english else "根据员工手册，年假为每年 12 天。"
    names = ["Employee handbook.pdf", "Leave policy.docx"] if english else ["员工手册.pdf", "休假制度.docx"]
    resources = [{"position": n, "document_name": name, "dataset_name": "HR"} for n, name in enumerate(names, 1)]
    metadata = {"usage": {"total_tokens": 30, "latency": 0.4}, "retriever_resources": resources}
    return [
        *answer(text, pieces=4)[:-1],
        knowledge_text("\n\n![image]({url})", bar_chart([12, 10, 15, 12])),
        event("message_end", metadata=metadata),
    ]


def slow_tool_answer(english: bool) -> list[tuple]:
    """A chatflow that calls a slow tool: after 3 s without text the bubble says which step runs."""
    title = "Web search" if english else "联网搜索"
    node = {"id": "exec-search", "node_id": "search", "node_type": "tool", "title": title}
    before = "Let me look that up." if english else "我来查一下。"
    after = " Found it: the office opens at 9." if english else "查到了：办公室早上 9 点开门。"
    return [
        message(before),
        event("node_started", data=node),
        sleep(4.5),
        event("node_finished", data={**node, "status": "succeeded"}),
        *answer(after, pieces=3),
    ]


def report_answer(english: bool) -> list[tuple]:
    """An agent that makes files: a chart (an image, shown in the bubble) and a PDF report (a link that downloads
    it)."""
    text = "Here is the quarterly report, with a chart." if english else "这是季度报告，附图表。"
    name = "quarterly-report.pdf" if english else "季度报告.pdf"
    return [
        *answer(text, pieces=4)[:-1],
        tool_file(bar_chart([3, 5, 4, 7]), "png", "image", "chart.png"),
        tool_file(pdf_document(text), "pdf", "document", name),
        end(),
    ]


def bar_chart(values: list[int]) -> bytes:
    """A small PNG bar chart."""
    image = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(image)
    for index, value in enumerate(values):
        left = 30 + index * 70
        draw.rectangle([left, 190 - value * 22, left + 40, 190], fill=(7, 193, 96))
    draw.line([20, 190, 310, 190], fill="black")
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    return encoded.getvalue()


def pdf_document(text: str) -> bytes:
    """A one-page PDF (ASCII text only: a demo file to download)."""
    line = "".join(c for c in text if c.isascii()) or "Quarterly report"
    stream = f"BT /F1 18 Tf 72 720 Td ({line}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    body, offsets = b"%PDF-1.4\n", []
    for number, obj in enumerate(objects, 1):
        offsets.append(len(body))
        body += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    body += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return body + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
