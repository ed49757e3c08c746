"""The labeling server's front door: an ASGI middleware on the app Gradio builds (given to it through
`launch(app_kwargs={"middleware": ...})`), so every request passes here before any Gradio route.

What it guarantees, request by request:
- every response carries a real Content-Security-Policy (`default-src 'self'`, scripts only from this server
  or with this response's nonce, `form-action 'self'`, `frame-ancestors 'none'`, no third-party connection),
  plus `X-Frame-Options`, `nosniff` and `Referrer-Policy: no-referrer`; HTML pages get the page script;
- a request body over `max_body_bytes` is refused with 413 before anything parses it (the body is read
  here, bounded, and handed on); the upload route is refused (the app takes no files);
- logout is `POST /logout` from this origin only: Gradio's `GET /logout`, which any `<img>` could request,
  is refused;
- a login session lasts `session_seconds` from its login, then its token is dropped and the page says so
  (`GET /alignkit/session` tells the page's script whether its session is alive);
- logins are throttled per client address, per user name and per known browser (`LoginThrottle`,
  `DeviceCookies`), with a 429 and a message that says when to try again;
- the export download (`GET /alignkit/export.zip`) is served here, to an admin's live session only (401
  without one, 403 for anyone else): the export directory is blocked from Gradio's file routes.

Gradio keeps logins as `app.tokens[token] = username`, the token in an `access-token-<cookie_id>` cookie;
this module reads and drops entries of that table and never writes one: Gradio's own /login makes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.cookies
import math
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

PAGE_JS = Path(__file__).with_name("page.js")
SESSION_PATH = "/alignkit/session"
SCRIPT_PATH = "/alignkit/page.js"
EXPORT_PATH = "/alignkit/export.zip"  # the admin's download of the latest export (Gradio's file routes serve none)
UPLOAD_PATHS = ("/gradio_api/upload", "/upload")
MAX_LOGIN_BODY = 16 * 1024  # a user name and a password


def content_security_policy(nonce: str) -> str:
    # 'unsafe-eval': Gradio's HTML component evaluates its template (`${value}`) with Function(). It runs no
    # text of ours: the value is data inside that template. Inline scripts need this response's nonce, so a
    # <script> or an onerror= that reached the page anyway would not run.
    return "; ".join([
        "default-src 'self'",
        f"script-src 'self' 'nonce-{nonce}' 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'self'",
        "object-src 'none'",
    ])


# ---------------------------------------------------------------------------
# Login throttling
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ThrottleSettings:
    address_failures: int = 20  # failed logins from one client address before it has to wait (offices share one)
    name_failures: int = 10  # failed logins for one name, from anywhere, before strangers have to wait for it
    device_failures: int = 5  # failed logins from a browser that logged in as that name before
    window_s: float = 900.0  # failures older than this are forgotten
    first_wait_s: float = 30.0  # the first wait; each further failure doubles it
    max_wait_s: float = 3600.0
    max_keys: int = 10_000  # addresses, names and browsers remembered (random names cannot grow it unbounded)


class Backoff:
    """Failures per key in a sliding window; at `threshold` failures a key waits `first_wait_s` from its last
    failure, doubling with each further failure up to `max_wait_s`. Not thread-safe: LoginThrottle locks."""

    def __init__(self, threshold: int, settings: ThrottleSettings):
        self.threshold, self.s = threshold, settings
        self._failures: OrderedDict[str, list[float]] = OrderedDict()  # least recently failed first

    def _recent(self, key: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(key, ()) if t > now - self.s.window_s]
        if kept:
            self._failures[key] = kept
        else:
            self._failures.pop(key, None)
        return kept

    def until(self, key: str, now: float) -> float | None:
        """When `key` may try again, or None when it need not wait."""
        recent = self._recent(key, now)
        over = len(recent) - self.threshold
        if over < 0:
            return None
        until = recent[-1] + min(self.s.max_wait_s, self.s.first_wait_s * 2.0 ** over)
        return until if until > now else None

    def fail(self, key: str, now: float) -> int:
        recent = self._recent(key, now) + [now]
        self._failures.pop(key, None)
        self._failures[key] = recent[-(self.threshold + 32):]  # enough to reach max_wait_s
        while len(self._failures) > self.s.max_keys:
            self._failures.popitem(last=False)
        return len(recent)


@dataclass(frozen=True)
class Refusal:
    retry_at: float
    reason: str  # "address" | "name" | "device"

    @property
    def message(self) -> str:
        at = time.strftime("%H:%M", time.localtime(math.ceil(self.retry_at / 60) * 60))
        who = {"address": "from this address", "name": "for this user name", "device": "from this browser"}
        return f"Too many failed logins {who[self.reason]}: try again at {at}."


class LoginThrottle:
    """Back-off per client address, per user name and per known browser, so that neither one address nor
    many can guess passwords fast, and a stranger cannot lock a named user out:

    - a login from a browser that has logged in as that name before (`device`: its signed cookie, see
      DeviceCookies) is throttled on that browser's own failures only: strangers' failures for the name
      or from the address never make the annotator at their usual browser wait;
    - any other login waits once its address failed `address_failures` times, however many names it
      tried (a password sprayed across names is as slow as one name), or once its name failed
      `name_failures` times from anywhere;
    - the same rule for every name, known or not, so a refusal tells no one which names exist.
    A login refused while waiting is not checked, so it neither costs a password hash nor counts."""

    def __init__(self, settings: ThrottleSettings = ThrottleSettings(), *, clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] | None = None):
        self.settings, self.clock = settings, clock
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._addresses = Backoff(settings.address_failures, settings)
        self._names = Backoff(settings.name_failures, settings)
        self._devices = Backoff(settings.device_failures, settings)

    def check(self, name: str, address: str, device: str | None = None) -> Refusal | None:
        now = self.clock()
        with self._lock:
            if device is not None:
                waits = [(self._devices.until(device, now), "device")]
            else:
                waits = [(self._addresses.until(address, now), "address"), (self._names.until(name, now), "name")]
        waits = [(until, why) for until, why in waits if until is not None]
        return Refusal(*max(waits)) if waits else None

    def record_failure(self, name: str, address: str, device: str | None = None) -> None:
        now = self.clock()
        with self._lock:
            if device is not None:
                self._devices.fail(device, now)
                return
            n_address = self._addresses.fail(address, now)
            n_name = self._names.fail(name, now)
        # The admin should know why logins wait: said once per key, when it starts waiting.
        if n_address == self.settings.address_failures:
            self.log(f"alignkit label: address {address} made {n_address} failed logins; it waits from now on")
        if n_name == self.settings.name_failures:
            self.log(f"alignkit label: {name!r} had {n_name} failed logins; logins as {name!r} from browsers "
                     f"that have not logged in as {name!r} before wait from now on")


class DeviceCookies:
    """A browser's proof that it logged in as a name before: `id.name.mac`, HMAC-SHA256 under a key that lives
    as long as the server process (a restart forgets every browser, which then logs in as a stranger once)."""

    COOKIE = "alignkit-device"
    MAX_AGE_S = 90 * 24 * 3600

    def __init__(self, key: bytes | None = None):
        self._key = key or secrets.token_bytes(32)

    def _mac(self, device: str, name: str) -> str:
        return hmac.new(self._key, f"{device}.{name}".encode(), hashlib.sha256).hexdigest()

    def issue(self, name: str) -> str:
        device = secrets.token_urlsafe(12).replace(".", "_")
        return f"{device}.{name}.{self._mac(device, name)}"

    def device_for(self, value: str | None, name: str) -> str | None:
        """The browser's id when `value` is a cookie this server issued for `name`, else None."""
        device, _, rest = (value or "").partition(".")
        cookie_name, _, mac = rest.rpartition(".")
        if not device or cookie_name != name or not hmac.compare_digest(mac, self._mac(device, name)):
            return None
        return device


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------


