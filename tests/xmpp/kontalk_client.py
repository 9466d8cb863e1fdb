#!/usr/bin/env python3
"""An independent test client that behaves like Kontalk's Android client.

It speaks XMPP itself (socket + ssl + an XML pull parser) so that the stanzas are exactly the
ones Kontalk's `RegistrationService` (androidclient, Smack 4.3) sends, on the connections it
sends them on; slixmpp is used only for the chat between two registered accounts. Keys are
made by GnuPG, certificates by `kontalk_bridge` (Kontalk's `X509Bridge` byte for byte). Nothing
here uses kontalk-registrar's code.

Android's sequence (androidclient `RegistrationService`, `XMPPConnectionHelper`,
`KontalkConnection`): every step is a new connection, STARTTLS required, SNI = the domain.
  A. no client certificate: `<iq type='get'><query xmlns='jabber:iq:register'/></iq>` to the
     domain; anything but a result stops the registration (`nextResultOrThrow`);
  B. no client certificate: iq set, form FORM_TYPE=jabber:iq:register, `phone`, then
     `accept-terms`=true (if accepted), `force`=true (if forcing), `fallback`=true, or else
     `challenge`=pin; the answer's form must have `from`;
  C. the bridge certificate of the still uncertified key, no login: iq set, form
     FORM_TYPE=http://kontalk.org/protocol/register#code with only `code`; the answer's form has
     `publickey` (base64 of the certified key);
  D. the bridge certificate of the certified key, SASL EXTERNAL with the initial response `=`,
     resource bind, stream management without resumption.

(Android does not look at the `register` stream feature; this client stops without it unless
--ignore-register-feature.)

Usage: kontalk_client.py [--host H] [--port P] [--domain D] [--timeout S] [--cafile F]
                         [--http URL] [--trace] SUBCOMMAND [options]   (--help of each)
  keygen --home DIR --phone +1555... [--type rsa|ed25519] [--name N]
  cert --home DIR --out F [--variant android|mismatch|other-domain|names-other-domain|sha256]
  instructions                       connection A only
  request --phone P [--force] [--challenge pin|''] [--fallback] [--accept-terms] [--skip-get]
  submit-code --home DIR (--code C | --outbox F)
  register --home DIR --phone P --outbox F [--force] [--type T] [--new-key] [--login]
  login --home DIR [--fingerprint OLD | --cert F --key K] [--resource R] [--hold S]
  registered-get | remove --home DIR
  rollover --home DIR [--revoked] [--no-certify]
  upload-key --home DIR --passphrase P
  retrieve-key --home NEWDIR --token T --passphrase P [--phone P] [--login]
  chat --home DIR --to-home DIR [--body B]
  raw --stanza XML [--home DIR (--login | --with-cert)]
A home holds `gnupg/` (GNUPGHOME), `keys/<FPR>.pub.gpg` (the key as last known: exported, or
as the server certified it), `keys/<FPR>.crt.pem` + `.key.pem` (its bridge certificate, PKCS#8
key) and `state.json` (phone, account, domain, current fingerprint, previous ones, token).

Every outcome is one JSON object on a line of standard output, with `step` (keygen,
instructions, terms, request, sms, code, login, registered-get, remove, rollover, upload-key,
retrieve-key, chat, raw, cert), `ok`, the server's `answer` (type, instructions, form `fields`,
`registered`, `account`, `error`, `xml`) and, for refusals, `error` = {condition, type, text,
extra: [children such as <retry/>]} (SASL failures: type "sasl"; stream errors: type "stream").
Exit status: 0 when the protocol exchange completed (whatever the server answered, refusals
included), 2 for a client bug or bad input, 3 for a broken connection (TCP, TLS, a closed stream
or a timeout); those two print {"ok": false, "fatal": {"kind", "text"}}.

Examples (the registrar's development provider writes the codes to outbox.jsonl):
  kontalk_client.py --port 5222 --http http://127.0.0.1:8080 register --home /tmp/a \
      --phone +15555215554 --outbox data/outbox.jsonl --login
  kontalk_client.py chat --home /tmp/a --to-home /tmp/b
  kontalk_client.py cert --home /tmp/a --variant mismatch --out /tmp/m.crt.pem
  kontalk_client.py login --home /tmp/a --cert /tmp/m.crt.pem --key /tmp/m.crt.key.pem
"""

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import socket
import ssl
import string
import sys
import tempfile
import time
import traceback
import urllib.request
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kontalk_bridge as kb  # noqa: E402

NS_STREAM = "http://etherx.jabber.org/streams"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_SM = "urn:xmpp:sm:3"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
NS_REGISTER = "jabber:iq:register"
NS_REGISTER_FEATURE = "http://jabber.org/features/iq-register"
NS_XDATA = "jabber:x:data"
NS_ACCOUNT = "http://kontalk.org/protocol/register#account"
NS_PING = "urn:xmpp:ping"
FORM_CODE = "http://kontalk.org/protocol/register#code"
FORM_KEY = "http://kontalk.org/protocol/register#key"
FORM_PRIVATEKEY = "http://kontalk.org/protocol/register#privatekey"


def q(ns, name):
    return f"{{{ns}}}{name}"


def emit(obj):
    print(json.dumps(obj, sort_keys=False), flush=True)


class ConnectionFailed(Exception):
    """The connection broke: TCP, TLS, the stream closed, or no answer in time (exit 3)."""


class StreamError(Exception):
    """The server sent <stream:error/> (a protocol outcome)."""

    def __init__(self, condition, text):
        super().__init__(f"stream error {condition}: {text}")
        self.condition, self.text = condition, text


class ClientBug(Exception):
    """Bad input or a bug of this client (exit 2)."""


# ---------------------------------------------------------------------------------------------
# The raw XMPP stream

def stanza_id(_counter=[0], _prefix="".join(random.choice(string.ascii_letters + string.digits) for _ in range(5))):
    """Smack-like stanza ids: a random prefix and a counter (e.g. 80zgA-18)."""
    _counter[0] += 1
    return f"{_prefix}-{_counter[0]}"


