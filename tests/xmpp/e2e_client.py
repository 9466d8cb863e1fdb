"""End-to-end client for kontalk-registrar's XMPP component, with real software only.

slixmpp logs in anonymously to a real Prosody and talks XEP-0077 with Kontalk's forms to the
component; GnuPG makes the user keys and checks the returned certification. Nothing here uses
kontalk-registrar's own code.

usage: e2e_client.py PHASE C2S_PORT COMPONENT_JID OUTBOX HTTP_BASE
  PHASE "flow":    disco, form, register, conflict, force, attacker vs real client
  PHASE "remove":  an anonymous user's <remove/> is forbidden
  PHASE "events":  a logged-in user (watcher@events.localhost, the service's events.xmpp_to)
                   receives the key-replaced event of a forced re-registration
  PHASE "quiet":   after a quiet spell, the component still answers
  PHASE "restart": wait for the component to come back, then register another number
Exit status 0 when every check passed.
"""

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout

PHASE, PORT, COMPONENT, OUTBOX, HTTP = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
DOMAIN = "localhost"
X = "{jabber:x:data}"
CODE_FORM = "http://kontalk.org/protocol/register#code"
EVENTS_NS = "{urn:kontalk-registrar:events}"
WATCHER, WATCHER_PASSWORD = "watcher@events.localhost", "watcher-password"


def check(cond, what):
    if not cond:
        print("FAIL:", what, flush=True)
        sys.exit(1)
    print("ok:", what, flush=True)


class Session(ClientXMPP):
    """One anonymous connection (Kontalk clients use a new one for each step)."""

    def __init__(self):
        super().__init__(DOMAIN, "")  # empty password: SASL ANONYMOUS
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.enable_plaintext = True
        self.register_plugin("xep_0030")
        self.ready = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_start", self._started)

    def _started(self, _event):
        if not self.ready.done():
            self.ready.set_result(True)

    async def iq(self, itype, payload, timeout=20):
        iq = self.Iq()
        iq["type"] = itype
        iq["to"] = COMPONENT
        iq.append(ET.fromstring(payload))
        try:
            return ("result", ET.fromstring(str(await iq.send(timeout=timeout))))
        except IqError as e:
            err = e.iq["error"]
            return ("error", err["type"], err["condition"], err["text"], str(e.iq))

    async def close(self):
        self.disconnect()
        try:
            await asyncio.wait_for(self.disconnected, 10)
        except Exception:
            pass


async def open_session():
    s = Session()
    s.connect("127.0.0.1", PORT)
    await asyncio.wait_for(s.ready, 20)
    return s


def form(form_type, fields):
    xml = ["<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>",
           f"<field var='FORM_TYPE' type='hidden'><value>{form_type}</value></field>"]
    for var, value in fields.items():
        xml.append(f"<field var='{var}'><value>{value}</value></field>")
    xml.append("</x></query>")
    return "".join(xml)


def field(result, var):
    for f in result.iter(X + "field"):
        if f.get("var") == var:
            v = f.find(X + "value")
            return v.text if v is not None else None
    return None


def account(phone):
    return hashlib.sha1(phone.encode()).hexdigest()


def pin(phone, after=0):
    """The newest code the development provider delivered to `phone` (the user reads the SMS)."""
    deadline = time.time() + 20
    while time.time() < deadline:
        with open(OUTBOX) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        mine = [m for m in lines if m["to"] == phone]
        if len(mine) > after:
            return mine[-1]["code"], len(mine)
        time.sleep(0.2)
    check(False, f"a code reached the outbox for {phone}")


def gpg(home, *args, data=None):
    r = subprocess.run(["gpg", "--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback",
                        "--passphrase", "", *args], input=data, capture_output=True)
    if r.returncode != 0:
        print(r.stderr.decode(), file=sys.stderr)
        check(False, "gpg " + " ".join(args))
    return r.stdout


def new_key(phone):
    """A key made by GnuPG whose User ID names the account, as Kontalk clients make them."""
    home = tempfile.mkdtemp(prefix="g", dir="/tmp")
    os.chmod(home, 0o700)
    uid = f"E2E Test <{account(phone)}@{DOMAIN}>"
    gpg(home, "--quick-gen-key", uid, "ed25519", "cert", "never")
    fpr = [l.split(":")[9] for l in gpg(home, "--with-colons", "--list-keys").decode().splitlines()
           if l.startswith("fpr:")][0]
    gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "never")
    return fpr, base64.b64encode(gpg(home, "--export", fpr)).decode()