class Sessions:
    """Login time per Gradio token; a token older than `seconds` is dropped from Gradio's table."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.time):
        self.seconds, self.clock = seconds, clock
        self._issued: dict[str, float] = {}
        self._lock = threading.Lock()

    def started(self, token: str) -> None:
        with self._lock:
            self._issued[token] = self.clock()

    def alive(self, tokens: dict, token: str | None) -> tuple[str | None, float | None]:
        """(user, expires_at) of a live session; (None, None) once it ended (and it is dropped then)."""
        if not token or token not in tokens:
            return None, None
        now = self.clock()
        with self._lock:
            issued = self._issued.setdefault(token, now)
            if now - issued >= self.seconds:
                tokens.pop(token, None)
                del self._issued[token]
                return None, None
            if len(self._issued) > 2 * len(tokens) + 100:  # forget tokens Gradio no longer has
                self._issued = {t: at for t, at in self._issued.items() if t in tokens}
        return tokens.get(token), issued + self.seconds


# ---------------------------------------------------------------------------
# The middleware
# ---------------------------------------------------------------------------


@dataclass
class GuardSettings:
    max_body_bytes: int = 2 * 1024 * 1024
    session_seconds: float = 12 * 3600.0
    throttle: ThrottleSettings = field(default_factory=ThrottleSettings)


class BodyTooLarge(Exception):
    pass


class ExportMissing(Exception):
    """There is no export to download yet (its message says so)."""


@dataclass
class ExportDownload:
    """The export download: who may have it (`is_admin(user or None)`) and how it is built (the zip's bytes,
    raising ExportMissing when there is none)."""

    is_admin: Callable[[str | None], bool]
    build: Callable[[], bytes]
    filename: str = "labels-export.zip"


class Guard:
    """The ASGI middleware (see the module doc). `throttle` and `sessions` are this server's own state."""

    def __init__(self, app, *, settings: GuardSettings, throttle: LoginThrottle, sessions: Sessions,
                 devices: DeviceCookies, refresh: Callable[[], object] = lambda: None,
                 export: ExportDownload | None = None):
        """`refresh` runs before each request's session is looked at: the users file's re-read, which ends the
        sessions of removed or re-passworded users, so the page learns of it at its next request."""
        self.app, self.settings, self.throttle, self.sessions, self.devices = app, settings, throttle, sessions, devices
        self.refresh, self.export = refresh, export

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        nonce = secrets.token_urlsafe(16)
        send = _with_headers(send, nonce)
        try:
            body = await _read_body(receive, MAX_LOGIN_BODY if path.rstrip("/") == "/login"
                                    else self.settings.max_body_bytes)
        except BodyTooLarge:
            return await _refuse(413, "request body too large", scope, receive, send)
        replay = _replay(body, receive)
        token = _session_token(scope)
        self.refresh()
        user, expires_at = self.sessions.alive(_tokens(scope), token)

        if any(path.rstrip("/") == p for p in UPLOAD_PATHS):
            return await _refuse(403, "this app takes no uploads", scope, replay, send)
        if path.rstrip("/") == "/logout":
            return await self._logout(scope, replay, send, token)
        if path == SESSION_PATH:
            if user is None:
                return await _refuse(401, "session ended", scope, replay, send, ended=True)
            return await JSONResponse({"user": user, "expires_at": expires_at})(scope, replay, send)
        if path == EXPORT_PATH:
            return await self._export(scope, replay, send, user)
        if path == SCRIPT_PATH and method == "GET":
            return await Response(PAGE_JS.read_bytes(), media_type="text/javascript",
                                  headers={"Cache-Control": "no-cache"})(scope, replay, send)
        if path.rstrip("/") == "/login" and method == "POST":
            return await self._login(scope, body, replay, send)
        return await self.app(scope, replay, _inject_page_script(send, nonce))

    async def _export(self, scope, receive, send, user: str | None):
        if self.export is None:
            return await _refuse(404, "no export here", scope, receive, send)
        if scope["method"] != "GET":
            return await _refuse(405, "download the export with GET", scope, receive, send)
        if not self.export.is_admin(user):
            return await _refuse(401 if user is None else 403, "admins only", scope, receive, send)
        try:
            body = await asyncio.to_thread(self.export.build)
        except ExportMissing as err:
            return await _refuse(404, str(err), scope, receive, send)
        headers = {"Content-Disposition": f'attachment; filename="{self.export.filename}"',
                   "Cache-Control": "no-store"}
        return await Response(body, media_type="application/zip", headers=headers)(scope, receive, send)

    async def _logout(self, scope, receive, send, token: str | None):
        if scope["method"] != "POST":
            return await _refuse(405, "log out with the app's Log out button", scope, receive, send)
        if not _same_origin(scope):
            return await _refuse(403, "logout must come from this app's page", scope, receive, send)
        _tokens(scope).pop(token, None)
        response = JSONResponse({"logged_out": True})
        cookie_id = getattr(scope.get("app"), "cookie_id", "")
        for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
            response.delete_cookie(name, path="/")
        return await response(scope, receive, send)

    async def _login(self, scope, body: bytes, receive, send):
        form = await Request(scope, _replay(body)).form()
        name, address = str(form.get("username", "")).strip(), _client_address(scope)
        device = self.devices.device_for(_cookies(scope).get(DeviceCookies.COOKIE), name)
        refusal = self.throttle.check(name, address, device)
        if refusal is not None:
            return await JSONResponse({"detail": refusal.message, "retry_at": refusal.retry_at}, status_code=429,
                                      headers={"Retry-After": str(max(1, math.ceil(refusal.retry_at - time.time())))}
                                      )(scope, receive, send)
        outcome: dict = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                token = _token_from_set_cookie(message.get("headers", []))
                if message["status"] == 200 and token:
                    self.sessions.started(token)  # before the browser can use it
                    message = {**message, "headers": [*message.get("headers", []), self._device_cookie(name)]}
            await send(message)

        await self.app(scope, receive, watch)
        if outcome.get("status") == 400:  # Gradio's "Incorrect credentials."
            self.throttle.record_failure(name, address, device)

    def _device_cookie(self, name: str) -> tuple[bytes, bytes]:
        value = self.devices.issue(name)
        return (b"set-cookie", f"{DeviceCookies.COOKIE}={value}; Max-Age={DeviceCookies.MAX_AGE_S}; Path=/; "
                               f"HttpOnly; SameSite=Strict".encode())


