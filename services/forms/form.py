"""A paused run's form, as Dify describes it (`human_input_required`, `GET /form/human_input/{token}`), read into
plain values: what to show, the actions a person may take, and the inputs they fill in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

import orjson

SELECT = "select"
MAX_ACTIONS = 6  # a button_interaction card's buttons
MAX_SELECTORS = 3  # a multiple_interaction card's selectors
MAX_OPTIONS = 10  # options per selector
DEFAULT_EXPIRY_SECONDS = 24 * 3600  # a form whose expiry Dify does not say


@dataclass(frozen=True, slots=True)
class Action:
    id: str
    title: str
    style: str = "default"  # Dify's button_style: primary, default, accent, ghost


@dataclass(frozen=True, slots=True)
class Input:
    """One value the form asks for: a select (`options`: (id, text)) or a free text the user types."""

    name: str  # Dify's output_variable_name: the key of the submission's `inputs`
    kind: str
    label: str
    options: tuple[tuple[str, str], ...] = ()
    default: str = ""  # Dify's default: submitted when the user is not asked (a text input with one is not)

    @property
    def is_select(self) -> bool:
        return self.kind == SELECT and bool(self.options)


@dataclass(frozen=True, slots=True)
class Form:
    token: str
    run_id: str
    content: str  # markdown, shown in the bubble
    title: str  # the node's title: the card's
    actions: tuple[Action, ...]
    inputs: tuple[Input, ...] = ()
    expires_at: float = 0.0
    node_id: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def selects(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.is_select)

    @property
    def texts(self) -> tuple[Input, ...]:
        """The inputs a card cannot ask for: the user types them, one message each."""
        return tuple(i for i in self.inputs if not i.is_select)

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) >= self.expires_at

    def action(self, wanted: str) -> Action | None:
        """The action `wanted` names: its id, its title (any case), or its number in the list (1-based)."""
        wanted = wanted.strip()
        for action in self.actions:
            if wanted == action.id or wanted.casefold() == action.title.casefold():
                return action
        if wanted.isdigit() and 1 <= int(wanted) <= len(self.actions):
            return self.actions[int(wanted) - 1]
        return None

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "token": self.token,
                "run_id": self.run_id,
                "content": self.content,
                "title": self.title,
                "actions": [[a.id, a.title, a.style] for a in self.actions],
                "inputs": [[i.name, i.kind, i.label, [list(o) for o in i.options], i.default] for i in self.inputs],
                "expires_at": self.expires_at,
                "node_id": self.node_id,
            }
        ).decode()

    @classmethod
    def from_json(cls, raw: str) -> Form:
        data = orjson.loads(raw)
        return cls(
            token=data["token"],
            run_id=data["run_id"],
            content=data["content"],
            title=data["title"],
            actions=tuple(Action(*a) for a in data["actions"]),
            inputs=tuple(Input(n, k, lab, tuple(tuple(o) for o in opts), d) for n, k, lab, opts, d in data["inputs"]),
            expires_at=float(data["expires_at"]),
            node_id=data.get("node_id", ""),
        )


def read_form(event: dict, fetched: dict, run_id: str, now: float | None = None) -> Form:
    """The form of a `human_input_required` event's data, completed by `GET /form/human_input/{token}` (`fetched`,
    which wins: some Dify builds send the event with empty data)."""
    now = now or time.time()
    merged = {**event, **{k: v for k, v in fetched.items() if v not in (None, "", [])}}
    actions = tuple(
        Action(str(a.get("id")), str(a.get("title") or a.get("id")), str(a.get("button_style") or "default"))
        for a in _objects(merged.get("user_actions") or merged.get("actions"))
        if a.get("id")
    )
    inputs = tuple(_input(raw) for raw in _objects(merged.get("inputs")) if raw.get("output_variable_name"))
    defaults = merged.get("resolved_default_values") if isinstance(merged.get("resolved_default_values"), dict) else {}
    inputs = tuple(
        Input(i.name, i.kind, i.label, i.options, str(defaults.get(i.name, i.default) or "")) for i in inputs
    )
    return Form(
        token=str(merged.get("form_token") or ""),
        run_id=run_id,
        content=str(merged.get("form_content") or ""),
        title=str(merged.get("node_title") or ""),
        actions=actions[:MAX_ACTIONS] or (Action("submit", ""),),
        inputs=inputs,
        expires_at=_expiry(merged.get("expiration_time"), now),
        node_id=str(merged.get("node_id") or ""),
    )


def _input(raw: dict) -> Input:
    name = str(raw["output_variable_name"])
    kind = str(raw.get("type") or "text-input")
    label = str(raw.get("label") or raw.get("title") or name)
    options = []
    for option in raw.get("options") or []:
        if isinstance(option, str):
            options.append((option, option))
        elif isinstance(option, dict):
            value = option.get("value", option.get("id"))
            if value is not None:
                options.append((str(value), str(option.get("label") or option.get("text") or value)))
    return Input(name, SELECT if kind == SELECT else kind, label, tuple(options[:MAX_OPTIONS]), _default(raw))


def _default(raw: dict) -> str:
    """An input's default as Dify 1.14 describes it: `{"type": "constant", "value": ...}` (a `variable` default is
    resolved by Dify into `resolved_default_values`, which read_form applies), or a plain value (older builds)."""
    default = raw.get("default")
    if isinstance(default, dict):
        default = default.get("value") if default.get("type", "constant") == "constant" else None
    return "" if default is None or isinstance(default, (dict, list)) else str(default)


def _objects(value) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _expiry(value, now: float) -> float:
    """Dify's expiration_time (seconds or milliseconds since the epoch, or an ISO date) as epoch seconds."""
    if isinstance(value, (int, float)) and value > 0:
        return float(value) / 1000 if value > 1e11 else float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return now + DEFAULT_EXPIRY_SECONDS