class Stream:
    """One client connection, as Smack's XMPPTCPConnection with SecurityMode.required."""

    def __init__(self, opts, certfile=None, keyfile=None):
        self.host, self.port, self.domain = opts.host, opts.port, opts.domain
        self.timeout = opts.timeout
        self.cafile = opts.cafile
        self.trace = opts.trace
        self.certfile, self.keyfile = certfile, keyfile
        self.sock = None
        self.pending = []
        self.inbox = []
        self.closed = False
        self.features = None
        self.tls = None
        self.sm_enabled = False
        self.handled = 0
        self.jid = None
        self.sasl_initial_response = None

    # -- low level
    def _trace(self, direction, data):
        if self.trace:
            print(f"{direction} {data}", file=sys.stderr, flush=True)

    def send(self, data):
        self._trace("C:", data)
        try:
            self.sock.sendall(data.encode("utf-8"))
        except (OSError, ssl.SSLError) as e:
            raise ConnectionFailed(f"sending failed: {e}") from e

    def _events(self):
        for ev, el in self.parser.read_events():
            if ev == "start":
                self.depth += 1
                if self.depth == 1:
                    self.root = el
            else:
                self.depth -= 1
                if self.depth == 1:
                    self._trace("S:", to_xml(el))
                    self.pending.append(el)
                    self.root.remove(el)
                elif self.depth == 0:
                    self._trace("S:", "</stream:stream>")
                    self.closed = True

    def next(self, timeout=None):
        """The next top-level element of the stream."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.pending:
            if self.closed:
                raise ConnectionFailed("the server closed the stream")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionFailed(f"no answer from the server within {timeout or self.timeout} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ssl.SSLError as e:
                raise ConnectionFailed(f"TLS: {e}") from e
            except OSError as e:
                raise ConnectionFailed(f"receiving failed: {e}") from e
            if not data:
                self.closed = True
                if not self.pending:
                    raise ConnectionFailed("the server closed the connection")
                break
            try:
                self.parser.feed(data)
            except ET.ParseError as e:
                raise ConnectionFailed(f"the server sent malformed XML: {e}") from e
            self._events()
        el = self.pending.pop(0)
        if el.tag == q(NS_STREAM, "error"):
            cond, text = "undefined-condition", None
            for c in el:
                if c.tag == q(NS_STREAMS_ERR, "text"):
                    text = c.text
                elif c.tag.startswith("{" + NS_STREAMS_ERR + "}"):
                    cond = c.tag.split("}")[1]
            self.closed = True
            raise StreamError(cond, text)
        return el

    def _open(self):
        """Opens a stream (Smack 4.3's StreamOpen: to = the service domain, no from for
        EXTERNAL logins) and reads its features."""
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.root = None
        self.send(f"<stream:stream xmlns='jabber:client' to={quoteattr(self.domain)} "
                  f"xmlns:stream='{NS_STREAM}' version='1.0' xml:lang='en'>")
        el = self.next()
        if el.tag != q(NS_STREAM, "features"):
            raise ConnectionFailed(f"expected stream features, got {el.tag}")
        self.features = el

    # -- connection
    def connect(self):
        """TCP, stream, STARTTLS (required, as Kontalk's SecurityMode.required), TLS with the
        client certificate when one is given, new stream."""
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {e}") from e
        self._open()
        if self.features.find(q(NS_TLS, "starttls")) is None:
            raise ConnectionFailed("the server offers no STARTTLS (Kontalk requires TLS)")
        self.send(f"<starttls xmlns='{NS_TLS}'/>")
        el = self.next()
        if el.tag != q(NS_TLS, "proceed"):
            raise ConnectionFailed(f"STARTTLS refused: {el.tag}")
        try:
            ctx, how = kb.client_context(self.certfile, self.keyfile, self.cafile)
        except kb.BridgeError as e:
            raise ClientBug(str(e)) from e
        raw = self.sock
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname=self.domain, do_handshake_on_connect=False)
            self.sock.settimeout(self.timeout)
            self.sock.do_handshake()
        except (ssl.SSLError, OSError) as e:
            raise ConnectionFailed(f"TLS handshake failed: {e}") from e
        self.tls = {"version": self.sock.version(), "cipher": self.sock.cipher()[0],
                    "client_certificate": self.certfile is not None, "certificate_loading": how}
        self._open()
        return self

    def register_feature(self):
        return self.features.find(q(NS_REGISTER_FEATURE, "register")) is not None

    def mechanisms(self):
        m = self.features.find(q(NS_SASL, "mechanisms"))
        return [x.text for x in m.findall(q(NS_SASL, "mechanism"))] if m is not None else []

    def close(self):
        if self.sock is None:
            return
        try:
            if not self.closed:
                self.send("</stream:stream>")
                end = time.monotonic() + 2
                while not self.closed and time.monotonic() < end:
                    try:
                        self.next(timeout=max(0.1, end - time.monotonic()))
                    except (ConnectionFailed, StreamError):
                        break
        except ConnectionFailed:
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # -- stanzas
    def _count(self, el):
        if self.sm_enabled and el.tag in (q("jabber:client", "iq"), q("jabber:client", "message"),
                                          q("jabber:client", "presence")):
            self.handled += 1

    def _service(self, el):
        """Handles what is not the awaited answer: SM ack requests, server iqs, and messages
        and presences (kept in the inbox). Returns True when handled."""
        if el.tag == q(NS_SM, "r"):
            self.send(f"<a xmlns='{NS_SM}' h='{self.handled}'/>")
            return True
        if el.tag == q(NS_SM, "a"):
            return True
        self._count(el)
        if el.tag == q("jabber:client", "iq") and el.get("type") in ("get", "set"):
            to = f" to={quoteattr(el.get('from'))}" if el.get("from") else ""
            sid = quoteattr(el.get("id", ""))
            if el.find(q(NS_PING, "ping")) is not None:
                self.send(f"<iq type='result' id={sid}{to}/>")
            else:
                self.send(f"<iq type='error' id={sid}{to}><error type='cancel'>"
                          f"<service-unavailable xmlns='{NS_STANZAS}'/></error></iq>")
            return True
        self.inbox.append(el)
        return True

    def iq(self, itype, payload="", to=None, timeout=None):
        """Sends an iq (to the service domain, as Kontalk does) and returns the answer."""
        sid = stanza_id()
        to = self.domain if to is None else to
        to_attr = f" to={quoteattr(to)}" if to else ""
        self.send(f"<iq{to_attr} id={quoteattr(sid)} type={quoteattr(itype)}>{payload}</iq>")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionFailed(f"no answer to iq {sid} within {timeout or self.timeout} s")
            el = self.next(timeout=left)
            if (el.tag == q("jabber:client", "iq") and el.get("id") == sid
                    and el.get("type") in ("result", "error")):
                self._count(el)
                return el
            self._service(el)

    def sasl_external(self, initial="="):
        """SASL EXTERNAL as Smack 4.3 sends it for an empty authorization identity: the initial
        response `=` (RFC 6120 6.4.2, a zero-length response). Returns None on success, else
        the error dict."""
        mechs = self.mechanisms()
        if "EXTERNAL" not in mechs:
            return {"condition": "no-external-mechanism", "type": "sasl",
                    "text": f"the server offers {mechs}"}
        self.sasl_initial_response = initial
        body = initial if initial is not None else ""
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>{escape(body)}</auth>")
        for _ in range(3):
            el = self.next()
            if el.tag == q(NS_SASL, "success"):
                self._open()
                return None
            if el.tag == q(NS_SASL, "failure"):
                cond, text = "not-authorized", None
                for c in el:
                    if c.tag == q(NS_SASL, "text"):
                        text = c.text
                    else:
                        cond = c.tag.split("}")[1]
                return {"condition": cond, "type": "sasl", "text": text}
            if el.tag == q(NS_SASL, "challenge"):
                self.send(f"<response xmlns='{NS_SASL}'/>")
                continue
            raise ConnectionFailed(f"unexpected answer to SASL: {el.tag}")
        raise ConnectionFailed("SASL did not end")

    def sasl_plain_or_anonymous(self, mech, user=None, password=None):
        """For self-tests against a stock Prosody only (it has no EXTERNAL)."""
        if mech == "ANONYMOUS":
            self.send(f"<auth xmlns='{NS_SASL}' mechanism='ANONYMOUS'>=</auth>")
        else:
            tok = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            self.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{tok}</auth>")
        el = self.next()
        if el.tag == q(NS_SASL, "success"):
            self._open()
            return None
        return {"condition": (list(el)[0].tag.split("}")[1] if len(el) else "not-authorized"), "type": "sasl"}

    def bind(self, resource):
        """Resource binding, then the session if the server needs it, then stream management
        (Kontalk: enabled, without resumption) when offered."""
        if self.features.find(q(NS_BIND, "bind")) is None:
            raise ConnectionFailed("no resource binding offered after SASL")
        res = f"<resource>{escape(resource)}</resource>" if resource else ""
        r = self.iq("set", f"<bind xmlns='{NS_BIND}'>{res}</bind>", to="")
        if r.get("type") != "result":
            return None, describe_error(r.find(q("jabber:client", "error")))
        self.jid = r.findtext(f"{q(NS_BIND, 'bind')}/{q(NS_BIND, 'jid')}")
        sess = self.features.find(q(NS_SESSION, "session"))
        if sess is not None and sess.find(q(NS_SESSION, "optional")) is None:
            self.iq("set", f"<session xmlns='{NS_SESSION}'/>", to="")
        if self.features.find(q(NS_SM, "sm")) is not None:
            self.send(f"<enable xmlns='{NS_SM}'/>")
            while True:
                el = self.next()
                if el.tag == q(NS_SM, "enabled"):
                    self.sm_enabled = True
                    break
                if el.tag == q(NS_SM, "failed"):
                    break
                self._service(el)
        return self.jid, None


# ---------------------------------------------------------------------------------------------
# Stanzas as Smack 4.3 writes them for Kontalk

def field_xml(var, ftype, value, label=None):
    lab = f" label={quoteattr(label)}" if label else ""
    return (f"<field{lab} var={quoteattr(var)} type={quoteattr(ftype)}>"
            f"<value>{escape(value)}</value></field>")


def form_xml(form_type, fields):
    """A submit form (Form.getDataFormToSend: only fields with a value)."""
    return (f"<x xmlns='{NS_XDATA}' type='submit'>" + field_xml("FORM_TYPE", "hidden", form_type)
            + "".join(field_xml(*f) for f in fields) + "</x>")


def register_query(inner=""):
    return f"<query xmlns='{NS_REGISTER}'>{inner}</query>"


def describe_error(err):
    if err is None:
        return {"condition": "undefined-condition", "type": None, "text": None}
    out = {"condition": "undefined-condition", "type": err.get("type"), "text": None}
    if err.get("code"):
        out["code"] = err.get("code")
    extra = []
    for c in err:
        if c.tag == q(NS_STANZAS, "text"):
            out["text"] = c.text
        elif c.tag.startswith("{" + NS_STANZAS + "}"):
            out["condition"] = c.tag.split("}")[1]
        else:
            ns, name = c.tag[1:].split("}") if c.tag.startswith("{") else ("", c.tag)
            extra.append({"ns": ns, "name": name, "attrs": dict(c.attrib)})
    if extra:
        out["extra"] = extra
    return out


def form_fields(x):
    out = {}
    for f in x.findall(q(NS_XDATA, "field")):
        vals = [v.text or "" for v in f.findall(q(NS_XDATA, "value"))]
        out[f.get("var")] = vals[0] if len(vals) == 1 else vals
    return out


XML_NS = "http://www.w3.org/XML/1998/namespace"


def to_xml(el, parent_ns="jabber:client"):
    """An element as XML text with default namespace declarations (no ns0: prefixes)."""
    ns, name = el.tag[1:].split("}") if el.tag.startswith("{") else ("", el.tag)
    attrs = f" xmlns={quoteattr(ns)}" if ns != parent_ns else ""
    for k, v in el.attrib.items():
        if k.startswith("{" + XML_NS + "}"):
            k = "xml:" + k.split("}")[1]
        attrs += f" {k}={quoteattr(v)}"
    inner = escape(el.text or "") + "".join(to_xml(c, ns) + escape(c.tail or "") for c in el)
    return f"<{name}{attrs}>{inner}</{name}>" if inner else f"<{name}{attrs}/>"


def describe_iq(iq):
    """An answer iq as JSON: type, instructions, the form's fields, <registered/>, the account
    element, the error."""
    d = {"type": iq.get("type"), "from": iq.get("from")}
    qe = iq.find(q(NS_REGISTER, "query"))
    x = None
    if qe is not None:
        ins = qe.findtext(q(NS_REGISTER, "instructions"))
        if ins is not None:
            d["instructions"] = ins
        d["registered"] = qe.find(q(NS_REGISTER, "registered")) is not None
        x = qe.find(q(NS_XDATA, "x"))
        acc = qe.find(q(NS_ACCOUNT, "account"))
        if acc is not None:
            pk = acc.find(q(NS_ACCOUNT, "privatekey"))
            d["account"] = {
                "private": pk.findtext(q(NS_ACCOUNT, "private")) if pk is not None else None,
                "public": pk.findtext(q(NS_ACCOUNT, "public")) if pk is not None else None,
            }
    if x is None:
        x = iq.find(q(NS_XDATA, "x"))
    if x is not None:
        d["form_type"] = x.get("type")
        d["fields"] = form_fields(x)
    if iq.get("type") == "error":
        d["error"] = describe_error(iq.find(q("jabber:client", "error")))
    d["xml"] = to_xml(iq)
    return d


def outcome(step, answer, ok=None, **extra):
    """One JSON line for an iq exchange."""
    out = {"step": step, "ok": answer["type"] == "result" if ok is None else ok}
    out.update(extra)
    out["answer"] = answer
    if "error" in answer:
        out["error"] = answer["error"]
    emit(out)
    return out


# ---------------------------------------------------------------------------------------------
# A user's home: GnuPG home, current key, certificates

class Home:
    """The files of one device: `gnupg/` (GNUPGHOME), `keys/FPR.pub.gpg` (the key as last known:
    exported, or as the server certified it), `keys/FPR.crt.pem` + `keys/FPR.key.pem` (its
    bridge certificate and key), `state.json`."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.join(self.path, "keys"), exist_ok=True)
        self.gpg = kb.Gpg(os.path.join(self.path, "gnupg"))
        self.state_file = os.path.join(self.path, "state.json")
        self.state = json.load(open(self.state_file)) if os.path.exists(self.state_file) else {}

    def save(self):
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.state_file)

    def file(self, fpr, ext):
        return os.path.join(self.path, "keys", f"{fpr}.{ext}")

    @property
    def fingerprint(self):
        fpr = self.state.get("fingerprint")
        if not fpr:
            raise ClientBug(f"{self.path} has no key: run keygen first")
        return fpr

    def uid(self):
        return f"{self.state['name']} <{self.state['account']}@{self.state['domain']}>"

    def new_key(self, phone, domain, name, kind):
        """Generates a key (kept apart until it becomes current)."""
        account = kb.account_of(phone)
        self.state.setdefault("phone", phone)
        self.state.setdefault("account", account)
        self.state.setdefault("domain", domain)
        self.state.setdefault("name", name)
        # OpenPGP times are seconds: a new key must be newer than the previous ones (rollover)
        while int(time.time()) <= self.state.get("last_created", 0):
            time.sleep(0.1)
        fpr = self.gpg.generate(f"{name} <{account}@{domain}>", kind)
        self.state["last_created"] = kb.PublicKeyRing(self.gpg.export(fpr)).primary.created
        self.set_public(fpr, self.gpg.export(fpr))
        self.state.setdefault("types", {})[fpr] = kind
        return fpr

    def set_public(self, fpr, data):
        with open(self.file(fpr, "pub.gpg"), "wb") as f:
            f.write(data)

    def public(self, fpr=None):
        with open(self.file(fpr or self.fingerprint, "pub.gpg"), "rb") as f:
            return f.read()

    def private_key(self, fpr=None):
        fpr = fpr or self.fingerprint
        sec = self.file(fpr, "sec.gpg")
        if os.path.exists(sec):
            data, pp = open(sec, "rb").read(), self.state.get("passphrase")
        else:
            data, pp = self.gpg.export_secret(fpr), None
        pub, key = kb.secret_primary(data, pp)
        if pub.fingerprint != fpr:
            raise ClientBug(f"the secret key is {pub.fingerprint}, not {fpr}")
        return key

    def make_cert(self, fpr=None):
        """The bridge certificate of the key as last known (Android: after step 2, of the key
        the server returned)."""
        fpr = fpr or self.fingerprint
        key = self.private_key(fpr)
        der = kb.build_bridge_certificate(self.public(fpr), key)
        crt, kf = self.file(fpr, "crt.pem"), self.file(fpr, "key.pem")
        with open(crt, "w") as f:
            f.write(kb.pem(der))
        fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(kb.private_key_pem(key))
        return crt, kf

    def cert(self, fpr=None):
        fpr = fpr or self.fingerprint
        crt, kf = self.file(fpr, "crt.pem"), self.file(fpr, "key.pem")
        if not os.path.exists(crt):
            crt, kf = self.make_cert(fpr)
        return crt, kf

    def close(self):
        self.gpg.kill_agent()