def _tokens(scope) -> dict:
    tokens = getattr(scope.get("app"), "tokens", None)
    return tokens if isinstance(tokens, dict) else {}


def _cookies(scope) -> dict[str, str]:
    jar = http.cookies.SimpleCookie()
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except http.cookies.CookieError:
                pass
    return {k: m.value for k, m in jar.items()}


def _session_token(scope) -> str | None:
    cookie_id = getattr(scope.get("app"), "cookie_id", "")
    cookies = _cookies(scope)
    return cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")


def _token_from_set_cookie(headers) -> str | None:
    for key, value in headers:
        if key.lower() == b"set-cookie":
            jar = http.cookies.SimpleCookie()
            jar.load(value.decode("latin-1"))
            for name, morsel in jar.items():
                if name.startswith("access-token-") and morsel.value:
                    return morsel.value
    return None


def _client_address(scope) -> str:
    # scope["client"] is the peer, or the client a trusted proxy names (uvicorn's proxy-headers rule).
    client = scope.get("client")
    return client[0] if client else "unknown"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _same_origin(scope) -> bool:
    """A browser names the page that sent a POST in Origin (or Sec-Fetch-Site); it must be this server."""
    site = _header(scope, b"sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin, host = _header(scope, b"origin"), _header(scope, b"host")
    return origin is not None and host is not None and urlsplit(origin).netloc == host


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive=None):
    """A receive callable that hands the app the body read here, then the client's own messages (a streaming
    response listens there for the disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


async def _refuse(status: int, message: str, scope, receive, send, **extra):
    return await JSONResponse({"detail": message, **extra}, status_code=status)(scope, receive, send)


def _with_headers(send, nonce: str):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-security-policy"]
            headers += [(b"content-security-policy", content_security_policy(nonce).encode()),
                        (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer")]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


def _inject_page_script(send, nonce: str):
    """HTML pages (the app, the login page) get this response's nonce on their scripts and the page script."""
    held: dict = {}
    chunks: list[bytes] = []

    async def wrapped(message):
        if message["type"] == "http.response.start":
            ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
            encoded = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-encoding")
            if ctype.startswith(b"text/html") and encoded is None:
                held["start"] = message
                return
        elif message["type"] == "http.response.body" and "start" in held:
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            # Every "<script" here is a tag: Gradio writes its inline config as JSON with "<" escaped (\u003c).
            page = b"".join(chunks).replace(b"<script", f'<script nonce="{nonce}"'.encode())
            tag = f'<script nonce="{nonce}" src="{SCRIPT_PATH.lstrip("/")}" defer></script>'.encode()
            page = page.replace(b"</head>", tag + b"</head>", 1)
            start = held.pop("start")
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(page)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page, "more_body": False})
            return
        await send(message)

    return wrapped

