"""Dify apps as small graphs the stand-in runs the way a real Dify 1.14.2 and 1.16.0 do (demo/dify_runs.py has the
run itself): the apps whose streams were captured (tests/fixtures/dify-1.14.2/apps and dify-1.16.0/apps), and any
like them a test needs.

A graph is a chain of nodes after Start; an If/Else or a Human Input node chooses the chain that follows. Running
it gives the stand-in's scenario steps, in the order Dify's engine publishes them (read off the captures):

- an Answer's text (a workflow End's outputs, as `text_chunk`s joined by "\\n") streams as soon as the node before
  it has its outputs: the Start node's before its own `node_started`, an HTTP node's, a form's or an If/Else's
  before their `node_finished`; one `message` per literal part and per variable of the template;
- the nodes' `node_started`/`node_finished` follow; a chatflow ends with `message_end`, then `workflow_finished`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from demo.dify_standin import event, sleep

_VARIABLE = re.compile(r"\{\{#([A-Za-z0-9_.]+)#\}\}")


@dataclass(frozen=True)
class Answer:
    """An Answer node (chatflow): its template is streamed as it can be rendered."""

    id: str
    text: str
    title: str = "Answer"
    type = "answer"


@dataclass(frozen=True)
class End:
    """A workflow's End node: `outputs` (name, template) are the run's outputs, streamed as text chunks."""

    outputs: tuple[tuple[str, str], ...]
    id: str = "end"
    title: str = "End"
    type = "end"


@dataclass(frozen=True)
class Wait:
    """An HTTP Request node whose server takes `seconds` to answer `body` (`{{#<id>.body#}}`)."""

    id: str
    seconds: float
    body: str = "SLEPT"
    title: str = "Wait"
    type = "http-request"


@dataclass(frozen=True)
class Approval:
    """A Human Input node: the run pauses for its form; `then` is the chain after any action (`{{#<id>.<input>#}}`
    and `{{#<id>.__action_id#}}` name what was submitted); `on_timeout` the chain when it expires unanswered;
    `service_api` False: a form Dify delivers only through its own channels (the Service API answers 404)."""

    id: str
    content: str
    actions: tuple[tuple[str, str, str], ...]
    inputs: tuple[dict, ...] = ()
    then: tuple = ()
    on_timeout: tuple = ()
    title: str = "Approval"
    expires_in: float = 3600
    service_api: bool = True
    type = "human-input"


@dataclass(frozen=True)
class Branch:
    """An If/Else node on one variable: `then` when it is `value`, else `otherwise`."""

    id: str
    variable: str
    value: str
    then: tuple
    otherwise: tuple
    title: str = "IF/ELSE"
    type = "if-else"


@dataclass(frozen=True)
class Flow:
    """A chatflow (`advanced-chat`) or workflow app: its nodes after Start, its environment variables, for a
    workflow the Start input that takes the question, and the Start node's variables as `/parameters` lists them
    (`user_input_form`; none: the stand-in's own)."""

    name: str
    mode: str
    nodes: tuple
    env: dict = field(default_factory=dict)
    query_input: str = "query"
    start_inputs: tuple[dict, ...] = ()

    def steps(self, query: str, inputs: dict | None = None) -> list[tuple]:
        """A run's scenario steps, for the question `query` and the run's inputs; a file input's value is the
        stand-in's account of the file (its attributes: `{{#start.<input>.name#}}`, `.url`, …), as Dify reads a
        file variable's attributes."""
        runner = _Runner(self, {"sys.query": query, **{f"env.{k}": v for k, v in self.env.items()}})
        for name, value in (inputs or {}).items():
            runner._bind(f"start.{name}", value)
        return runner.run()


class _Runner:
    def __init__(self, flow: Flow, scope: dict[str, str]):
        self.flow = flow
        self.scope = scope
        self.streamed: set[str] = set()

    def _bind(self, name: str, value) -> None:
        """A variable's value in the template scope: a file's attributes (`<name>.name`, `.url`, …) or its text."""
        if isinstance(value, dict):
            self.scope |= {f"{name}.{attribute}": str(v) for attribute, v in value.items()}
        else:
            self.scope[name] = str(value)

    def run(self) -> list[tuple]:
        start = {"id": "start", "type": "start", "title": "Start"}
        return [
            *self._lead(self.flow.nodes, "sys"),
            *_node_events(start),
            *self._chain(self.flow.nodes),
        ]

    def _chain(self, nodes: tuple) -> list[tuple]:
        steps: list[tuple] = []
        for index, node in enumerate(nodes):
            rest = nodes[index + 1 :]
            if isinstance(node, (Answer, End)):
                steps += self._text(node) if node.id not in self.streamed else []
                steps += _node_events(node, self._outputs(node))
            elif isinstance(node, Wait):
                self.scope[f"{node.id}.body"] = node.body
                steps += [_node_started(node), sleep(node.seconds), *self._lead(rest, node.id), _node_finished(node)]
            elif isinstance(node, Branch):
                chosen = node.then if self.scope.get(node.variable) == node.value else node.otherwise
                lead = self._lead(chosen, node.id)
                return [*steps, _node_started(node), *lead, _node_finished(node), *self._chain(chosen)]
            elif isinstance(node, Approval):
                return [*steps, self._form(node)]
        return steps + self._finish()

    def _form(self, node: Approval) -> tuple:
        def then(chain: tuple) -> Callable[[str, dict], list[tuple]]:
            def after(action: str, values: dict) -> list[tuple]:
                self.scope[f"{node.id}.__action_id"] = action
                for name, value in values.items():
                    self._bind(f"{node.id}.{name}", value)
                return [*self._lead(chain, node.id), _node_finished(node), *self._chain(chain)]

            return after

        spec = {
            "content": _render(node.content, self.scope),
            "template": node.content,
            "actions": node.actions,
            "inputs": list(node.inputs),
            "title": node.title,
            "node_id": node.id,
            "expires_in": node.expires_in,
            "service_api": node.service_api,
            "then": then(node.then),
            "timeout": then(node.on_timeout) if node.on_timeout else None,
        }
        return ("form", spec)

    def _lead(self, nodes: tuple, source: str) -> list[tuple]:
        """The text of the Answer or End nodes at the head of `nodes`, streamed now (their inputs are ready)."""
        steps: list[tuple] = []
        for node in nodes:
            if not isinstance(node, (Answer, End)):
                break
            steps += self._text(node)
            self.streamed.add(node.id)
        return steps

    def _text(self, node) -> list[tuple]:
        if isinstance(node, Answer):
            return [
                event("message", answer=text, from_variable_selector=selector)
                for text, selector in _segments(node.id, node.text, self.scope)
            ]
        values = [_render(template, self.scope) for _, template in node.outputs]
        chunks = [piece for n, value in enumerate(values) for piece in ((["\n"] if n else []) + [value])]
        return [event("text_chunk", data={"text": c, "from_variable_selector": [node.id]}) for c in chunks if c]

    def _outputs(self, node) -> dict:
        if isinstance(node, Answer):
            return {"answer": _render(node.text, self.scope), "files": []}
        return {name: _render(template, self.scope) for name, template in node.outputs}

    def _finish(self) -> list[tuple]:
        """A chatflow's end: message_end, then workflow_finished (the run fills in outputs.answer); a workflow's:
        workflow_finished with its End's outputs."""
        ends = [n for n in _walked(self.flow.nodes) if isinstance(n, End)]
        outputs = self._outputs(ends[-1]) if ends else {}
        finished = event("workflow_finished", data={"status": "succeeded", "outputs": outputs, "error": None})
        if self.flow.mode == "workflow":
            return [finished]
        usage = {"usage": {"total_tokens": 0, "latency": 0.1}, "annotation_reply": None, "retriever_resources": []}
        return [event("message_end", metadata=usage, files=[]), finished]


def _walked(nodes: tuple) -> list:
    """Every node of a graph, branches included."""
    found = []
    for node in nodes:
        found.append(node)
        for chain in (getattr(node, "then", ()), getattr(node, "otherwise", ()), getattr(node, "on_timeout", ())):
            found += _walked(chain)
    return found


def _node_started(node) -> tuple:
    return event("node_started", data={"node_id": node.id, "node_type": node.type, "title": node.title})


def _node_finished(node, outputs: dict | None = None) -> tuple:
    data = {"node_id": node.id, "node_type": node.type, "title": node.title, "status": "succeeded"}
    return event("node_finished", data=data | {"outputs": outputs or {}})


def _node_events(node, outputs: dict | None = None) -> list[tuple]:
    if isinstance(node, dict):
        node = _Named(node["id"], node["type"], node["title"])
    return [_node_started(node), _node_finished(node, outputs)]


@dataclass(frozen=True)
class _Named:
    id: str
    type: str
    title: str


def _render(template: str, scope: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: scope.get(m.group(1), ""), template)


def _segments(node_id: str, template: str, scope: dict[str, str]) -> list[tuple[str, list[str]]]:
    """An Answer's streamed parts: each literal piece and each variable's value, with Dify's selector."""
    parts: list[tuple[str, list[str]]] = []
    position = 0
    for match in _VARIABLE.finditer(template):
        if match.start() > position:
            parts.append((template[position : match.start()], [node_id, "answer"]))
        parts.append((scope.get(match.group(1), ""), match.group(1).split(".")))
        position = match.end()
    if position < len(template):
        parts.append((template[position:], [node_id, "answer"]))
    return [(text, selector) for text, selector in parts if text]


# --- the captured apps (tests/fixtures/dify-1.14.2/apps) ----------------------------------------------------------


def comment_input(default: str = "looks good") -> dict:
    """The captured forms' text input, as Dify describes it: a paragraph with a constant default."""
    return {
        "output_variable_name": "comment",
        "type": "paragraph",
        "default": {"type": "constant", "selector": [], "value": default},
    }


def select_field(name: str, options: list[str], variable: tuple[str, ...] = ()) -> dict:
    """A form's select input as Dify 1.15+ describes it: its options a constant list, or (`variable`: the selector
    of the run variable they come from) resolved by Dify from the run, as its events and form GET give them."""
    source_type, selector = ("variable", list(variable)) if variable else ("constant", [])
    source = {"type": source_type, "selector": selector, "value": list(options)}
    return {"output_variable_name": name, "type": "select", "option_source": source}


def file_field(name: str, *types: str, count: int = 0, extensions: tuple[str, ...] = ()) -> dict:
    """A form's file input as Dify 1.15+ describes it: one file (`file`), or up to `count` (`file-list`), of Dify's
    file types `types` (and, for `custom`, the `extensions`)."""
    spec = {
        "output_variable_name": name,
        "allowed_file_types": list(types),
        "allowed_file_extensions": list(extensions),
        "allowed_file_upload_methods": ["local_file", "remote_url"],
        "type": "file-list" if count else "file",
    }
    return spec | ({"number_limits": count} if count else {})


APPROVE_REJECT = (("approve", "Approve", "primary"), ("reject", "Reject", "default"))
REVIEW = "Please review the request: {{#sys.query#}}"
INTRO = Answer("answer1", "You said: {{#sys.query#}}. Waiting for approval...", "Intro")
VERDICT = Branch(
    "ifelse",
    "approval.__action_id",
    "approve",
    then=(Answer("answer_ok", "APPROVED. comment={{#approval.comment#}}", "Approved"),),
    otherwise=(Answer("answer_no", "REJECTED. comment={{#approval.comment#}}", "Rejected"),),
)

PLAIN_CHATFLOW = Flow("plain-chatflow", "advanced-chat", (Answer("ans", "hello {{#sys.query#}}"),))
PLAIN_WORKFLOW = Flow(
    "plain-workflow",
    "workflow",
    (End((("greeting", "{{#env.greeting#}}"), ("answer", "{{#start.query#}}"))),),
    env={"greeting": "workflow says:"},
)


def hitl_chatflow(wait_seconds: float = 0.0, expires_in: float = 3600) -> Flow:
    """Start → Answer → Human Input → If/Else → Answer (`hitl-chatflow.yml`); with `wait_seconds`, an HTTP wait
    after the form (`hitl-chatflow-wait.yml`)."""
    after = (Wait("wait", wait_seconds, title="Wait"), VERDICT) if wait_seconds else (VERDICT,)
    approval = Approval("approval", REVIEW, APPROVE_REJECT, (comment_input(),), then=after, expires_in=expires_in)
    name = "hitl-chatflow-wait" if wait_seconds else "hitl-chatflow"
    return Flow(name, "advanced-chat", (INTRO, approval))


def typed_chatflow() -> Flow:
    """Start → Answer → Human Input whose text input has no default (the user types it) → Answer."""
    approval = Approval(
        "approval",
        REVIEW,
        (("send", "Send", "primary"),),
        ({"output_variable_name": "reason", "type": "paragraph", "default": {"type": "constant", "value": ""}},),
        then=(Answer("done", " reason={{#approval.reason#}}"),),
    )
    return Flow("typed-chatflow", "advanced-chat", (INTRO, approval))


def expiring_chatflow(expires_in: float) -> Flow:
    """As hitl-chatflow, whose form expires after `expires_in` seconds into its timeout branch."""
    late = Answer("late", " Nobody answered in time.")
    approval = Approval(
        "approval", REVIEW, APPROVE_REJECT, (comment_input(),), on_timeout=(late,), expires_in=expires_in
    )
    return Flow("expiring-chatflow", "advanced-chat", (INTRO, approval))


def hitl_chatflow_b(expires_in: float = 3600) -> Flow:
    """Start → Human Input → Answer: nothing answered before the pause (`hitl-chatflow-b.yml`)."""
    text = "AFTER-RESUME action={{#approval.__action_id#}} comment={{#approval.comment#}}"
    after = Answer("answer_ok", text, "Approved")
    approval = Approval("approval", REVIEW, APPROVE_REJECT, (comment_input(),), then=(after,), expires_in=expires_in)
    return Flow("hitl-chatflow-b", "advanced-chat", (approval,))


def hitl_workflow() -> Flow:
    """Start(req) → Human Input → End(action, comment) (`hitl-workflow.yml`)."""
    end = End((("action", "{{#approval.__action_id#}}"), ("comment", "{{#approval.comment#}}")))
    content = "Approve workflow request: {{#start.req#}}"
    approval = Approval("approval", content, APPROVE_REJECT, (comment_input(),), then=(end,))
    return Flow("hitl-workflow", "workflow", (approval,), query_input="req")


def hitl_select_file(expires_in: float = 3600, service_api: bool = True) -> Flow:
    """Start → Human Input (a select `env` of constant options, a document `doc`, a paragraph `comment` with a
    default) → Answer (`hitl-select-file.yml`, Dify 1.15+)."""
    text = (
        "AFTER-RESUME action={{#approval.__action_id#}} env={{#approval.env#}} doc={{#approval.doc.name#}} "
        "comment={{#approval.comment#}}"
    )
    fields = (select_field("env", ["staging", "production"]), file_field("doc", "document"), comment_input())
    approval = Approval(
        "approval",
        "Deploy request: {{#sys.query#}}",
        APPROVE_REJECT,
        fields,
        then=(Answer("answer_ok", text, "Approved"),),
        expires_in=expires_in,
        service_api=service_api,
    )
    return Flow("hitl-select-file", "advanced-chat", (approval,))


def slow_chatflow(seconds: float = 40.0) -> Flow:
    """Start → Answer → a slow HTTP Request → Answer (`slow-chatflow.yml`)."""
    return Flow(
        "slow-chatflow",
        "advanced-chat",
        (
            Answer("a1", "part one ({{#sys.query#}}). ", "Part one"),
            Wait("slowhttp", seconds, title="Slow"),
            Answer("a2", "{{#slowhttp.body#}} (part two)", "Part two"),
        ),
    )


# --- apps of ours in the same form (tests/fixtures/dify-1.14.2/apps too), for what the captures did not cover -------


def file_variable(name: str, *types: str, count: int = 1, extensions: tuple[str, ...] = ()) -> dict:
    """A required Start variable taking files of `types` (document, image, …), one (`file`) or up to `count`
    (`file-list`), as `/parameters` lists it."""
    kind = "file-list" if count > 1 else "file"
    spec = {"variable": name, "label": name, "type": kind, "required": True, "allowed_file_types": list(types)}
    spec |= {"allowed_file_extensions": list(extensions), "allowed_file_upload_methods": ["local_file"]}
    return {kind: spec | {"max_length": count}}


FILE_WORKFLOW = Flow(
    "file-workflow",
    "workflow",
    (End((("received", "{{#start.contract.name#}}"),)),),
    start_inputs=(file_variable("contract", "document"),),
)
PICTURE_CHATFLOW = Flow(
    "picture-chatflow",
    "advanced-chat",
    (Answer("ans", "Here it is: ![picture]({{#start.picture.url#}})"),),
    start_inputs=(file_variable("picture", "image"),),
)