def certified_by_server(fpr, signed_b64):
    home = tempfile.mkdtemp(prefix="c", dir="/tmp")
    os.chmod(home, 0o700)
    server = urllib.request.urlopen(HTTP + "/v1/server-key").read()
    gpg(home, "--import", data=server)
    server_fpr = [l.split(":")[9] for l in gpg(home, "--with-colons", "--list-keys").decode().splitlines()
                  if l.startswith("fpr:")][0]
    gpg(home, "--import", data=base64.b64decode(signed_b64))
    sigs = gpg(home, "--with-colons", "--check-sigs", fpr).decode().splitlines()
    ours = [l.split(":") for l in sigs if l.startswith("sig:") and l.split(":")[4] == server_fpr[-16:]]
    return len(ours) == 1 and ours[0][1] == "!" and ours[0][10].startswith("10")


async def register(phone, force=False, after=0):
    """Steps 1 and 2 as a Kontalk client: step 2 on a new connection. Returns the number of codes
    seen for the phone and the fingerprint of the registered key."""
    s = await open_session()
    fields = {"phone": phone}
    if force:
        fields["force"] = "true"
    r = await s.iq("set", form("jabber:iq:register", fields))
    await s.close()
    check(r[0] == "result", f"step 1 for {phone} (force={force}): {r[:4]}")
    check(field(r[1], "from") not in (None, ""), "the sender id is given")
    check(field(r[1], "challenge") == "pin", "the challenge is pin")
    check(r[1].find(".//{jabber:iq:register}instructions") is not None, "instructions are given")
    code, seen = pin(phone, after)
    fpr, key = new_key(phone)
    s = await open_session()
    r = await s.iq("set", form(CODE_FORM, {"code": code, "publickey": key}))
    await s.close()
    check(r[0] == "result", f"step 2 for {phone}: {r[:4]}")
    signed = field(r[1], "publickey")
    check(signed is not None, "the signed key comes back")
    check(certified_by_server(fpr, signed), "GnuPG verifies the server's certification on the key")
    return seen, fpr


async def disco_ok(s, what):
    info = (await s.plugin["xep_0030"].get_info(jid=COMPONENT, timeout=20))["disco_info"]
    check("jabber:iq:register" in info["features"], what)
    return info


async def flow():
    phone = "+15555215554"
    s = await open_session()
    # Messages and presence are ignored, and a stanza the component cannot parse (a message of
    # an unknown type) does not take it down.
    s.send_raw(f"<message to='{COMPONENT}' id='m1' type='chat'><body>hello</body></message>")
    s.send_raw(f"<presence to='{COMPONENT}'/>")
    s.send_raw(f"<message to='{COMPONENT}' id='m2' type='no-such-type'><body>x</body></message>")
    await asyncio.sleep(0.5)
    await disco_ok(s, "the component answers after messages, presence and a bad stanza")
    info = (await s.plugin["xep_0030"].get_info(jid=COMPONENT, timeout=20))["disco_info"]
    check("jabber:iq:register" in info["features"], "disco#info lists jabber:iq:register")
    check(len(info["identities"]) >= 1, "disco#info has an identity")
    r = await s.iq("get", "<query xmlns='jabber:iq:register'/>")
    check(r[0] == "result", "the registration form comes back")
    vars_ = {f.get("var") for f in r[1].iter(X + "field")}
    check({"FORM_TYPE", "phone", "force", "fallback", "challenge"} <= vars_, f"form fields {sorted(vars_)}")
    options = [o.find(X + "value").text for o in r[1].iter(X + "option")]
    check("pin" in options and "callerid" not in options, f"challenge options {options}")
    await s.close()

    seen, _ = await register(phone)

    s = await open_session()
    r = await s.iq("set", form("jabber:iq:register", {"phone": phone}))
    check(r[:4] == ("error", "modify", "conflict", "Another user is registered with the same id."),
          f"conflict for the registered number: {r[:4]}")
    r = await s.iq("set", form("jabber:iq:register", {"phone": "not a number"}))
    check(r[0] == "error" and r[2] == "bad-request", f"bad number: {r[:4]}")
    await s.close()

    # Force: re-register, while an attacker with its own anonymous JID guesses codes for the
    # account with a key of its own. The real client still registers.
    s = await open_session()
    r = await s.iq("set", form("jabber:iq:register", {"phone": phone, "force": "true"}))
    await s.close()
    check(r[0] == "result", f"forced step 1: {r[:4]}")
    code, _ = pin(phone, seen)
    _, attacker_key = new_key(phone)
    attacker = await open_session()
    wrong = "000000" if code != "000000" else "111111"
    # A forced re-registration gives each requester three tries (and all but its holder six).
    for i in range(3):
        r = await attacker.iq("set", form(CODE_FORM, {"code": wrong, "publickey": attacker_key}))
        check(r[0] == "error" and r[2] == "bad-request", f"attacker's wrong code {i + 1}: {r[:4]}")
    r = await attacker.iq("set", form(CODE_FORM, {"code": wrong, "publickey": attacker_key}))
    check(r[0] == "error" and r[1] == "wait" and r[2] == "service-unavailable",
          f"the attacker is refused with a wait: {r[:4]}")
    await attacker.close()
    fpr, key = new_key(phone)
    s = await open_session()
    r = await s.iq("set", form(CODE_FORM, {"code": code, "publickey": key}))
    await s.close()
    check(r[0] == "result", f"the real client registers despite the attacker: {r[:4]}")
    check(certified_by_server(fpr, field(r[1], "publickey")), "its new key is certified")