# ---------------------------------------------------------------------------------------------
# Steps

def with_stream(opts, certfile=None, keyfile=None):
    return Stream(opts, certfile, keyfile).connect()


def step_instructions(opts):
    """Connection A: the register feature, then the empty XEP-0077 get (Android's
    createInstructionsForm). Returns the JSON outcome."""
    s = with_stream(opts)
    try:
        feature = s.register_feature()
        mechanisms = s.mechanisms()
        if not feature and not opts.ignore_register_feature:
            out = {"step": "instructions", "ok": False, "register_feature": False, "tls": s.tls,
                   "error": {"condition": "no-register-feature", "type": None,
                             "text": "the server does not advertise http://jabber.org/features/iq-register"}}
            emit(out)
            return out
        a = describe_iq(s.iq("get", register_query()))
    finally:
        s.close()
    fields = a.get("fields", {})
    terms = fields.get("terms") if "accept-terms" in fields else None
    return outcome("instructions", a, register_feature=feature, terms=terms, tls=s.tls,
                   mechanisms=mechanisms)


def step_request(opts, phone, force=False, challenge="pin", fallback=False, accept_terms=False):
    """Connection B: the registration form (Android's createRegistrationForm)."""
    fields = [("phone", "text-single", phone)]
    if accept_terms:
        fields.append(("accept-terms", "boolean", "true"))
    if force:
        fields.append(("force", "boolean", "true"))
    if fallback:
        fields.append(("fallback", "boolean", "true"))
    elif challenge:
        fields.append(("challenge", "text-single", challenge))
    s = with_stream(opts)
    try:
        a = describe_iq(s.iq("set", register_query(form_xml(NS_REGISTER, fields))))
    finally:
        s.close()
    f = a.get("fields", {})
    # Android goes on only with a `from` (the sender id); anything else is "Invalid response".
    ok = a["type"] == "result" and f.get("from") is not None
    return outcome("request", a, ok=ok, sender=f.get("from"), challenge=f.get("challenge"),
                   can_fallback=f.get("can-fallback"))


