// alignkit labeling: the page's own script, served by labeling_ui/guard.py with the page's nonce.
//
// What it guarantees in the browser (the server checks the same things again, whatever this script does):
// - a vote, skip or key press acts on the item that is rendered: while one is on its way, further presses
//   are ignored until the server's answer has rendered, and an item shown for less than its minimum
//   (data-ak-min-ms on the prompt) takes no vote;
// - keys: the digit in a vote button's label (1 = A better, 2 = B better, 3 = tie, 4 = both bad, or 1-6 / 1-9, 0
//   with a strength scale); s = skip, u = undo
//   (Label); s = skip, u = undo the vote, r = reveal the models, n = next battle (Arena); ignored while typing in a text field; on a touch screen the
//   buttons lose their key hints; a ranking task or a store's per-criterion questions (radio groups marked
//   `ak-ask`): a digit picks that option (rank, or 1 A / 2 B / 3 tie / 4 both bad) of the first question with
//   none picked, Backspace clears them, Enter submits;
// - the two responses scroll together, so the same part of each is in view;
// - a session that ended (logout, password change, expiry, server restart) is said on the page at once;
// - a login refused for too many attempts says until when (Gradio's login form shows nothing for it);
// - the rationale box shows its length against its limit.
(function () {
  "use strict";
  // Digits press the button (of the tab in view) whose label ends with "[digit]": the vote buttons, however many a
  // store's strength scale makes. Letters are fixed.
  var LETTERS = {"s": ["ak-skip", "ak-arena-skip"], "u": ["ak-undo", "ak-arena-undo"], "n": ["ak-arena-next"],
                 "r": ["ak-arena-show-models"]};
  // The prompt block naming the item a button acts on; undo and next act on none, but wait like the others.
  var ASK_KEYS = {"enter": ["ak-submit-ranking", "ak-submit-answers"],
                  "backspace": ["ak-clear-ranks", "ak-clear-answers"]};
  function promptFor(id) {
    if (id === "ak-skip" || id.indexOf("ak-vote-") === 0 || id === "ak-undo" || id === "ak-submit-ranking" ||
        id === "ak-submit-answers") return "ak-prompt";
    if (id.indexOf("ak-arena-") === 0) return "ak-arena-prompt";
    return null;
  }
  var ACTS_ON_NONE = ["ak-undo", "ak-arena-next", "ak-arena-undo", "ak-arena-show-models"];
  function actsOnItem(id) { return ACTS_ON_NONE.indexOf(id) < 0; }
  var STUCK_MS = 10000;  // no answer rendered by then: let the annotator try again
  var views = {};  // prompt element id -> {item, render, shownAt, busySince}
  var sessionEnded = false;

  function view(id) {
    if (!views[id]) views[id] = {item: null, render: null, shownAt: 0, busySince: 0};
    return views[id];
  }

  function marks(id) {
    var el = document.querySelector("#" + id + " [data-ak-render]");
    if (!el) return null;
    return {item: el.getAttribute("data-ak-item"), render: el.getAttribute("data-ak-render"),
            minMs: parseInt(el.getAttribute("data-ak-min-ms") || "0", 10)};
  }

  // Called on every DOM change: a new render token means the server answered; a new item starts its clock.
  function observe() {
    ["ak-prompt", "ak-arena-prompt"].forEach(function (id) {
      var m = marks(id);
      if (!m) return;
      var v = view(id);
      if (m.render !== v.render) {
        v.render = m.render;
        v.busySince = 0;
      }
      if (m.item !== v.item) {
        v.item = m.item;
        v.shownAt = performance.now();
      }
    });
    decorateRationale();
    linkScrolling();
    dropKeyHints();
  }

  // Scrolling one response scrolls the other to the same fraction of its length.
  function linkScrolling() {
    [["ak-left", "ak-right"], ["ak-arena-left", "ak-arena-right"]].forEach(function (ids) {
      var boxes = ids.map(function (id) { return document.querySelector("#" + id + " .ak-response"); });
      if (!boxes[0] || !boxes[1] || boxes[0].getAttribute("data-ak-linked")) return;
      var syncing = false;
      boxes.forEach(function (box, i) {
        box.setAttribute("data-ak-linked", "1");
        box.addEventListener("scroll", function () {
          if (syncing) { syncing = false; return; }
          var other = boxes[1 - i], range = box.scrollHeight - box.clientHeight;
          syncing = true;
          other.scrollTop = range > 0 ? (box.scrollTop / range) * (other.scrollHeight - other.clientHeight) : 0;
        });
      });
    });
  }

  var touch = window.matchMedia && window.matchMedia("(hover: none) and (pointer: coarse)").matches;
  function dropKeyHints() {
    if (!touch) return;
    document.querySelectorAll("button[id^=ak-]").forEach(function (b) {
      if (/\s*\[[^\]]+\]\s*$/.test(b.textContent)) b.textContent = b.textContent.replace(/\s*\[[^\]]+\]\s*$/, "");
    });
  }

  function allowed(buttonId) {
    var promptId = promptFor(buttonId);
    if (!promptId) return true;
    if (sessionEnded) return false;
    var v = view(promptId), m = marks(promptId), now = performance.now();
    if (v.busySince && now - v.busySince < STUCK_MS) return false;
    if (actsOnItem(buttonId)) {
      if (!m || m.item === null || m.item === "") return false;  // nothing on screen to act on
      if (now - v.shownAt < m.minMs) return false;
    }
    return true;
  }

  function visible(el) { return el && !el.disabled && el.offsetParent !== null; }

  // The questions in view (a ranking's ranks, or a pair's criteria), in order.
  function askGroups() {
    return Array.prototype.filter.call(document.querySelectorAll(".ak-ask"), visible);
  }

  // A digit picks that option of the first question with none picked; true when it did.
  function answerNext(digit) {
    var groups = askGroups();
    for (var i = 0; i < groups.length; i++) {
      var options = groups[i].querySelectorAll("input[type=radio]");
      if (Array.prototype.some.call(options, function (o) { return o.checked; })) continue;
      var option = options[parseInt(digit, 10) - 1];
      if (option) option.click();
      return true;  // a digit beyond the options is taken too: it must not vote on anything else
    }
    return groups.length > 0;
  }

  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    // Radio buttons and check boxes take no typing: keys go on working after one was clicked.
    var typing = t && (t.tagName === "TEXTAREA" || t.isContentEditable ||
                       (t.tagName === "INPUT" && !t.readOnly && t.type !== "radio" && t.type !== "checkbox"));
    if (typing) return;
    var key = (e.key || "").toLowerCase(), candidates;
    if (key === "enter" && t && t.tagName === "BUTTON") return;  // Enter presses the focused button itself
    if (/^[1-9]$/.test(key) && askGroups().length) {
      e.preventDefault();
      answerNext(key);
      return;
    }
    if (ASK_KEYS[key]) {
      candidates = ASK_KEYS[key].map(function (id) { return document.getElementById(id); });
    } else if (/^[0-9]$/.test(key)) {
      var hint = "[" + key + "]";
      candidates = Array.prototype.filter.call(document.querySelectorAll("button[id^=ak-vote-], button[id^=ak-arena-]"),
        function (b) { return b.textContent.trim().slice(-hint.length) === hint; });
    } else {
      candidates = (LETTERS[key] || []).map(function (id) { return document.getElementById(id); });
    }
    for (var i = 0; i < candidates.length; i++) {
      var el = candidates[i];
      // A key clicks the button of the tab in view only (a hidden tab's buttons have no offsetParent).
      if (visible(el)) { e.preventDefault(); el.click(); return; }
    }
  });

  // Capture phase, on window: runs before Gradio's own click handler on the button, so a refused click
  // never becomes an event. Keys go through here too (they click the button).
  window.addEventListener("click", function (e) {
    var button = e.target && e.target.closest ? e.target.closest("button[id]") : null;
    if (!button) return;
    if (button.id === "ak-logout") {
      e.stopPropagation(); e.preventDefault();
      logout();
      return;
    }
    var promptId = promptFor(button.id);
    if (!promptId) return;
    if (!allowed(button.id)) {
      e.stopPropagation(); e.preventDefault();
      if (sessionEnded) showEnded();
      return;
    }
    view(promptId).busySince = performance.now();
    checkSession();
  }, true);

  function banner(id, text, action) {
    var el = document.getElementById(id);
    if (!el) {
      el = document.createElement("div");
      el.id = id;
      el.setAttribute("role", "alert");
      el.style.cssText = "position:fixed;top:0;left:0;right:0;z-index:2147483647;padding:14px 18px;" +
        "background:#b91c1c;color:#fff;font:16px/1.4 system-ui,sans-serif;text-align:center;";
      document.body.appendChild(el);
    }
    el.textContent = text + " ";
    if (action) {
      var b = document.createElement("button");
      b.textContent = action.label;
      b.style.cssText = "margin-left:12px;padding:4px 12px;font:inherit;cursor:pointer;";
      b.addEventListener("click", action.run);
      el.appendChild(b);
    }
    return el;
  }

  function showEnded() {
    banner("ak-session-ended", "Your session ended \u2014 log in again.",
           {label: "Log in", run: function () { location.reload(); }});
  }

  var lastCheck = 0;
  function checkSession(force) {
    if (!document.getElementById("ak-prompt")) return;  // the login page: nothing to check
    var now = Date.now();
    if (!force && now - lastCheck < 1000) return;
    lastCheck = now;
    fetch("alignkit/session", {credentials: "same-origin", cache: "no-store"}).then(function (r) {
      if (r.status === 401) { sessionEnded = true; showEnded(); }
    }).catch(function () { /* the server is down: the next check says so once it is back */ });
  }
  setInterval(function () { checkSession(true); }, 15000);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) checkSession(true); });

  function logout() {
    fetch("logout", {method: "POST", credentials: "same-origin"}).finally(function () { location.reload(); });
  }

  // Gradio's login form shows a message for 400 only; a 429 from the throttle says until when.
  var nativeFetch = window.fetch;
  window.fetch = function (input, init) {
    var url = typeof input === "string" ? input : (input && input.url) || "";
    var isLogin = init && init.method === "POST" && /\/login\/?$/.test(new URL(url, location.href).pathname);
    var pending = nativeFetch.apply(this, arguments);
    if (!isLogin) return pending;
    return pending.then(function (response) {
      var old = document.getElementById("ak-login-message");
      if (old) old.remove();
      if (response.status === 429) {
        response.clone().json().then(function (body) {
          var text = body.detail;
          if (body.retry_at) {
            var at = new Date(Math.ceil(body.retry_at / 60) * 60 * 1000);
            text = text.replace(/\d\d:\d\d/, at.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}));
          }
          banner("ak-login-message", text);
        });
      }
      return response;
    });
  };

  function decorateRationale() {
    var box = document.querySelector("#ak-rationale textarea");
    if (!box || box.getAttribute("data-ak-counted")) return;
    box.setAttribute("data-ak-counted", "1");
    box.setAttribute("dir", "auto");
    var counter = document.createElement("div");
    counter.id = "ak-rationale-count";
    counter.style.cssText = "font-size:0.8em;opacity:0.7;text-align:right;";
    (box.closest("label") || box.parentNode).insertAdjacentElement("afterend", counter);
    var limit = box.getAttribute("maxlength");
    var update = function () { counter.textContent = box.value.length + (limit ? " / " + limit : "") + " characters"; };
    box.addEventListener("input", update);
    setInterval(update, 500);  // Gradio sets the value from the server without an input event
    update();
  }

  new MutationObserver(observe).observe(document.documentElement, {childList: true, subtree: true,
                                                                     characterData: true, attributes: true,
                                                                     attributeFilter: ["data-ak-render"]});
})();
