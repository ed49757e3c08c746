"""What an annotator sees of a prompt or a response: HTML built here, from text that is never interpreted.

Invariants (every function below keeps them; tests/test_labeling_render.py checks them):
- every character of the prompt or response reaches the page as text: `<`, `>`, `&`, quotes and markdown
  syntax are escaped by us, so no tag, attribute, style or form from a prompt or a model exists in the DOM;
- verbatim (the default) shows the text character for character, white space and line breaks kept;
- markdown (an annotator's choice) renders CommonMark with raw HTML shown as text, links and images shown as
  their source text (nothing is fetched, nothing is clickable), and fenced code highlighted by Pygments;
- bidi controls (which reorder what is shown) and other invisible format characters are made visible as
  a marked `<U+202E>`-style token; text direction follows the text (`dir="auto"` per block);
- chat prompts show one block per message with its role, model turns held to the same rule.

The markup is ours alone: a few classes (`ak-text`, `ak-md`, `ak-turn`, `ak-role`, `ak-cc`) styled by
`PAGE_CSS`.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Any

from markdown_it import MarkdownIt
from pygments import highlight as _pygments_highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

# Characters that change how text around them is shown without being seen: the bidi embeddings,
# overrides and isolates, the marks, and zero-width format characters (Unicode category Cf).
_INVISIBLE = re.compile(r"[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")

_FORMATTER = HtmlFormatter(nowrap=True, classprefix="ak-hl-")
PYGMENTS_CSS = HtmlFormatter(classprefix="ak-hl-").get_style_defs(".ak-md pre")


_TAG_OR_INVISIBLE = re.compile(r"(<[^>]*>)|" + _INVISIBLE.pattern)


def _visible_controls(markup: str) -> str:
    """Replace invisible format characters in escaped markup with a visible, marked token. Inside a tag (a
    code block's language class) they are left alone: a token there would break the tag."""
    def token(m: re.Match) -> str:
        if m.group(1):
            return m.group(1)
        name = unicodedata.name(m.group(), "format character")
        return f'<span class="ak-cc" title="{name}">&lt;U+{ord(m.group()):04X}&gt;</span>'

    return _TAG_OR_INVISIBLE.sub(token, markup)


def verbatim_html(text: str) -> str:
    """`text` exactly as written, in a block that keeps white space and follows the text's direction."""
    return f'<div class="ak-text" dir="auto">{_visible_controls(html.escape(text, quote=True))}</div>'


def _highlight(code: str, lang: str, _attrs: str) -> str:
    try:
        lexer = get_lexer_by_name(lang) if lang else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes the code itself
    return _pygments_highlight(code, lexer, _FORMATTER)


def _markdown() -> MarkdownIt:
    # html=False: raw HTML in the source is text. Links, images and autolinks are not parsed at all, so
    # `[x](javascript:...)` and `![](http://host/x.png)` stay as the characters the prompt holds.
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False, "highlight": _highlight})
    md.disable(["link", "image", "autolink"])
    md.validateLink = lambda url: False  # reference definitions too: no href is ever emitted
    return md


_MD = _markdown()


def markdown_html(text: str) -> str:
    """`text` as CommonMark with every piece of HTML in it escaped, and nothing clickable or fetched."""
    return f'<div class="ak-md" dir="auto">{_visible_controls(_MD.render(text))}</div>'


def text_html(text: str, *, markdown: bool) -> str:
    return markdown_html(text) if markdown else verbatim_html(text)


def prompt_html(prompt: Any, *, markdown: bool) -> str:
    """A prompt (a string, or chat messages with roles) as shown above the two responses."""
    if isinstance(prompt, str):
        body = text_html(prompt, markdown=markdown)
    else:
        body = "".join(
            f'<div class="ak-turn ak-turn-{_role_class(m.get("role"))}"><div class="ak-role">'
            f'{html.escape(str(m.get("role", "?")))}</div>{text_html(str(m.get("content", "")), markdown=markdown)}</div>'
            for m in prompt)
    return f'<div class="ak-prompt">{body}</div>'


def _role_class(role: Any) -> str:
    return role if role in ("system", "user", "assistant", "tool") else "other"


def notice_html(text: str) -> str:
    """A line of our own (nothing left to label, ...), as text."""
    return f'<div class="ak-notice">{html.escape(text)}</div>'


PAGE_CSS = """
.ak-text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: var(--font-mono, monospace);
           font-size: 0.92em; line-height: 1.45; margin: 0; }
.ak-md { overflow-wrap: anywhere; line-height: 1.5; }
.ak-md pre { white-space: pre-wrap; padding: 0.5em; border-radius: 4px; background: var(--background-fill-secondary); }
.ak-cc { color: #b91c1c; background: #fee2e2; border-radius: 3px; padding: 0 2px; font-size: 0.8em;
         font-family: monospace; }
.ak-turn { border-left: 3px solid var(--border-color-primary); padding: 0.2em 0 0.4em 0.6em; margin-bottom: 0.5em; }
.ak-turn-assistant { border-left-color: #6366f1; }
.ak-turn-system { border-left-color: #a3a3a3; }
.ak-role { font-size: 0.75em; text-transform: uppercase; letter-spacing: 0.05em; opacity: 0.7; }
.ak-notice { font-style: italic; }
""" + PYGMENTS_CSS
