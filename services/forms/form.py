"""A paused run's form, as Dify describes it (`human_input_required`, `GET /form/human_input/{token}`), read into
plain values: what to show, the actions a person may take, and the inputs they fill in.

Inputs are Dify's: a paragraph (text), a `select` (Dify 1.15+: its options in `option_source.value`, a constant list
or resolved by Dify from a run variable; older builds: `options`), a `file` or a `file-list` (Dify 1.15+: allowed
types, extensions and upload methods, and for a list `number_limits`). A card carries up to three selects of up to
ten options (`Form.card_selects`); every other input is asked for in the chat (`Form.in_chat`): typed, chosen by
typing, or sent as files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from services.dify.app_profile import file_allowed

SELECT, FILE, FILE_LIST = "select", "file", "file-list"
MAX_ACTIONS = 6  # a button_interaction card's buttons
MAX_SELECTORS = 3  # a multiple_interaction card's selectors
MAX_OPTIONS = 10  # options per selector
DEFAULT_EXPIRY_SECONDS = 24 * 3600  # a form whose expiry Dify does not say
OPTION_PREFIX = "o"  # a card's option ids: o0, o1, … (the option's value may be any text)


@dataclass(frozen=True, slots=True)
class Action:
    id: str
    title: str
    style: str = "default"  # Dify's button_style: primary, default, accent, ghost


@dataclass(frozen=True, slots=True)
class Input:
    """One value the form asks for: a select (`options`: (value submitted, text shown)), a file or a list of them
    (`file_types`: Dify's types; `file_extensions`: `.pdf`…; `max_files`: 0 for no limit), or a free text."""

    name: str  # Dify's output_variable_name: the key of the submission's `inputs`
    kind: str
    label: str
    options: tuple[tuple[str, str], ...] = ()
    default: str = ""  # Dify's default: submitted when the user is not asked (a text input with one is not)
    file_types: tuple[str, ...] = ()
    file_extensions: tuple[str, ...] = ()
    max_files: int = 0
    uploadable: bool = True  # Dify takes an upload here (`local_file` among its allowed upload methods)

    @property
    def is_select(self) -> bool:
        return self.kind == SELECT

    @property
    def fits_a_selector(self) -> bool:
        """A select a card can offer: one to ten options."""
        return self.is_select and 1 <= len(self.options) <= MAX_OPTIONS

    @property
    def is_file(self) -> bool:
        return self.kind in (FILE, FILE_LIST)

    def option(self, chosen: str) -> str | None:
        """The value of the option `chosen` names: a card's option id, the option's text or value (any case), or its
        number in the list (1-based); None when it names none of them."""
        chosen = chosen.strip()
        if chosen.startswith(OPTION_PREFIX) and chosen[len(OPTION_PREFIX) :].isdigit():
            index = int(chosen[len(OPTION_PREFIX) :])
            if index < len(self.options):
                return self.options[index][0]
        for value, text in self.options:
            if chosen in (value, text) or chosen.casefold() in (value.casefold(), text.casefold()):
                return value
        if chosen.isdigit() and 1 <= int(chosen) <= len(self.options):
            return self.options[int(chosen) - 1][0]
        return None

    def takes_file(self, dify_type: str, extension: str) -> bool:
        """Whether a file of Dify type `dify_type` with `extension` (no dot) may fill this input."""
        return file_allowed(self.file_types, self.file_extensions, dify_type, extension)

    def to_list(self) -> list:
        return [
            self.name,
            self.kind,
            self.label,
            [list(o) for o in self.options],
            self.default,
            list(self.file_types),
            list(self.file_extensions),
            self.max_files,
            self.uploadable,
        ]

    @classmethod
    def from_list(cls, item: list) -> Input:
        """An input as `to_list` wrote it (or as an older release did: its first five fields)."""
        name, kind, label, options, default, *files = item
        types, extensions, max_files, uploadable = [*files, [], [], 0, True][:4]
        return cls(
            name, kind, label, tuple(tuple(o) for o in options), default, tuple(types), tuple(extensions),
            int(max_files), bool(uploadable),
        )  # fmt: skip


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
    def card_selects(self) -> tuple[Input, ...]:
        """The selects the card offers: one beside the action buttons (`button_selection`), or up to three
        selectors (`select_list`; one of them the action's, when there are several actions)."""
        selects = tuple(i for i in self.inputs if i.fits_a_selector)
        if len(selects) <= 1:
            return selects
        return selects[: MAX_SELECTORS - (1 if len(self.actions) > 1 else 0)]

    @property
    def in_chat(self) -> tuple[Input, ...]:
        """The inputs a card cannot ask for, asked in the chat in the form's order: typed texts, selects chosen by
        typing, files sent."""
        on_card = {i.name for i in self.card_selects}
        return tuple(i for i in self.inputs if i.name not in on_card)

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
                "inputs": [i.to_list() for i in self.inputs],
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
            inputs=tuple(Input.from_list(item) for item in data["inputs"]),
            expires_at=float(data["expires_at"]),
            node_id=data.get("node_id", ""),
        )