class Watcher(ClientXMPP):
    """A real user logged in with a password: the service's events.xmpp_to."""

    def __init__(self):
        super().__init__(WATCHER, WATCHER_PASSWORD)
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.enable_plaintext = True
        self["feature_mechanisms"].unencrypted_plain = True
        self.ready = asyncio.get_running_loop().create_future()
        self.messages = asyncio.Queue()
        self.add_event_handler("session_start", self._started)
        self.add_event_handler("message", lambda m: self.messages.put_nowait(m))

    def _started(self, _event):
        # Available presence: the server delivers messages to the bare JID only to available
        # resources.
        self.send_presence()
        if not self.ready.done():
            self.ready.set_result(True)


async def remove():
    s = await open_session()
    r = await s.iq("set", "<query xmlns='jabber:iq:register'><remove/></query>")
    await s.close()
    check(r[:3] == ("error", "auth", "forbidden"), f"an anonymous user's <remove/> is forbidden: {r[:4]}")


async def events():
    w = Watcher()
    w.connect("127.0.0.1", PORT)
    await asyncio.wait_for(w.ready, 20)
    check(True, f"{WATCHER} is logged in")
    phone = "+15555215558"
    jid = f"{account(phone)}@{DOMAIN}"
    seen, old = await register(phone)
    _, new = await register(phone, force=True, after=seen)
    deadline = time.time() + 30
    event = None
    started = None
    while event is None:
        left = deadline - time.time()
        if left <= 0:
            check(False, "the key-replaced event reaches the watcher within 30 s")
        try:
            m = await asyncio.wait_for(w.messages.get(), left)
        except asyncio.TimeoutError:
            continue
        e = m.xml.find(EVENTS_NS + "event")
        print("message:", str(m), flush=True)
        if e is not None and e.get("jid") == jid and e.get("type") == "reregistration-started":
            started = e
        if e is not None and e.get("jid") == jid and e.get("type") == "key-replaced":
            event, message = e, m
    check(True, "the key-replaced event reaches the watcher")
    check(started is not None, "the forced start's reregistration-started event came before it")
    check(started.get("old-fingerprint") == old,
          f"it names the key that would be replaced: {started.get('old-fingerprint')} == {old}")
    check(str(message["from"]) == COMPONENT, f"the event comes from the component: {message['from']}")
    check(message["type"] == "normal", f"a normal message: {message['type']}")
    check(message["id"] == "event-" + event.get("id"), f"the message id names the event: {message['id']}")
    check(message["body"] == f"key-replaced {jid}", f"the body: {message['body']}")
    check(event.get("account") == account(phone), "the event names the account")
    check(event.get("old-fingerprint") == old, f"old fingerprint {event.get('old-fingerprint')} == {old}")
    check(event.get("new-fingerprint") == new, f"new fingerprint {event.get('new-fingerprint')} == {new}")
    check(bool(event.get("at")), "the event has a time")
    w.disconnect()


async def quiet():
    s = await open_session()
    await disco_ok(s, "the component still answers after a quiet spell")
    await s.close()


async def restart():
    # The XMPP server restarted: wait until the component is back, then register.
    deadline = time.time() + 60
    while True:
        try:
            s = await open_session()
            info = (await s.plugin["xep_0030"].get_info(jid=COMPONENT, timeout=5))["disco_info"]
            await s.close()
            if "jabber:iq:register" in info["features"]:
                break
        except (IqError, IqTimeout, asyncio.TimeoutError, OSError):
            pass
        check(time.time() < deadline, "the component reconnects within 60 s")
        await asyncio.sleep(1)
    check(True, "the component is back after the server restart")
    await register("+15555215556")


async def main():
    await {"flow": flow, "remove": remove, "events": events, "quiet": quiet, "restart": restart}[PHASE]()
    print("PASS", PHASE, flush=True)


asyncio.run(main())