def outbox_codes(outbox, phone):
    if not os.path.exists(outbox):
        return []
    out = []
    with open(outbox) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                m = json.loads(line)
            except ValueError:
                continue  # a line being written
            if m.get("to") == phone or m.get("phone") == phone or m.get("number") == phone:
                out.append(m)
    return out


def wait_code(outbox, phone, seen, timeout):
    """The newest code delivered to `phone` once more than `seen` were delivered."""
    end = time.monotonic() + timeout
    while True:
        codes = outbox_codes(outbox, phone)
        if len(codes) > seen:
            return codes[-1]
        if time.monotonic() > end:
            return None
        time.sleep(0.2)


def check_certification(opts, home, fpr, data):
    """Imports the returned key in a fresh GnuPG home with the server key (`GET /v1/server-key`
    when --http is given) and reads `--check-sigs`: the server's certification must be there
    and verify (`!`)."""
    ring = kb.PublicKeyRing(data)
    res = {"same_key": ring.primary.fingerprint == fpr, "user_ids": ring.user_ids}
    tmp = tempfile.mkdtemp(prefix="kchk", dir="/tmp")
    g = kb.Gpg(tmp)
    try:
        server_fprs = []
        if opts.http:
            req = urllib.request.Request(opts.http.rstrip("/") + "/v1/server-key")
            armored = urllib.request.urlopen(req, timeout=opts.timeout).read()
            g.import_(armored)
            server_fprs = g.fingerprints()
            res["server_keys"] = server_fprs
        g.import_(data)
        sigs = [s for s in g.sigs(fpr) if not fpr.endswith(s["keyid"])]
        res["certifications"] = sigs
        if opts.http:
            res["certified"] = any(s["status"] == "!" and any(sf.endswith(s["keyid"]) for sf in server_fprs)
                                   and s["class"][:2] in ("10", "11", "12", "13") for s in sigs)
        else:
            res["certified"] = None  # no server key to check against
            res["certified_by_other_key"] = bool(sigs)
    finally:
        g.kill_agent()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def step_code(opts, home, code):
    """Connection C: the bridge certificate of the uncertified key, no login, the #code form
    with only `code` (Android's onChallengeRequest/createChallengeForm)."""
    fpr = home.fingerprint
    crt, kf = home.make_cert(fpr)
    s = with_stream(opts, crt, kf)
    try:
        a = describe_iq(s.iq("set", register_query(form_xml(FORM_CODE, [
            ("code", "text-single", code, "Validation code")]))))
    finally:
        s.close()
    pk = a.get("fields", {}).get("publickey")
    if a["type"] != "result" or not pk:
        return outcome("code", a, ok=False, tls=s.tls)
    data = base64.b64decode(pk)
    check = check_certification(opts, home, fpr, data)
    home.set_public(fpr, data)
    home.gpg.import_(data)
    home.state["certified"] = True
    home.save()
    crt, kf = home.make_cert(fpr)
    ok = check["same_key"] and check["certified"] is not False
    return outcome("code", a, ok=ok, fingerprint=fpr, cert=crt, key=kf, tls=s.tls, **check)


