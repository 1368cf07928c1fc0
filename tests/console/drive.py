#!/usr/bin/env python3
"""Drive the console in headless Chromium over the DevTools protocol.

Used by tests/api/console.rs: `drive.py BASE_URL API_KEY APP_SECRET PNID
OPEN_WA_ID CLOSED_WA_ID OUT_DIR`. Talks to Chromium through
--remote-debugging-pipe (fd 3 in, fd 4 out, NUL-terminated JSON), so it
needs nothing but Python's standard library. Prints one JSON object of
what it saw; exits non-zero (with the reason on stderr) when a step does
not happen within its time.
"""

import base64
import fcntl
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request


def high(fd):
    """`fd` moved above 9, so that placing the child's ends at 3 and 4
    never overwrites one of them."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    def __init__(self):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            raise SystemExit("chromium is not installed (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="wa-router-console-")
        to_child_r, self.to_child = (high(fd) for fd in os.pipe())
        self.from_child, from_child_w = (high(fd) for fd in os.pipe())

        def fds():
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             "--remote-debugging-pipe", "--user-data-dir=" + self.profile, "about:blank"],
            preexec_fn=fds, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf = b""
        self.next_id = 0
        self.session = None
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method, params=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.to_child, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.from_child, 1 << 16)
                if not chunk:
                    raise SystemExit("chromium closed the DevTools pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise SystemExit(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression):
        r = self.call("Runtime.evaluate", {"expression": expression,
                                           "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in r:
            raise SystemExit(f"script failed: {expression}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait(self, what, expression, seconds=15):
        deadline = time.time() + seconds
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise SystemExit(f"timed out waiting for {what}")

    def size(self, width, height):
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1,
                   "mobile": width < 700})

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def signed_hi(base, secret, pnid, wa_id, name):
    """Post Meta's notification of a text "hi" from `wa_id`, signed."""
    body = json.dumps({"object": "whatsapp_business_account", "entry": [{
        "id": "310298475561023", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": pnid},
            "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
            "messages": [{"from": wa_id, "id": f"wamid.console.{time.time_ns()}",
                          "timestamp": str(int(time.time())), "type": "text",
                          "text": {"body": "hi"}}]}}]}]}).encode()
    sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(base + "/webhook", data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": sig})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, resp.status


def handed_off(base, key, wa_id):
    """Whether the server shows the conversation with `wa_id` handed off."""
    req = urllib.request.Request(f"{base}/v1/conversations/main/{wa_id}",
                                 headers={"X-API-Key": key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["handoff"]["active"]


def main():
    base, key, secret, pnid, open_id, closed_id, out = sys.argv[1:8]
    os.makedirs(out, exist_ok=True)
    seen = {}
    b = Browser()
    try:
        b.size(1440, 900)
        b.call("Page.navigate", {"url": base + "/console"})
        b.wait("the login form", "!!document.getElementById('login-form')")
        # A wrong key is refused with a message, and nothing else shows.
        b.js("document.getElementById('key').value = 'not-the-key';"
             "document.getElementById('login-form').requestSubmit()")
        seen["wrong_key"] = b.wait("the refusal", "(() => { const e = document.getElementById('login-error');"
                                   " return !e.classList.contains('hidden') && e.textContent })()")
        b.js(f"document.getElementById('key').value = {json.dumps(key)};"
             "document.getElementById('login-form').requestSubmit()")
        b.wait("the conversation list", f"!!document.querySelector('#conversations li[data-wa-id=\"{open_id}\"]')")
        seen["countdown"] = b.wait("a live countdown", f"""(() => {{
            const li = document.querySelector('#conversations li[data-wa-id="{open_id}"]');
            const t = li && li.querySelector('[data-expires]').textContent;
            return t && /left$/.test(t) && t }})()""")
        seen["list_order"] = b.js("[...document.querySelectorAll('#conversations li')].map(li => li.dataset.waId)")
        # A new message appears without a reload (the live stream).
        signed_hi(base, secret, pnid, "16315550042", "Live Lee")
        b.wait("the live message", "!!document.querySelector('#conversations li[data-wa-id=\"16315550042\"]')")
        seen["live"] = True
        b.screenshot(os.path.join(out, "console-1440-list.png"))
        # Open the conversation, reply, watch the reply turn `sent`.
        b.js(f"document.querySelector('#conversations li[data-wa-id=\"{open_id}\"]').click()")
        b.wait("the messages", "document.querySelectorAll('#messages li').length > 0")
        b.wait("the reply box", "!document.getElementById('reply-form').classList.contains('hidden')")
        b.js("document.getElementById('reply').value = 'Hello from the console';"
             "document.getElementById('reply-form').requestSubmit()")
        seen["reply_status"] = b.wait("the reply sent", """(() => {
            const out = [...document.querySelectorAll('#messages li.out')]
              .find(li => li.textContent.includes('Hello from the console'));
            const s = out && out.querySelector('.status').textContent;
            return s && / · (sent|delivered|read)$/.test(s) && s })()""")
        seen["reply_id"] = b.js("""[...document.querySelectorAll('#messages li.out')]
            .find(li => li.textContent.includes('Hello from the console')).dataset.id""")
        b.screenshot(os.path.join(out, "console-1440-conversation.png"))
        # Take over (handoff) with the keyboard: focus the button, press Enter.
        # A live update may redraw the pane between the focus and the key
        # (the key then lands nowhere): press again only if the server
        # shows no handoff, so a press is never undone by the next.
        badge = """(() => {
            const m = document.getElementById('c-meta').textContent;
            return m.includes('handed off') && document.getElementById('handoff').textContent })()"""
        for attempt in range(3):
            b.js("document.getElementById('handoff').focus()")
            b.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Enter", "code": "Enter",
                                              "windowsVirtualKeyCode": 13, "text": "\r"})
            b.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Enter", "code": "Enter",
                                              "windowsVirtualKeyCode": 13})
            try:
                seen["handoff"] = b.wait("the handoff badge", badge, seconds=5)
                break
            except SystemExit:
                if attempt == 2 or handed_off(base, key, open_id):
                    seen["handoff"] = b.wait("the handoff badge", badge)
                    break
        # The queues, with the account.
        b.js("document.getElementById('show-queues').click()")
        seen["queues"] = b.wait("the queue table", """(() => {
            const rows = [...document.querySelectorAll('#q-body tr')].map(r => r.firstChild.textContent);
            return rows.length > 0 && rows })()""")
        # A closed window: no text box, the template form instead.
        b.js(f"document.querySelector('#conversations li[data-wa-id=\"{closed_id}\"]').click()")
        b.wait("the closed conversation", f"document.getElementById('c-meta').textContent.includes('{closed_id}')")
        seen["closed"] = b.wait("the template form", """(() => {
            const t = !document.getElementById('template-form').classList.contains('hidden');
            const r = document.getElementById('reply-form').classList.contains('hidden');
            const n = document.getElementById('closed-note');
            return t && r && !n.classList.contains('hidden') && n.textContent })()""")
        # Opt the contact out, then send a template: the page shows the
        # API's refusal (403 opted_out) from its error envelope.
        b.js("document.getElementById('optout').click()")
        b.wait("the opt-out badge", "document.getElementById('c-meta').textContent.includes('opted out')")
        b.js("document.getElementById('t-name').value = 'order_update';"
             "document.getElementById('template-form').requestSubmit()")
        seen["error_shown"] = b.wait("the refusal on the page", """(() => {
            const e = document.getElementById('error');
            return !e.classList.contains('hidden') && e.textContent })()""")
        b.size(375, 800)
        b.js(f"document.querySelector('#conversations li[data-wa-id=\"{open_id}\"]').click()")
        b.wait("the conversation at 375 px", "document.querySelectorAll('#messages li').length > 0")
        seen["narrow_overflow"] = b.js("document.documentElement.scrollWidth > window.innerWidth")
        b.screenshot(os.path.join(out, "console-375-conversation.png"))
        b.size(375, 800)
        b.js(f"document.querySelector('#conversations li[data-wa-id=\"{closed_id}\"]').click()")
        b.wait("the closed conversation at 375 px", "!document.getElementById('template-form').classList.contains('hidden')")
        b.screenshot(os.path.join(out, "console-375-template.png"))
    finally:
        b.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
