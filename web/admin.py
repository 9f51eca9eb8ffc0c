"""The operator's page's routes (Flask's templates, one stylesheet, one small script for the live view); the work is
the desk's (desk.py), the sign-in the sessions' (session.py). Registered only with ADMIN_TOKEN set: without it
/admin answers 404."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import wraps
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from sqlalchemy.exc import SQLAlchemyError

from services.admin.desk import DIRECT_OUTCOMES, DONE, REFUSED, SIGN_IN, AdminDesk
from services.admin.session import COOKIE, NAME_MAX, SESSION_SECONDS, AdminSessions
from services.audit.export import parse_time
from services.audit.records import AuditFilter
from services.audit.rows import ADMIN
from services.chat.quotas import CHAT, USER
from services.keys import Keys
from services.redis_conn import REDIS_FAILURES
from services.schedules.ticks import PUSHED, SKIPPED
from services.streams.life import (
    ANSWERED,
    BLOCKED,
    BUSY,
    ERROR,
    FEEDBACK,
    FORM_ACTION,
    MESSAGE,
    NOTE,
    OVER_QUOTA,
    PUSH,
    SCHEDULE,
    STOP,
    STOPPED,
)

admin = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates", static_folder="static")

FILTERS = ("since", "until", "bot", "route", "user", "chat", "outcome", "text", "kind")
AUDIT_OFF = "The audit trail is off here (AUDIT=off, or no DATABASE_URL)."
TEXT_MOST_ROWS = 40_000  # the rows a text search reads at most without a user or a chat (_filter)
# what the audit search offers, named where they are made
KINDS = (MESSAGE, STOP, FORM_ACTION, FEEDBACK, PUSH, SCHEDULE, ADMIN)
OUTCOMES = (ANSWERED, NOTE, STOPPED, BLOCKED, OVER_QUOTA, BUSY, ERROR, DONE, REFUSED, *DIRECT_OUTCOMES, PUSHED, SKIPPED)
# No script or style from anywhere else, no framing: the page works offline and cannot be embedded.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _parts() -> tuple[AdminSessions, AdminDesk]:
    return current_app.extensions["admin"]


@admin.context_processor
def _views() -> dict:
    return {"pushes_on": _parts()[1].pushes_on}  # views of features not built here are absent, not empty


@admin.after_request
def _headers(response: Response) -> Response:
    response.headers.update(HEADERS)
    return response


def signed_in(view: Callable) -> Callable:
    """The view for a signed-in operator (`g.operator`); a change (POST) must carry the session's CSRF token. Else:
    the sign-in page (GET), or 403 (POST) with nothing changed."""

    @wraps(view)
    def checked(*args, **kwargs):
        sessions, _ = _parts()
        g.operator = sessions.read(request.cookies.get(COOKIE))
        if g.operator is None:
            if request.method == "POST":
                abort(403, "sign in first")
            return redirect("/admin/", 303)
        if request.method == "POST" and not sessions.csrf_ok(g.operator, request.form.get("csrf")):
            abort(403, "the form's CSRF token is missing or wrong: load the page again")
        return view(*args, **kwargs)

    return checked


@admin.get("/")
def home():
    sessions, desk = _parts()
    g.operator = sessions.read(request.cookies.get(COOKIE))
    if g.operator is None:
        return render_template("admin/sign_in.html", error="")
    return render_template("admin/bots.html", bots=desk.bot_views(), page="bots")


@admin.post("/sign-in")
def sign_in():
    sessions, desk = _parts()
    address = request.remote_addr or "-"
    g.operator = None
    if sessions.refused(address):
        return render_template("admin/sign_in.html", error="Too many failed sign-ins: wait a minute."), 429
    name = (request.form.get("name") or "").strip()[:NAME_MAX]
    if not sessions.token_matches(request.form.get("token") or ""):
        sessions.failed(address)
        desk.record(name or "-", SIGN_IN, address, REFUSED)
        return render_template("admin/sign_in.html", error="That token is not right."), 401
    if not name:
        return render_template("admin/sign_in.html", error="Say who you are: your name is kept with what you do."), 400
    desk.record(name, SIGN_IN, address, DONE)
    response = redirect("/admin/", 303)
    secure = request.is_secure or request.headers.get("X-Forwarded-Proto", "") == "https"
    response.set_cookie(
        COOKIE,
        sessions.issue(name),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="Strict",
        secure=secure,
        path="/admin",
    )
    return response


@admin.post("/sign-out")
@signed_in
def sign_out():
    response = redirect("/admin/", 303)
    response.delete_cookie(COOKIE, path="/admin")
    return response


@admin.get("/live")
@signed_in
def live():
    _, desk = _parts()
    try:
        answers, error = desk.live(), ""
    except REDIS_FAILURES:
        answers, error = [], "Redis did not answer: try again in a moment."
    template = "admin/live_rows.html" if request.args.get("fragment") else "admin/live.html"
    return render_template(template, answers=answers, error=error, page="live")


@admin.post("/live/stop")
@signed_in
def stop():
    _, desk = _parts()
    try:
        desk.stop(g.operator.name, request.form.get("bot", ""), request.form.get("stream", ""))
    except REDIS_FAILURES:
        abort(503, "Redis did not answer: try again in a moment")
    return redirect("/admin/live", 303)


@admin.get("/audit")
@signed_in
def audit():
    _, desk = _parts()
    rows, asked, error, note = [], {name: "" for name in FILTERS}, "", ""
    if desk.records is None:
        error = AUDIT_OFF
    else:
        try:
            which, asked, error, note = _filter(desk)
            rows = [] if error else desk.search(which)
        except SQLAlchemyError:
            error = "The database did not answer: try again in a moment."
    return render_template(
        "admin/audit.html",
        rows=rows,
        asked=asked,
        error=error,
        note=note,
        outcomes=OUTCOMES,
        kinds=KINDS,
        csv_query=urlencode({name: value for name, value in asked.items() if value}),
        page="audit",
        bots=desk.bots(),
    )


@admin.get("/pushes")
@signed_in
def pushes():
    _, desk = _parts()
    if not desk.pushes_on:
        abort(404, "no pushes here: the push API is off (PUSH_API_TOKEN), or the audit trail is")
    try:
        views, error = desk.pushes(), ""
    except (SQLAlchemyError, *REDIS_FAILURES):
        views, error = [], "The database or Redis did not answer: try again in a moment."
    return render_template("admin/pushes.html", views=views, error=error, page="pushes")


@admin.get("/audit/<int:row_id>")
@signed_in
def audit_row(row_id: int):
    _, desk = _parts()
    if desk.records is None:
        abort(404, AUDIT_OFF)
    try:
        row = desk.row(row_id)
    except SQLAlchemyError:
        abort(503, "the database did not answer: try again in a moment")
    if row is None:
        abort(404, "no such audit row")
    return render_template("admin/audit_row.html", row=row, page="audit")


@admin.get("/audit.csv")
@signed_in
def audit_csv():
    _, desk = _parts()
    if desk.records is None:
        abort(404, AUDIT_OFF)
    try:
        which, _, error, _ = _filter(desk)
    except SQLAlchemyError:
        abort(503, "the database did not answer: try again in a moment")
    if error:
        abort(400, error)
    headers = {"Content-Disposition": 'attachment; filename="audit.csv"'}
    return Response(stream_with_context(desk.csv(which)), mimetype="text/csv", headers=headers)


@admin.get("/quotas")
@signed_in
def quotas():
    _, desk = _parts()
    scope, who = _who(request.args)
    views, error = [], ""
    if who:
        try:
            views = desk.quotas(scope, who)
        except REDIS_FAILURES:
            error = "Redis did not answer: try again in a moment."
    return render_template("admin/quotas.html", scope=scope, who=who, views=views, error=error, page="quotas")


@admin.post("/quotas/reset")
@signed_in
def reset_quota():
    _, desk = _parts()
    scope, who = _who(request.form)
    if not who:
        abort(400, "name a user or a chat")
    try:
        desk.reset_quota(g.operator.name, scope, who)
    except REDIS_FAILURES:
        abort(503, "Redis did not answer: try again in a moment")
    return redirect(url_for("admin.quotas", scope=scope, who=who), 303)


def _who(values) -> tuple[str, str]:
    scope = values.get("scope") or USER
    return (scope if scope in (USER, CHAT) else USER), (values.get("who") or "").strip()


def _filter(desk: AdminDesk) -> tuple[AuditFilter, dict[str, str], str, str]:
    """The audit filter the request's query asks for, the values as asked (for the form), a problem (""), and a note
    on what the search left out ("").

    No index narrows a text: without a user or a chat, a text search reads the newest TEXT_MOST_ROWS rows of its
    range at most (its start is moved up to the oldest of them, and its end fixed, so that the CSV link reads the same
    rows): a text in a million rows outlasted the database's 5 s (BENCHMARKS.md §23). `audit export` has no bound.

    Raises:
        SQLAlchemyError: the database did not answer.
    """
    asked = {name: (request.args.get(name) or "").strip() for name in FILTERS}
    times = {}
    for name in ("since", "until"):
        if asked[name]:
            try:
                times[name] = parse_time(asked[name])
            except ValueError:
                return AuditFilter(), asked, f"'{name}' is not a time such as 2026-11-01T08:00", ""
    note = ""
    if asked["text"] and not (asked["user"] or asked["chat"]):
        # (the end is fixed a little past now: the table keeps whole seconds, and MySQL rounds them up)
        until = times.setdefault("until", datetime.now(UTC).replace(tzinfo=None, microsecond=0) + timedelta(seconds=2))
        floor = desk.oldest_of_newest(until, TEXT_MOST_ROWS)
        if floor is not None and (times.get("since") is None or times["since"] < floor):
            times["since"] = floor
            note = (
                f"The text was looked for in the newest {TEXT_MOST_ROWS:,} rows of the range (from "
                f"{floor:%Y-%m-%d %H:%M:%S} UTC): name a user or a chat, or move the end back, to look further."
            )
        for name, moment in times.items():
            asked[name] = moment.strftime("%Y-%m-%dT%H:%M:%S")
    values = {name: asked[name] for name in FILTERS if name not in ("since", "until")}
    return AuditFilter(times.get("since"), times.get("until"), **values), asked, "", note


def install(app, gateway) -> None:
    """Serve /admin from `app` for `gateway`'s bots (read again at each request: they change with BOTS_FILE)."""
    settings = gateway.settings
    sessions = AdminSessions(settings.admin_token, gateway.redis, Keys(settings.redis.key_prefix))
    desk = AdminDesk(
        lambda: gateway.bots,
        gateway.redis,
        gateway.audit_records,
        settings.bot.quotas.timezone,
        gateway.push is not None,
    )
    app.extensions["admin"] = (sessions, desk)
    app.register_blueprint(admin)