def read_form(event: dict, fetched: dict, run_id: str, now: float | None = None) -> Form:
    """The form of a `human_input_required` event's data, completed by `GET /form/human_input/{token}` (`fetched`,
    which wins: some Dify builds send the event with empty data, and the GET has a select's options resolved)."""
    now = now or time.time()
    merged = {**event, **{k: v for k, v in fetched.items() if v not in (None, "", [])}}
    actions = tuple(
        Action(str(a.get("id")), str(a.get("title") or a.get("id")), str(a.get("button_style") or "default"))
        for a in _objects(merged.get("user_actions") or merged.get("actions"))
        if a.get("id")
    )
    inputs = tuple(_input(raw) for raw in _objects(merged.get("inputs")) if raw.get("output_variable_name"))
    defaults = merged.get("resolved_default_values") if isinstance(merged.get("resolved_default_values"), dict) else {}
    inputs = tuple(_with_default(i, str(defaults.get(i.name, i.default) or "")) for i in inputs)
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


def _with_default(item: Input, default: str) -> Input:
    return Input(
        item.name, item.kind, item.label, item.options, default, item.file_types, item.file_extensions,
        item.max_files, item.uploadable,
    )  # fmt: skip


def _input(raw: dict) -> Input:
    name = str(raw["output_variable_name"])
    kind = str(raw.get("type") or "text-input")
    label = str(raw.get("label") or raw.get("title") or name)
    if kind == SELECT:
        return Input(name, SELECT, label, _options(raw))
    if kind in (FILE, FILE_LIST):
        limit = raw.get("number_limits")
        methods = raw.get("allowed_file_upload_methods")
        return Input(
            name,
            kind,
            label,
            file_types=tuple(str(t) for t in raw.get("allowed_file_types") or ()),
            file_extensions=tuple(f".{str(e).lower().lstrip('.')}" for e in raw.get("allowed_file_extensions") or ()),
            max_files=1 if kind == FILE else (limit if isinstance(limit, int) and limit > 0 else 0),
            uploadable=not isinstance(methods, list) or not methods or "local_file" in methods,
        )
    return Input(name, kind, label, default=_default(raw))


def _options(raw: dict) -> tuple[tuple[str, str], ...]:
    """A select's options as (value submitted, text shown): Dify 1.15+'s `option_source.value` (strings: the value is
    the text), or an older build's `options` (strings, or `{value, label}` objects)."""
    source = raw.get("option_source")
    listed = source.get("value") if isinstance(source, dict) else raw.get("options")
    options = []
    for option in listed if isinstance(listed, list) else []:
        if isinstance(option, str):
            options.append((option, option))
        elif isinstance(option, dict):
            value = option.get("value", option.get("id"))
            if value is not None:
                options.append((str(value), str(option.get("label") or option.get("text") or value)))
    return tuple(options)


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