def login(opts, home, fpr=None, certfile=None, keyfile=None, resource=None):
    """Connection D: the bridge certificate, SASL EXTERNAL `=`, bind. Returns (stream, outcome
    dict); the stream is None when the login failed."""
    if certfile is None:
        certfile, keyfile = home.cert(fpr)
    s = with_stream(opts, certfile, keyfile)
    mechanisms = s.mechanisms()  # as offered before authentication
    mech = getattr(opts, "sasl", "EXTERNAL")
    if mech == "EXTERNAL":
        err = s.sasl_external("=")
    else:
        err = s.sasl_plain_or_anonymous(mech, getattr(opts, "sasl_user", None), getattr(opts, "sasl_password", None))
    out = {"step": "login", "tls": s.tls, "mechanisms": mechanisms,
           "sasl_initial_response": s.sasl_initial_response}
    if err:
        s.close()
        out.update(ok=False, error=err)
        return None, out
    resource = resource or "".join(random.choice("0123456789abcdef") for _ in range(16))  # like ANDROID_ID
    jid, err = s.bind(resource)
    if err:
        s.close()
        out.update(ok=False, error=err)
        return None, out
    out.update(ok=True, jid=jid, stream_management=s.sm_enabled)
    return s, out


def expected_jid(home):
    return f"{home.state['account']}@{home.state['domain']}"


# ---------------------------------------------------------------------------------------------
# Subcommands

def cmd_keygen(opts):
    home = Home(opts.home)
    if home.state.get("fingerprint") and not opts.replace:
        raise ClientBug(f"{opts.home} already has the key {home.state['fingerprint']} (--replace)")
    fpr = home.new_key(opts.phone, opts.domain, opts.name, opts.type)
    home.state["fingerprint"] = fpr
    home.state["certified"] = False
    home.save()
    crt, kf = home.make_cert(fpr)
    emit({"step": "keygen", "ok": True, "fingerprint": fpr, "account": home.state["account"],
          "uid": home.uid(), "type": opts.type, "cert": crt, "key": kf})
    home.close()


def cmd_cert(opts):
    home = Home(opts.home)
    fpr = opts.fingerprint or home.fingerprint
    variant = opts.variant
    if variant == "android":
        der = kb.build_bridge_certificate(home.public(fpr), home.private_key(fpr))
        key = home.private_key(fpr)
    elif variant == "sha256":
        key = home.private_key(fpr)
        der = kb.build_bridge_certificate(home.public(fpr), key, sha256=True)
    elif variant == "mismatch":
        # the X.509 key (and its signature) is a fresh key, not the embedded key's primary
        kind = home.state.get("types", {}).get(fpr, "rsa")
        key = (kb.rsa.generate_private_key(65537, 2048) if kind == "rsa"
               else kb.ed25519.Ed25519PrivateKey.generate())
        der = kb.build_bridge_certificate(home.public(fpr), home.private_key(fpr), x509_key=key)
    elif variant == "names-other-domain":
        key = home.private_key(fpr)
        der = kb.build_bridge_certificate(home.public(fpr), key, rename_domain=opts.other_domain)
    elif variant == "other-domain":
        # a key of the same account and type whose User ID is on another domain
        tmp = Home(os.path.join(home.path, "other-domain"))
        kind = home.state.get("types", {}).get(fpr, "rsa")
        ofpr = tmp.new_key(home.state["phone"], opts.other_domain, home.state["name"], kind)
        tmp.save()
        key = tmp.private_key(ofpr)
        der = kb.build_bridge_certificate(tmp.public(ofpr), key)
        tmp.close()
    else:
        raise ClientBug(f"unknown variant {variant}")
    with open(opts.out, "w") as f:
        f.write(kb.pem(der))
    key_out = opts.key_out or os.path.splitext(opts.out)[0] + ".key.pem"
    fd = os.open(key_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(kb.private_key_pem(key))
    emit({"step": "cert", "ok": True, "variant": variant, "fingerprint": fpr, "cert": opts.out,
          "key": key_out})
    home.close()


def cmd_instructions(opts):
    step_instructions(opts)


def terms_refused(a, opts):
    """Android stops at a terms form (accept-terms + terms) until the user accepts them."""
    if a.get("terms") and not opts.accept_terms:
        emit({"step": "terms", "ok": False, "terms": a["terms"],
              "error": {"condition": "terms-not-accepted", "type": None,
                        "text": "the server asks to accept its terms (--accept-terms)"}})
        return True
    return False


def cmd_request(opts):
    if not opts.skip_get:
        a = step_instructions(opts)
        if not a["ok"] or terms_refused(a, opts):
            return
    step_request(opts, opts.phone, opts.force, opts.challenge or None, opts.fallback, opts.accept_terms)


def cmd_submit_code(opts):
    home = Home(opts.home)
    code = opts.code
    if code is None:
        if not opts.outbox:
            raise ClientBug("--code or --outbox is needed")
        m = wait_code(opts.outbox, home.state["phone"], 0, opts.timeout)
        if m is None:
            raise ClientBug(f"no code for {home.state['phone']} in {opts.outbox}")
        code = m["code"]
    step_code(opts, home, code)
    home.close()


def cmd_register(opts):
    """Android's whole registration: key, A (get), B (form), the SMS, C (code)."""
    home = Home(opts.home)
    if not home.state.get("fingerprint") or opts.new_key:
        fpr = home.new_key(opts.phone, opts.domain, opts.name, opts.type)
        home.state["fingerprint"] = fpr
        home.state["certified"] = False
        home.save()
        emit({"step": "keygen", "ok": True, "fingerprint": fpr, "uid": home.uid(), "type": opts.type})
    seen = len(outbox_codes(opts.outbox, opts.phone))
    if not opts.skip_get:
        a = step_instructions(opts)
        if not a["ok"] or terms_refused(a, opts):
            home.close()
            return
    r = step_request(opts, opts.phone, opts.force, opts.challenge or None, opts.fallback, opts.accept_terms)
    if not r["ok"]:
        home.close()
        return
    m = wait_code(opts.outbox, opts.phone, seen, opts.timeout)
    if m is None:
        emit({"step": "sms", "ok": False, "error": {"condition": "no-code", "type": None,
              "text": f"no new code for {opts.phone} in {opts.outbox} within {opts.timeout} s"}})
        home.close()
        return
    emit({"step": "sms", "ok": True, "code": m["code"], "sender": m.get("sender")})
    c = step_code(opts, home, m["code"])
    if c["ok"] and opts.login:
        s, out = login(opts, home)
        if s:
            out["jid_matches"] = (out["jid"] or "").split("/")[0] == expected_jid(home)
            s.close()
        emit(out)
    home.close()


def cmd_login(opts):
    home = Home(opts.home)
    s, out = login(opts, home, opts.fingerprint, opts.cert, opts.key, opts.resource)
    if s:
        out["jid_matches"] = (out["jid"] or "").split("/")[0] == expected_jid(home) if home.state else None
        if opts.hold:
            # Available, as a Kontalk client is once logged in: messages to the bare JID come here.
            s.send("<presence/>")
            end = time.monotonic() + opts.hold
            try:
                while time.monotonic() < end:
                    try:
                        el = s.next(timeout=max(0.1, end - time.monotonic()))
                        s._service(el)
                    except ConnectionFailed as e:
                        if s.closed:
                            out["closed_by_server"] = str(e)
                            break
            except StreamError as e:
                out["closed_by_server"] = {"condition": e.condition, "text": e.text}
            out["messages"] = [
                {"from": el.get("from"), "type": el.get("type"),
                 "body": el.findtext(q("jabber:client", "body"))}
                for el in s.inbox if el.tag == q("jabber:client", "message")]
        s.close()
    emit(out)
    home.close()


def logged_in(opts, home):
    s, out = login(opts, home)
    if s is None:
        emit(out)
    return s


def cmd_registered_get(opts):
    home = Home(opts.home)
    s = logged_in(opts, home)
    if s:
        try:
            a = describe_iq(s.iq("get", register_query()))
        finally:
            s.close()
        outcome("registered-get", a, jid=s.jid, registered=a.get("registered", False))
    home.close()


def cmd_remove(opts):
    home = Home(opts.home)
    s = logged_in(opts, home)
    if s:
        try:
            try:
                a = describe_iq(s.iq("set", register_query("<remove/>")))
            except ConnectionFailed as e:
                if not s.closed:
                    raise
                emit({"step": "remove", "ok": False, "closed_without_answer": str(e)})
                return
            closed = s.closed
        finally:
            s.close()
        outcome("remove", a, jid=s.jid, stream_closed=closed)
    home.close()


def revoked_primary(home, fpr):
    """The old key's primary key with its revocation (as Android's PersonalKey.revoke:
    PGPPublicKey.getEncoded() of the primary: key, revocation, User IDs and their signatures,
    no subkeys). From GnuPG's revocation certificate, in a copy of the key."""
    rev_file = os.path.join(home.gpg.home, "openpgp-revocs.d", f"{fpr}.rev")
    text = open(rev_file).read().replace(":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----")
    tmp = tempfile.mkdtemp(prefix="krev", dir="/tmp")
    g = kb.Gpg(tmp)
    try:
        g.import_(home.public(fpr))
        g.import_(text.encode())
        data = g.export(fpr)
    finally:
        g.kill_agent()
        shutil.rmtree(tmp, ignore_errors=True)
    out = bytearray()
    for p in kb.read_packets(data):
        if p.tag == 14:
            break
        out += bytes([0xC0 | p.tag]) + _new_len(len(p.body)) + p.body
    return bytes(out)


def _new_len(n):
    if n < 192:
        return bytes([n])
    if n < 8384:
        n -= 192
        return bytes([(n >> 8) + 192, n & 0xFF])
    return b"\xff" + n.to_bytes(4, "big")


def cmd_rollover(opts):
    """Key rollover from the logged-in session (Android's RegenerateKeyPairListener /
    RegisterKeyPairListener.prepareKeyPacket): a new key with the same User ID, certified by the
    old key (what kontalk-registrar requires; Android does not certify it, --no-certify sends
    it as Android does), and with --revoked the old key's revocation."""
    home = Home(opts.home)
    old = home.fingerprint
    kind = opts.type or home.state.get("types", {}).get(old, "rsa")
    new = home.new_key(home.state["phone"], home.state["domain"], home.state["name"], kind)
    if not opts.no_certify:
        home.gpg.certify(old, new)
    new_pub = home.gpg.export(new)
    home.set_public(new, new_pub)
    home.save()
    fields = [("publickey", "text-single", base64.b64encode(new_pub).decode(), "Public key")]
    if opts.revoked:
        fields.append(("revoked", "text-single", base64.b64encode(revoked_primary(home, old)).decode(),
                       "Revoked public key"))
    s = logged_in(opts, home)
    if s is None:
        home.close()
        return
    try:
        a = describe_iq(s.iq("set", register_query(form_xml(FORM_KEY, fields))))
    finally:
        s.close()
    pk = a.get("fields", {}).get("publickey")
    if a["type"] != "result" or not pk:
        outcome("rollover", a, ok=False, old_fingerprint=old, new_fingerprint=new)
        home.close()
        return
    data = base64.b64decode(pk)
    check = check_certification(opts, home, new, data)
    home.set_public(new, data)
    home.gpg.import_(data)
    home.state.setdefault("previous", []).append(old)
    home.state["fingerprint"] = new
    home.save()
    crt, kf = home.make_cert(new)
    outcome("rollover", a, ok=check["same_key"] and check["certified"] is not False,
            old_fingerprint=old, new_fingerprint=new, cert=crt, key=kf, **check)
    home.close()


def cmd_upload_key(opts):
    """Private key upload from a logged-in session (Android's PrivateKeyUploadListener): the
    secret key protected by the passphrase, base64 without line breaks."""
    home = Home(opts.home)
    data = home.gpg.export_secret_protected(home.fingerprint, opts.passphrase)
    if kb.read_packets(data)[0].body[kb.PublicKey(kb.read_packets(data)[0].body).public_len] == 0:
        raise ClientBug("GnuPG exported the secret key unprotected")
    s = logged_in(opts, home)
    if s:
        try:
            a = describe_iq(s.iq("set", register_query(form_xml(FORM_PRIVATEKEY, [
                ("privatekey", "text-single", base64.b64encode(data).decode(), "Private key")]))))
        finally:
            s.close()
        token = a.get("fields", {}).get("token")
        if token:
            home.state["token"] = token
            home.save()
        outcome("upload-key", a, ok=a["type"] == "result" and bool(token), token=token,
                fingerprint=home.fingerprint)
    home.close()


def cmd_retrieve_key(opts):
    """Retrieval on a new device, before any login (Android's onRetrieveKeyRequest): an iq get
    with the account element on a connection without client certificate. Then the key is
    decrypted with the passphrase by GnuPG (a signature with it) and by this client (its
    primary key for the bridge certificate), its User ID checked against the phone number,
    and with --login the new device logs in with it (Android's login test)."""
    s = with_stream(opts)
    try:
        a = describe_iq(s.iq("get", register_query(
            f"<account xmlns='{NS_ACCOUNT}'><privatekey><token>{escape(opts.token)}</token>"
            f"</privatekey></account>")))
    finally:
        s.close()
    acc = a.get("account") or {}
    if a["type"] != "result" or not acc.get("private") or not acc.get("public"):
        outcome("retrieve-key", a, ok=False)
        return
    private, public = base64.b64decode(acc["private"]), base64.b64decode(acc["public"])
    home = Home(opts.home)
    res = {"private_bytes": len(private), "public_bytes": len(public)}
    pub_ring = kb.PublicKeyRing(public)
    fpr = pub_ring.primary.fingerprint
    res["fingerprint"] = fpr
    res["user_ids"] = pub_ring.user_ids
    # GnuPG: import the protected key, sign with the passphrase, verify
    home.gpg.import_(public)
    home.gpg.import_(private)
    sig = home.gpg.run("--local-user", fpr, "--detach-sign", "--armor", data=b"kontalk retrieval test",
                       passphrase=opts.passphrase, check=False)
    res["gpg_decrypted"] = sig.returncode == 0
    if sig.returncode != 0:
        res["gpg_error"] = sig.stderr.decode(errors="replace").strip().splitlines()[-1:]
    # this client: decrypt the primary key
    try:
        p, _ = kb.secret_primary(private, opts.passphrase)
        res["primary_decrypted"] = p.fingerprint == fpr
    except kb.BridgeError as e:
        res["primary_decrypted"] = False
        res["decrypt_error"] = str(e)
    if opts.phone:
        acct = kb.account_of(opts.phone)
        res["uid_matches_phone"] = any(kb.uid_email(u) and kb.uid_email(u).split("@")[0] == acct
                                       for u in pub_ring.user_ids)
    ok = res["gpg_decrypted"] and res["primary_decrypted"] and res.get("uid_matches_phone", True)
    if ok:
        with open(home.file(fpr, "sec.gpg"), "wb") as f:
            f.write(private)
        home.set_public(fpr, public)
        email = next((kb.uid_email(u) for u in pub_ring.user_ids if kb.uid_email(u)), "@")
        home.state.update(fingerprint=fpr, passphrase=opts.passphrase, certified=True,
                          account=email.split("@")[0], domain=email.split("@")[1],
                          phone=opts.phone or home.state.get("phone"), retrieved=True)
        home.save()
        res["cert"], res["key"] = home.make_cert(fpr)
    outcome("retrieve-key", a, ok=ok, **res)
    if ok and opts.login:
        s, out = login(opts, home)
        if s:
            out["jid_matches"] = (out["jid"] or "").split("/")[0] == expected_jid(home)
            s.close()
        emit(out)
    home.close()


def cmd_raw(opts):
    """Sends one stanza (e.g. a malformed form) on a new connection: without certificate, with
    the home's bridge certificate (--with-cert), or logged in (--login); prints the answer."""
    home = Home(opts.home) if opts.home else None
    if opts.login:
        s = logged_in(opts, home)
        if s is None:
            return
    elif opts.with_cert:
        crt, kf = opts.cert or home.cert()[0], opts.key or home.cert()[1]
        s = with_stream(opts, crt, kf)
    else:
        s = with_stream(opts)
    try:
        el = ET.fromstring(opts.stanza)
        sid = el.get("id") or stanza_id()
        el.set("id", sid)
        if el.get("to") is None and not opts.no_to:
            el.set("to", opts.domain)
        text = ET.tostring(el, encoding="unicode").replace(' xmlns:ns0="jabber:client"', "")
        s.send(text)
        if el.tag in ("iq", q("jabber:client", "iq")) and el.get("type") in ("get", "set"):
            while True:
                ans = s.next()
                if ans.tag == q("jabber:client", "iq") and ans.get("id") == sid:
                    break
                s._service(ans)
            outcome("raw", describe_iq(ans), register_feature=s.register_feature(), tls=s.tls)
        else:
            emit({"step": "raw", "ok": True, "sent": text})
    finally:
        s.close()
        if home:
            home.close()


def slixmpp_client(home, opts, resource=None):
    """A slixmpp ClientXMPP for the home's account: STARTTLS with our own ssl_context (the
    bridge certificate, with the ctypes fallback), SASL EXTERNAL. It records what it sends as
    <auth/> (`sasl_sent`); futures `started` (None, or the failure) and `received`."""
    import logging
    from slixmpp import ClientXMPP

    if not opts.trace:
        logging.getLogger("slixmpp").setLevel(logging.CRITICAL)

    class Client(ClientXMPP):
        def __init__(self):
            res = resource or "".join(random.choice("0123456789abcdef") for _ in range(16))
            jid = f"{home.state['account']}@{home.state['domain']}/{res}"
            if opts.sasl == "EXTERNAL":
                super().__init__(jid, "", sasl_mech="EXTERNAL")
            else:  # self-tests against a stock Prosody only
                super().__init__(jid, opts.sasl_password or "", sasl_mech=opts.sasl)
            crt, kf = home.cert()
            self.ssl_context, self.cert_loading = kb.client_context(crt, kf, opts.cafile)
            self.enable_starttls, self.enable_direct_tls, self.enable_plaintext = True, False, False
            self.sasl_sent = []
            loop = asyncio.get_event_loop()
            self.started = loop.create_future()
            self.received = loop.create_future()
            self.add_event_handler("session_start", self._start)
            self.add_event_handler("failed_auth", lambda *_: self._fail("not-authorized"))
            self.add_event_handler("no_auth", lambda *_: self._fail("no-auth"))
            self.add_event_handler("disconnected", lambda *_: self._fail("disconnected"))
            self.add_event_handler("message", self._message)
            raw = self.send_raw

            def spy(data):
                if "<auth" in data and NS_SASL in data:
                    a = ET.fromstring(data)
                    self.sasl_sent.append({"mechanism": a.get("mechanism"), "initial_response": a.text})
                return raw(data)
            self.send_raw = spy

        def _fail(self, cond):
            if not self.started.done():
                self.started.set_result(cond)

        def _start(self, _):
            self.send_presence()
            if not self.started.done():
                self.started.set_result(None)

        def _message(self, msg):
            if msg["type"] in ("chat", "normal") and msg["body"] and not self.received.done():
                self.received.set_result((str(msg["from"]), msg["body"]))

    return Client()


def cmd_chat(opts):
    """Two registered accounts log in with slixmpp (SASL EXTERNAL, the bridge certificates
    presented through our own ssl_context), one sends a message to the other's full JID, the
    other must receive it."""
    homes = [Home(opts.home), Home(opts.to_home)]
    body = opts.body or f"hello from kontalk_client {random.randint(0, 1 << 30)}"

    async def run():
        a, b = slixmpp_client(homes[0], opts), slixmpp_client(homes[1], opts)
        result = {"step": "chat", "certificate_loading": a.cert_loading}
        try:
            for c in (a, b):
                c.connect(opts.host, opts.port)
            errs = await asyncio.wait_for(asyncio.gather(a.started, b.started), opts.timeout)
            result["sasl"] = {"sender": a.sasl_sent, "receiver": b.sasl_sent}
            if any(errs):
                result.update(ok=False, error={"condition": [e for e in errs if e][0], "type": "sasl",
                                               "text": f"sender: {errs[0]}, receiver: {errs[1]}"})
                return result
            result["from"], result["to"] = str(a.boundjid), str(b.boundjid)
            result["jids_match"] = (a.boundjid.bare == f"{homes[0].state['account']}@{homes[0].state['domain']}"
                                    and b.boundjid.bare == f"{homes[1].state['account']}@{homes[1].state['domain']}")
            a.send_message(mto=b.boundjid, mbody=body, mtype="chat")
            frm, got = await asyncio.wait_for(b.received, opts.timeout)
            result.update(ok=got == body and frm == str(a.boundjid), body=got, received_from=frm)
            if opts.hold:
                await asyncio.sleep(opts.hold)
            return result
        except asyncio.TimeoutError:
            result.update(ok=False, error={"condition": "timeout", "type": None,
                                           "text": f"nothing within {opts.timeout} s"})
            return result
        finally:
            for c in (a, b):
                c.disconnect()
            await asyncio.sleep(0.3)

    res = asyncio.run(run())
    emit(res)
    for h in homes:
        h.close()
    if res.get("error", {}).get("condition") == "timeout":
        sys.exit(3)


# ---------------------------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5222)
    p.add_argument("--domain", default="localhost", help="the XMPP domain (the accounts' and the stream's)")
    p.add_argument("--timeout", type=float, default=20, help="seconds for every read (default 20)")
    p.add_argument("--cafile", help="verify the server's certificate chain with this CA file")
    p.add_argument("--http", help="kontalk-registrar's HTTP base URL, to fetch the server key")
    p.add_argument("--trace", action="store_true", help="print the XML transcript to stderr")
    p.add_argument("--ignore-register-feature", action="store_true",
                   help="go on when the register stream feature is missing (Android does not check it)")
    p.add_argument("--sasl", default="EXTERNAL", choices=["EXTERNAL", "ANONYMOUS", "PLAIN"],
                   help=argparse.SUPPRESS)  # self-tests against a stock Prosody only
    p.add_argument("--sasl-user", help=argparse.SUPPRESS)
    p.add_argument("--sasl-password", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)

    def reg_opts(s):
        s.add_argument("--phone", required=True, help="E.164 number, e.g. +15555215554")
        s.add_argument("--force", action="store_true", help="force=true (another device)")
        s.add_argument("--challenge", default="pin", help="challenge asked for (Android: pin); '' for none")
        s.add_argument("--fallback", action="store_true", help="fallback=true instead of a challenge")
        s.add_argument("--accept-terms", action="store_true", help="accept-terms=true")
        s.add_argument("--skip-get", action="store_true", help="skip connection A (the empty get)")

    s = sub.add_parser("keygen", help="make the user's OpenPGP key (GnuPG) and its bridge certificate")
    s.add_argument("--home", required=True)
    s.add_argument("--phone", required=True)
    s.add_argument("--type", choices=["rsa", "ed25519"], default="rsa")
    s.add_argument("--name", default="Kontalk test")
    s.add_argument("--replace", action="store_true")
    s.set_defaults(fn=cmd_keygen)

    s = sub.add_parser("cert", help="write a bridge certificate (or a variant for refusal tests)")
    s.add_argument("--home", required=True)
    s.add_argument("--fingerprint")
    s.add_argument("--variant", default="android",
                   choices=["android", "mismatch", "other-domain", "names-other-domain", "sha256"])
    s.add_argument("--other-domain", default="example.net")
    s.add_argument("--out", required=True)
    s.add_argument("--key-out")
    s.set_defaults(fn=cmd_cert)

    s = sub.add_parser("instructions", help="connection A only: the empty iq get")
    s.set_defaults(fn=cmd_instructions)

    s = sub.add_parser("request", help="step 1: connections A and B")
    reg_opts(s)
    s.set_defaults(fn=cmd_request)

    s = sub.add_parser("submit-code", help="step 2: connection C with the uncertified key's certificate")
    s.add_argument("--home", required=True)
    s.add_argument("--code")
    s.add_argument("--outbox", help="take the newest code for the home's number from this outbox.jsonl")
    s.set_defaults(fn=cmd_submit_code)

    s = sub.add_parser("register", help="the whole registration: key, A, B, the code from the outbox, C")
    reg_opts(s)
    s.add_argument("--home", required=True)
    s.add_argument("--outbox", required=True)
    s.add_argument("--type", choices=["rsa", "ed25519"], default="rsa")
    s.add_argument("--name", default="Kontalk test")
    s.add_argument("--new-key", action="store_true", help="a new key even if the home has one")
    s.add_argument("--login", action="store_true", help="then log in with the certified key")
    s.set_defaults(fn=cmd_register)

    s = sub.add_parser("login", help="connection D: SASL EXTERNAL with the bridge certificate, bind")
    s.add_argument("--home", required=True)
    s.add_argument("--fingerprint", help="log in with this (e.g. an old) key's certificate")
    s.add_argument("--cert", help="a certificate file instead (e.g. a `cert` variant)")
    s.add_argument("--key")
    s.add_argument("--resource")
    s.add_argument("--hold", type=float, default=0, help="stay connected this long (seconds), "
                   "reporting whether the server closes the session")
    s.set_defaults(fn=cmd_login)

    s = sub.add_parser("registered-get", help="XEP-0077 get from a logged-in session")
    s.add_argument("--home", required=True)
    s.set_defaults(fn=cmd_registered_get)

    s = sub.add_parser("remove", help="<remove/> from a logged-in session")
    s.add_argument("--home", required=True)
    s.set_defaults(fn=cmd_remove)

    s = sub.add_parser("rollover", help="#key form: a new key certified by the old one")
    s.add_argument("--home", required=True)
    s.add_argument("--type", choices=["rsa", "ed25519"])
    s.add_argument("--revoked", action="store_true", help="also send the old key with its revocation")
    s.add_argument("--no-certify", action="store_true",
                   help="do not certify the new key with the old one (as Android)")
    s.set_defaults(fn=cmd_rollover)

    s = sub.add_parser("upload-key", help="#privatekey form from a logged-in session")
    s.add_argument("--home", required=True)
    s.add_argument("--passphrase", required=True)
    s.set_defaults(fn=cmd_upload_key)

    s = sub.add_parser("retrieve-key", help="account/privatekey/token get before login, on a new device")
    s.add_argument("--home", required=True, help="the new device's home")
    s.add_argument("--token", required=True)
    s.add_argument("--passphrase", required=True)
    s.add_argument("--phone", help="check the key's User ID names this number's account")
    s.add_argument("--login", action="store_true", help="then log in with the retrieved key")
    s.set_defaults(fn=cmd_retrieve_key)

    s = sub.add_parser("chat", help="two accounts log in with slixmpp; one sends, the other receives")
    s.add_argument("--home", required=True, help="the sender")
    s.add_argument("--to-home", required=True, help="the receiver")
    s.add_argument("--body")
    s.add_argument("--hold", type=float, default=0, help="stay connected this long after the message")
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("raw", help="send one stanza and print the answer")
    s.add_argument("--stanza", required=True, help="e.g. \"<iq type='set'><query xmlns='jabber:iq:register'/></iq>\"")
    s.add_argument("--home")
    s.add_argument("--login", action="store_true")
    s.add_argument("--with-cert", action="store_true")
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--no-to", action="store_true", help="do not add to=<domain>")
    s.set_defaults(fn=cmd_raw)
    return p


def main(argv=None):
    opts = parser().parse_args(argv)
    try:
        opts.fn(opts)
    except StreamError as e:
        emit({"step": opts.cmd, "ok": False, "error": {"condition": e.condition, "type": "stream", "text": e.text}})
    except ConnectionFailed as e:
        emit({"step": opts.cmd, "ok": False, "fatal": {"kind": "connection", "text": str(e)}})
        sys.exit(3)
    except (ClientBug, kb.BridgeError) as e:
        emit({"step": opts.cmd, "ok": False, "fatal": {"kind": "client", "text": str(e)}})
        sys.exit(2)
    except Exception as e:  # a bug of this client
        traceback.print_exc()
        emit({"step": opts.cmd, "ok": False, "fatal": {"kind": "bug", "text": f"{type(e).__name__}: {e}"}})
        sys.exit(2)


if __name__ == "__main__":
    main()
