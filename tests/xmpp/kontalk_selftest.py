#!/usr/bin/env python3
"""Self-tests of the Kontalk test client (kontalk_client.py, kontalk_bridge.py) without the
Kontalk server side:

  reference  the bridge certificate of Android's test assets (login.crt + login.key, given with
             --ref-cert/--ref-key) is rebuilt byte for byte from its embedded key, and a fresh
             RSA certificate has the same structure field by field;
  keys       GnuPG keys (RSA as Android, Ed25519) parse, their secret primary keys match, a
             passphrase-protected export decrypts (and a wrong passphrase does not);
  registrar  with --registrar BINARY: `login-cert verify` refuses uncertified (not-certified),
             mismatched (key-mismatch), other-domain (no-user-id-on-domain) and tampered
             (bad-signature) certificates and, after an HTTP registration certified the key,
             accepts its bridge certificate (RSA and Ed25519); a forced re-registration makes
             the old one key-replaced;
  external   a fake XMPP server offering SASL EXTERNAL: the raw client and slixmpp both send the
             initial response `=`, then bind;
  prosody    a stock Prosody (config in a temp dir, c2s_require_encryption, client certificates
             requested with verify = peer/client_once and lsec_continue): STARTTLS, the
             Kontalk-encoded certificates (RSA, Ed25519) reach Prosody at the TLS level from the
             raw client and from slixmpp (seen with the admin shell), the registration iqs get
             Prosody's answers, and two accounts chat through slixmpp.

Prints `ok:`/`FAIL:` lines and `N passed, N failed`; exit status 1 when something failed.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kontalk_bridge as kb  # noqa: E402
import kontalk_client as kc  # noqa: E402

PASSED, FAILED = [], []
HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.join(HERE, "kontalk_client.py")


def check(cond, what, detail=None):
    (PASSED if cond else FAILED).append(what)
    print(("ok: " if cond else "FAIL: ") + what + ("" if cond or detail is None else f" -- {detail}"), flush=True)
    return cond


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def opts(**kw):
    base = dict(host="127.0.0.1", port=5222, domain="localhost", timeout=15, cafile=None, trace=False,
                http=None, ignore_register_feature=False, sasl="EXTERNAL", sasl_user=None,
                sasl_password=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def run_client(args, port):
    """The CLI as the Rust harness runs it: (exit status, JSON lines)."""
    r = subprocess.run([sys.executable, CLIENT, "--port", str(port), "--timeout", "10", *args],
                       capture_output=True, timeout=120)
    lines = []
    for line in r.stdout.decode().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return r.returncode, lines, r.stderr.decode()


# ---------------------------------------------------------------------------------------------

def test_reference(work, ref_cert, ref_key):
    from cryptography.hazmat.primitives import serialization
    ref = kb.unpem(open(ref_cert, "rb").read())
    f = kb.certificate_fields(ref)
    ext = [e for e in f["extensions"] if e["oid"] == kb.BRIDGE_OID][0]["value"]
    tag, bits, _ = kb.der_read(ext)
    keydata = bits[1:]
    key = serialization.load_pem_private_key(open(ref_key, "rb").read(), None)
    check(kb.build_bridge_certificate(keydata, key) == ref,
          "Android's login.crt is rebuilt byte for byte from its embedded key and login.key")

    home = kc.Home(os.path.join(work, "ref-rsa"))
    fpr = home.new_key("+15555215554", "localhost", "dev-5554", "rsa")
    home.state["fingerprint"] = fpr
    crt, _ = home.make_cert(fpr)
    mine = kb.unpem(open(crt).read())
    g = kb.certificate_fields(mine)
    for k in ("version", "serial", "signature", "outer_signature_algorithm", "spki_algorithm"):
        check(f[k] == g[k], f"RSA certificate: {k} as Android's")
    check([(e["oid"], e["critical"]) for e in f["extensions"]] == [(e["oid"], e["critical"]) for e in g["extensions"]],
          "RSA certificate: the same extensions in the same order with the same criticality",
          [(e["oid"], e["critical"]) for e in g["extensions"]])
    for i, e in enumerate(f["extensions"]):
        if e["oid"] in ("2.5.29.19", "2.5.29.15", kb.NETSCAPE_CERT_TYPE_OID):
            check(e["value"] == g["extensions"][i]["value"], f"RSA certificate: extension {e['oid']} encoded as Android's")
    def san_shape(v):
        # SEQUENCE { [0] { OID id-on-xmppAddr, UTF8String } }: no [0] EXPLICIT around the string
        return (v[0], v[2], v[4:14], v[14], len(v) == 16 + v[15])
    san_ref, san = f["extensions"][5]["value"], g["extensions"][5]["value"]
    check(san_shape(san) == san_shape(san_ref) == (0x30, 0xA0, bytes.fromhex("06082b06010505070805"), 0x0C, True),
          "RSA certificate: xmppAddr otherName without the [0] EXPLICIT wrapper, as Android's", san.hex())
    email = san[16:].decode()
    check(email == f"{kb.account_of('+15555215554')}@localhost", "xmppAddr is <sha1(E.164)>@domain", email)
    tag, bits, _ = kb.der_read(g["extensions"][6]["value"])
    check(tag == 3 and bits[0] == 0 and bits[1:] == home.public(fpr),
          "bridge extension = DER BIT STRING of the exported transferable public key")
    created = kb.PublicKeyRing(home.public(fpr)).primary.created
    check(g["not_before"] == g["not_after"] ==
          time.strftime("%y%m%d%H%M%SZ", time.gmtime(created)), "notBefore = notAfter = the key's creation time")
    check(g["subject"] == g["issuer"] and kb.DN_O.encode() in bytes.fromhex(g["subject"]),
          "subject = issuer = O=OpenPGP to X.509 Bridge + CN=<User ID>")
    r = subprocess.run(["openssl", "asn1parse", "-in", crt], capture_output=True, text=True)
    check(r.returncode == 0 and "2.25.49058212633447845622587297037800555803" in r.stdout,
          "openssl asn1parse reads the certificate and names the bridge OID")
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(crt, home.file(fpr, "key.pem"))
        refused = False
    except ssl.SSLError:
        refused = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    how = kb.load_client_certificate(ctx, crt, home.file(fpr, "key.pem"))
    check(refused and how.startswith("ctypes"), "load_cert_chain refuses the certificate, the ctypes fallback loads it", how)
    home.close()


def test_keys(work):
    for kind in ("rsa", "ed25519"):
        g = kb.Gpg(os.path.join(work, "keys-" + kind))
        uid = f"Kontalk test <{kb.account_of('+15555215557')}@localhost>"
        fpr = g.generate(uid, kind)
        pub = g.export(fpr)
        ring = kb.PublicKeyRing(pub)
        algos = [(s.algo, s.oid) for s in ring.subkeys]
        if kind == "rsa":
            check(ring.primary.algo == 1 and algos == [(19, "1.2.840.10045.3.1.7"), (18, "1.2.840.10045.3.1.7")],
                  "RSA key as Android's: RSA-2048 primary, ECDSA P-256 signing and ECDH P-256 subkeys", algos)
            check(ring.primary.n.bit_length() == 2048, "RSA primary is 2048 bits")
        else:
            check(ring.primary.algo == 22 and ring.primary.oid == kb.EDDSA_LEGACY_OID and ring.primary.point[0] == 0x40
                  and algos == [(18, "1.3.6.1.4.1.3029.1.5.1")],
                  "Ed25519 key: EdDSA (legacy OID, 0x40 point) primary and cv25519 subkey", algos)
        check(ring.user_ids == [uid], f"{kind}: the User ID is Name <sha1(E.164)@domain>")
        p, priv = kb.secret_primary(g.export_secret(fpr))
        check(p.fingerprint == fpr == ring.primary.fingerprint, f"{kind}: fingerprint computed from the packets = GnuPG's")
        check(kb.public_der(priv.public_key()) == kb.public_der(ring.primary.crypto_public()),
              f"{kind}: the parsed secret primary key matches the public key")
        prot = g.export_secret_protected(fpr, "pass phrase")
        try:
            kb.secret_primary(prot, "wrong")
            wrong_refused = False
        except kb.BridgeError:
            wrong_refused = True
        p2, priv2 = kb.secret_primary(prot, "pass phrase")
        check(wrong_refused and kb.public_der(priv2.public_key()) == kb.public_der(priv.public_key()),
              f"{kind}: the passphrase-protected export decrypts with the passphrase only")
        g2 = kb.Gpg(os.path.join(work, "keys-" + kind + "-imported"))
        g2.import_(prot)
        # the wrong passphrase first: gpg-agent caches the right one once used
        s_bad = g2.run("--local-user", fpr, "--detach-sign", data=b"x", passphrase="wrong", check=False).returncode == 0
        s_ok = g2.run("--local-user", fpr, "--detach-sign", data=b"x", passphrase="pass phrase", check=False).returncode == 0
        check(s_ok and not s_bad, f"{kind}: GnuPG uses the protected export with the passphrase only")
        g.kill_agent()
        g2.kill_agent()


# ---------------------------------------------------------------------------------------------

class Registrar:
    """kontalk-registrar (the prebuilt binary) serving HTTP on a free port, in a data dir."""

    def __init__(self, binary, work):
        os.makedirs(work, exist_ok=True)
        self.binary, self.data = binary, os.path.join(work, "registrar-data")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(work, "registrar.log"), "w")
        self.proc = subprocess.Popen([binary, "serve", "--data-dir", self.data, "--http", f"127.0.0.1:{self.port}",
                                      "--domain", "localhost"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={k: v for k, v in os.environ.items() if not k.startswith("REGISTRAR_")})
        end = time.time() + 30
        while time.time() < end:
            try:
                urllib.request.urlopen(self.base + "/v1/server-key", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("kontalk-registrar did not start")

    def post(self, path, body):
        return self.request("POST", path, body)

    def request(self, method, path, body):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method=method,
                                     headers={"content-type": "application/json"})
        try:
            return json.load(urllib.request.urlopen(req, timeout=10))
        except urllib.error.HTTPError as e:
            return {"status": e.code, "body": e.read().decode()}

    def certify(self, home, force=False):
        """Registers the home's key over HTTP (as `client register` would), keeps the certified
        key and makes its bridge certificate."""
        phone = home.state["phone"]
        outbox = os.path.join(self.data, "outbox.jsonl")
        seen = len(kc.outbox_codes(outbox, phone))
        v = self.post("/v1/verifications", {"phone": phone, "force": force})
        m = kc.wait_code(outbox, phone, seen, 10)
        r = self.post(f"/v1/verifications/{v['id']}/code",
                      {"code": m["code"], "public_key": base64.b64encode(home.public()).decode()})
        data = base64.b64decode(r["public_key"])
        check_res = kc.check_certification(opts(http=self.base), home, home.fingerprint, data)
        home.set_public(home.fingerprint, data)
        home.gpg.import_(data)
        return check_res, home.make_cert()

    def verify(self, cert):
        r = subprocess.run([self.binary, "login-cert", "verify", cert, "--data-dir", self.data, "--domain",
                            "localhost", "--json"], capture_output=True, text=True, timeout=60)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"stdout": r.stdout, "stderr": r.stderr}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def test_registrar(work, binary):
    reg = Registrar(binary, work)
    try:
        for kind, phone in (("rsa", "+15555215554"), ("ed25519", "+15555215556")):
            home = kc.Home(os.path.join(work, f"reg-{kind}"))
            fpr = home.new_key(phone, "localhost", "Kontalk test", kind)
            home.state["fingerprint"] = fpr
            home.save()
            crt, _ = home.make_cert()
            r = reg.verify(crt)
            check(r.get("check") == "not-certified", f"{kind}: an uncertified key's certificate is refused not-certified "
                  "(parsing, key match and X.509 signature passed)", r)
            variants = {"mismatch": "key-mismatch", "other-domain": "no-user-id-on-domain",
                        "names-other-domain": "not-certified"}
            for variant, expected in variants.items():
                out = os.path.join(work, f"{kind}-{variant}.crt.pem")
                rc, lines, err = run_client(["--domain", "localhost", "cert", "--home", home.path, "--variant", variant,
                                             "--out", out], 1)
                r = reg.verify(out)
                check(rc == 0 and r.get("check") == expected, f"{kind}: `cert --variant {variant}` is refused {expected}",
                      (rc, lines, err[-300:], r))
            der = bytearray(kb.unpem(open(crt).read()))
            der[-5] ^= 0x55
            tampered = os.path.join(work, f"{kind}-tampered.crt.pem")
            open(tampered, "w").write(kb.pem(bytes(der)))
            r = reg.verify(tampered)
            check(r.get("check") == "bad-signature", f"{kind}: a tampered signature is refused bad-signature", r)

            res, (crt, _) = reg.certify(home)
            check(res["certified"] and res["same_key"], f"{kind}: GnuPG checks the server's certification "
                  "(server key from GET /v1/server-key)", res)
            r = reg.verify(crt)
            check(r.get("jid") == f"{kb.account_of(phone)}@localhost" and r.get("fingerprint", "").upper() == fpr,
                  f"{kind}: the bridge certificate of the certified key is accepted", r)
            if kind == "rsa":
                other = kc.Home(os.path.join(work, "reg-rsa-other-device"))
                other.state["fingerprint"] = other.new_key(phone, "localhost", "Kontalk test", "rsa")
                reg.certify(other, force=True)
                r = reg.verify(crt)
                check(r.get("check") == "key-replaced", "after a forced registration of another key the old "
                      "certificate is refused key-replaced", r)
                other.close()
            home.close()
    finally:
        reg.stop()


# ---------------------------------------------------------------------------------------------

class FakeExternalServer(threading.Thread):
    """Just enough of an XMPP server to see what clients send for SASL EXTERNAL: STARTTLS
    (without asking for a client certificate), EXTERNAL, bind, then a result for every iq."""

    def __init__(self, certfile, keyfile):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certfile, keyfile)
        self.auths = []

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        try:
            self._handle(conn)
        except Exception:
            pass
        finally:
            conn.close()

    def _handle(self, conn):
        conn.settimeout(15)
        state = {"conn": conn}

        def reader():
            p = ET.XMLPullParser(events=("start", "end"))
            depth = 0
            while True:
                data = state["conn"].recv(65536)
                if not data:
                    return
                p.feed(data)
                for ev, el in p.read_events():
                    if ev == "start":
                        depth += 1
                        if depth == 1:
                            yield "open", el
                    else:
                        depth -= 1
                        if depth == 1:
                            yield "el", el
                        elif depth == 0:
                            return

        def send(s):
            state["conn"].sendall(s.encode())

        head = ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                "from='localhost' id='fake' version='1.0'>")
        r = reader()
        next(r)
        send(head + "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>")
        next(r)
        send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        state["conn"] = self.ctx.wrap_socket(conn, server_side=True)
        r = reader()
        next(r)
        send(head + "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism>"
             "</mechanisms></stream:features>")
        _, auth = next(r)
        self.auths.append({"mechanism": auth.get("mechanism"), "text": auth.text})
        send("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        r = reader()
        next(r)
        send(head + "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>")
        for kind, el in r:
            if el.tag == "{jabber:client}iq" and el.get("type") in ("get", "set"):
                res = el.findtext("{urn:ietf:params:xml:ns:xmpp-bind}bind/{urn:ietf:params:xml:ns:xmpp-bind}resource")
                if el.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None:
                    send(f"<iq type='result' id='{el.get('id')}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                         f"<jid>fake@localhost/{res or 'r'}</jid></bind></iq>")
                else:
                    send(f"<iq type='result' id='{el.get('id')}'/>")

    def stop(self):
        self.sock.close()


def server_cert(work):
    crt, key = os.path.join(work, "server.crt"), os.path.join(work, "server.key")
    if not os.path.exists(crt):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
                        "-days", "30", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                       check=True, capture_output=True)
    return crt, key


def test_external(work):
    crt, key = server_cert(work)
    srv = FakeExternalServer(crt, key)
    srv.start()
    home = kc.Home(os.path.join(work, "ext"))
    home.state["fingerprint"] = home.new_key("+15555215558", "localhost", "Kontalk test", "ed25519")
    home.save()
    try:
        s, out = kc.login(opts(port=srv.port), home)
        if s:
            s.close()
        check(out["ok"] and out["jid"].startswith("fake@localhost/") and srv.auths[-1] == {"mechanism": "EXTERNAL", "text": "="},
              "raw client: SASL EXTERNAL with the initial response '=', then bind", (out, srv.auths))

        async def slix():
            c = kc.slixmpp_client(home, opts(port=srv.port))
            c.connect("127.0.0.1", srv.port)
            err = await asyncio.wait_for(c.started, 15)
            c.disconnect()
            await asyncio.sleep(0.2)
            return err, c.sasl_sent, str(c.boundjid)
        err, sent, jid = asyncio.run(slix())
        check(err is None and sent == [{"mechanism": "EXTERNAL", "initial_response": "="}] and srv.auths[-1]["text"] == "=",
              "slixmpp 1.17: SASL EXTERNAL with the initial response '=' (empty authzid), session started",
              (err, sent, srv.auths, jid))
    finally:
        srv.stop()
        home.close()


# ---------------------------------------------------------------------------------------------

def accept_any_client_certificate(ctx):
    """Makes a server SSLContext ask for a client certificate and accept any (Python has no
    verify callback; kontalk-registrar does the real check)."""
    import ctypes
    libssl = ctypes.CDLL(kb._loaded_lib("libssl"))
    cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    cb = cb_type(lambda ok, store: 1)
    libssl.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, cb_type]
    libssl.SSL_CTX_set_verify.restype = None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    libssl.SSL_CTX_set_verify(ptr, 1, cb)  # SSL_VERIFY_PEER
    ctx._kontalk_keep = cb


def clear_openssl_errors():
    import ctypes
    ctypes.CDLL(kb._loaded_lib("libcrypto")).ERR_clear_error()


class FakeKontalkServer(threading.Thread):
    """A stand-in for Prosody + the Kontalk modules, backed by the real kontalk-registrar over
    HTTP (verifications, codes, rollover) and its `login-cert verify` (logins): enough to run
    every flow of the client end to end. Removal and key transfer are kept in memory."""

    STANZA_ERRORS = {400: ("bad-request", "modify"), 422: ("bad-request", "modify"), 409: ("conflict", "modify"),
                     404: ("item-not-found", "cancel"), 403: ("forbidden", "auth"), 429: ("service-unavailable", "wait")}

    def __init__(self, reg, certfile, keyfile):
        super().__init__(daemon=True)
        self.reg = reg
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certfile, keyfile)
        accept_any_client_certificate(self.ctx)
        self.pending = {}      # account -> verification id
        self.keys = {}         # account -> certified public key (bytes)
        self.tokens = {}       # token -> (private b64, account)
        self.sessions = {}     # full jid -> send function
        self.removed = set()
        self.log = []
        self.lock = threading.Lock()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def stop(self):
        self.sock.close()

    def handle(self, conn):
        st = {"conn": conn, "jid": None, "cert": None}
        try:
            self._handle(st)
        except Exception as e:  # noqa
            self.log.append(f"session ended: {e!r}")
        finally:
            with self.lock:
                if st["jid"]:
                    self.sessions.pop(st["jid"], None)
            conn.close()

    def _reader(self, st):
        p = ET.XMLPullParser(events=("start", "end"))
        depth = 0
        while True:
            data = st["conn"].recv(65536)
            if not data:
                return
            p.feed(data)
            for ev, el in p.read_events():
                if ev == "start":
                    depth += 1
                    if depth == 1:
                        yield el
                else:
                    depth -= 1
                    if depth == 1:
                        yield el
                    elif depth == 0:
                        return

    def _handle(self, st):
        conn = st["conn"]
        conn.settimeout(30)
        wlock = threading.Lock()

        def send(text):
            with wlock:
                st["conn"].sendall(text.encode())
        head = ("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                "from='localhost' id='%s' version='1.0'>" % kc.stanza_id())
        r = self._reader(st)
        next(r)
        send(head + "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
             "</stream:features>")
        next(r)
        send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        st["conn"] = self.ctx.wrap_socket(conn, server_side=True)
        der = st["conn"].getpeercert(binary_form=True)
        # OpenSSL left X509V3 INVALID_CERTIFICATE (the otherName) in this thread's error queue
        # while our callback accepted the certificate; Python would raise it on the next read.
        clear_openssl_errors()
        st["cert"] = der
        r = self._reader(st)
        next(r)
        mech = "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms>" if der else ""
        send(head + f"<stream:features>{mech}<register xmlns='http://jabber.org/features/iq-register'/></stream:features>")
        for el in r:
            if el.tag == "{urn:ietf:params:xml:ns:xmpp-sasl}auth":
                jid = self.login_check(der, el)
                if not jid:
                    send("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>")
                    continue
                send("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
                st["bare"] = jid
                r = self._reader(st)
                next(r)
                send(head + "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>")
                continue
            if el.tag == "{jabber:client}iq":
                self.iq(st, el, send)
            elif el.tag == "{jabber:client}message" and st.get("jid"):
                to = el.get("to", "")
                el.set("from", st["jid"])
                text = kc.to_xml(el)
                with self.lock:
                    targets = [f for j, f in self.sessions.items() if j == to or j.split("/")[0] == to]
                for t in targets[:1]:
                    t(text)

    def login_check(self, der, auth):
        self.log.append(f"auth {auth.get('mechanism')} {auth.text!r}")
        if not der or auth.get("mechanism") != "EXTERNAL" or (auth.text or "") not in ("=", ""):
            return None
        with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
            f.write(kb.pem(der))
        res = self.reg.verify(f.name)
        os.unlink(f.name)
        self.log.append(f"login-cert verify: {res}")
        jid = res.get("jid")
        if jid and jid.split("@")[0] in self.removed:
            return None
        return jid

    def answer(self, el, send, inner="", error=None):
        to = f" to={kc.quoteattr(el.get('from'))}" if el.get("from") else ""
        if error:
            cond, etype, text = error
            t = f"<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>{kc.escape(text)}</text>" if text else ""
            send(f"<iq type='error' id={kc.quoteattr(el.get('id', ''))} from='localhost'{to}><error type='{etype}'>"
                 f"<{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>{t}</error></iq>")
        else:
            send(f"<iq type='result' id={kc.quoteattr(el.get('id', ''))} from='localhost'{to}>{inner}</iq>")

    def http_error(self, r):
        cond, etype = self.STANZA_ERRORS.get(r.get("status"), ("internal-server-error", "wait"))
        return cond, etype, r.get("body", "")[:200]

    def iq(self, st, el, send):
        NSR = "{jabber:iq:register}"
        bind = el.find("{urn:ietf:params:xml:ns:xmpp-bind}bind")
        if bind is not None and st.get("bare"):
            res = bind.findtext("{urn:ietf:params:xml:ns:xmpp-bind}resource") or kc.stanza_id()
            st["jid"] = f"{st['bare']}/{res}"
            with self.lock:
                self.sessions[st["jid"]] = send
            return self.answer(el, send, f"<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{st['jid']}</jid></bind>")
        query = el.find(NSR + "query")
        if query is None or el.get("type") not in ("get", "set"):
            if el.get("type") in ("get", "set"):
                self.answer(el, send)
            return
        el.set("from", st.get("jid") or "")
        if not st.get("jid") and el.get("from") == "":
            del el.attrib["from"]
        x = query.find("{jabber:x:data}x")
        fields = kc.form_fields(x) if x is not None else {}
        ftype = fields.get("FORM_TYPE")
        q_ = lambda inner: f"<query xmlns='jabber:iq:register'>{inner}</query>"
        form = lambda t, fs: ("<x xmlns='jabber:x:data' type='form'>" + kc.field_xml("FORM_TYPE", "hidden", t)
                              + "".join(kc.field_xml(k, "text-single", v) for k, v in fs) + "</x>")
        account = (st.get("jid") or "@").split("@")[0]
        if el.get("type") == "get":
            acc = query.find("{http://kontalk.org/protocol/register#account}account")
            if acc is not None:
                tok = acc.findtext("{http://kontalk.org/protocol/register#account}privatekey/"
                                   "{http://kontalk.org/protocol/register#account}token")
                with self.lock:
                    entry = self.tokens.pop(tok, None)
                if entry is None:
                    return self.answer(el, send, error=("item-not-found", "cancel", "no such token"))
                priv, acct = entry
                pub = base64.b64encode(self.keys[acct]).decode()
                return self.answer(el, send, q_("<account xmlns='http://kontalk.org/protocol/register#account'>"
                                                f"<privatekey><private>{priv}</private><public>{pub}</public>"
                                                "</privatekey></account>"))
            if st.get("jid"):
                return self.answer(el, send, q_("<registered/>"))
            return self.answer(el, send, q_("<instructions>Kontalk (fake)</instructions>"
                                            + form(kc.NS_REGISTER, [("phone", "")])))
        if query.find(NSR + "remove") is not None:
            if not st.get("jid"):
                return self.answer(el, send, error=("forbidden", "auth", None))
            self.removed.add(account)
            return self.answer(el, send)
        if ftype == kc.NS_REGISTER:
            body = {"phone": fields.get("phone"), "force": fields.get("force") == "true"}
            if fields.get("challenge"):
                body["challenge"] = fields["challenge"]
            r = self.reg.post("/v1/verifications", body)
            if "id" not in r:
                return self.answer(el, send, error=self.http_error(r))
            self.pending[r["account"].split("@")[0]] = r["id"]
            self.removed.discard(r["account"].split("@")[0])
            return self.answer(el, send, q_(f"<instructions>{kc.escape(r['instructions'])}</instructions>"
                                            + form(kc.NS_REGISTER, [("from", r["sender"]), ("challenge", r["challenge"])])))
        if ftype == kc.FORM_CODE:
            if not st["cert"]:
                return self.answer(el, send, error=("bad-request", "modify", "no client certificate"))
            f = kb.certificate_fields(st["cert"])
            ext = [e for e in f["extensions"] if e["oid"] == kb.BRIDGE_OID][0]["value"]
            key = kb.der_read(ext)[1][1:]
            uid = kb.PublicKeyRing(key).user_ids[0]
            acct = kb.uid_email(uid).split("@")[0]
            vid = self.pending.get(acct)
            if vid is None:
                return self.answer(el, send, error=("item-not-found", "cancel", "nothing pending"))
            r = self.reg.post(f"/v1/verifications/{vid}/code",
                              {"code": fields.get("code"), "public_key": base64.b64encode(key).decode()})
            if "public_key" not in r:
                return self.answer(el, send, error=self.http_error(r))
            self.keys[acct] = base64.b64decode(r["public_key"])
            return self.answer(el, send, q_(form(kc.FORM_CODE, [("publickey", r["public_key"])])))
        if ftype == kc.FORM_KEY and st.get("jid"):
            body = {"public_key": fields.get("publickey")}
            if fields.get("revoked"):
                body["revoked"] = fields["revoked"]
            r = self.reg.request("PUT", f"/v1/accounts/{account}/key", body)
            if "public_key" not in r:
                return self.answer(el, send, error=self.http_error(r))
            self.keys[account] = base64.b64decode(r["public_key"])
            return self.answer(el, send, q_(form(kc.FORM_KEY, [("publickey", r["public_key"])])))
        if ftype == kc.FORM_PRIVATEKEY and st.get("jid"):
            token = "".join(str(random_digit()) for _ in range(40))
            with self.lock:
                self.tokens[token] = (fields.get("privatekey"), account)
            return self.answer(el, send, q_(form(kc.FORM_PRIVATEKEY, [("token", token)])))
        self.answer(el, send, error=("service-unavailable", "cancel", None))


def random_digit():
    import secrets
    return secrets.randbelow(10)


def test_fake_server(work, binary):
    reg = Registrar(binary, work + "/fake")
    crt, key = server_cert(work)
    srv = FakeKontalkServer(reg, crt, key)
    srv.start()
    outbox = os.path.join(reg.data, "outbox.jsonl")
    port = srv.port
    http = ["--http", reg.base]
    try:
        pa, pb = "+15555215554", "+15555215556"
        ha, hb, hc = (os.path.join(work, n) for n in ("fk-a", "fk-b", "fk-c"))
        rc, lines, err = run_client(http + ["register", "--home", ha, "--phone", pa, "--outbox", outbox, "--type", "rsa",
                                            "--login"], port)
        steps = [(x["step"], x["ok"]) for x in lines]
        check(rc == 0 and steps == [("keygen", True), ("instructions", True), ("request", True), ("sms", True),
                                    ("code", True), ("login", True)] and lines[4]["certified"] and lines[4]["same_key"]
              and lines[5]["jid_matches"] and lines[5]["sasl_initial_response"] == "=",
              "RSA: register (A get, B form, SMS from the outbox, C code with the uncertified key's certificate), "
              "GnuPG sees the server's certification, EXTERNAL login as <sha1>@localhost", (steps, err[-800:]))
        rc, lines, err = run_client(http + ["register", "--home", hb, "--phone", pb, "--outbox", outbox, "--type",
                                            "ed25519", "--login"], port)
        check(rc == 0 and [x["ok"] for x in lines] == [True] * 6 and lines[5]["jid_matches"],
              "Ed25519: the same registration and login", ([(x["step"], x["ok"]) for x in lines], err[-800:]))
        rc, lines, err = run_client(["chat", "--home", ha, "--to-home", hb], port)
        check(rc == 0 and lines[0]["ok"] and lines[0]["jids_match"]
              and lines[0]["sasl"]["sender"] == [{"mechanism": "EXTERNAL", "initial_response": "="}],
              "slixmpp: both accounts log in with EXTERNAL '=' and a message goes through", (lines, err[-500:]))
        rc, lines, err = run_client(["registered-get", "--home", ha], port)
        check(rc == 0 and lines[0]["registered"] is True, "registered-get from the session: <registered/>", lines)
        rc, lines, err = run_client(["register", "--home", ha, "--phone", pa, "--outbox", outbox], port)
        check(rc == 0 and lines[-1]["step"] == "request" and lines[-1]["error"]["condition"] == "conflict",
              "registering a registered number without force: conflict (exit 0)", lines)
        rc, lines, err = run_client(["upload-key", "--home", ha, "--passphrase", "export pass"], port)
        token = lines[0].get("token") if lines else None
        check(rc == 0 and lines[0]["ok"] and token, "upload-key: the protected secret key, a token back", lines)
        rc, lines, err = run_client(["retrieve-key", "--home", hc, "--token", token, "--passphrase", "wrong pass",
                                     "--phone", pa], port)
        check(rc == 0 and lines[0]["ok"] is False and lines[0]["gpg_decrypted"] is False
              and lines[0]["primary_decrypted"] is False, "retrieve-key with a wrong passphrase: not decrypted", lines)
        rc, lines, err = run_client(["upload-key", "--home", ha, "--passphrase", "export pass"], port)
        token = lines[0].get("token")
        rc, lines, err = run_client(["retrieve-key", "--home", hc, "--token", token, "--passphrase", "export pass",
                                     "--phone", pa, "--login"], port)
        check(rc == 0 and [x["ok"] for x in lines] == [True, True] and lines[0]["gpg_decrypted"]
              and lines[0]["uid_matches_phone"] and lines[1]["jid_matches"],
              "retrieve-key before login: GnuPG decrypts it with the passphrase, the new device logs in", (lines, err[-500:]))
        old = json.load(open(os.path.join(ha, "state.json")))["fingerprint"]
        rc, lines, err = run_client(["rollover", "--home", ha, "--no-certify", "--revoked"], port)
        check(rc == 0 and lines[0]["ok"] is False and "not-signed-by-old-key" in (lines[0]["error"]["text"] or ""),
              "rollover as Android sends it (new key not certified by the old, revoked): refused not-signed-by-old-key",
              lines)
        rc, lines, err = run_client(http + ["rollover", "--home", ha, "--revoked"], port)
        check(rc == 0 and lines[0]["ok"] and lines[0]["certified"] and lines[0]["old_fingerprint"] == old,
              "rollover with the new key certified by the old one (and revoked): the new key comes back certified",
              (lines, err[-500:]))
        rc, lines, err = run_client(["login", "--home", ha], port)
        check(rc == 0 and lines[0]["ok"] and lines[0]["jid_matches"], "login with the rolled-over key", lines)
        rc, lines, err = run_client(["login", "--home", ha, "--fingerprint", old], port)
        check(rc == 0 and lines[0]["ok"] is False and lines[0]["error"]["condition"] == "not-authorized",
              "login with the old key: not-authorized", (lines, srv.log[-1:]))
        rc, lines, err = run_client(http + ["register", "--home", hc, "--phone", pa, "--outbox", outbox, "--force",
                                            "--new-key", "--login"], port)
        check(rc == 0 and [x["ok"] for x in lines] == [True] * 6, "forced registration of a new key on another device",
              ([(x["step"], x["ok"]) for x in lines], err[-500:]))
        rc, lines, err = run_client(["login", "--home", ha], port)
        check(rc == 0 and lines[0]["ok"] is False, "the replaced key no longer logs in", lines)
        rc, lines, err = run_client(["remove", "--home", hb], port)
        check(rc == 0 and lines[0]["ok"] and lines[0]["step"] == "remove", "<remove/> from the session: result", lines)
        rc, lines, err = run_client(["raw", "--stanza", "<iq type='set'><query xmlns='jabber:iq:register'>"
                                     "<x xmlns='jabber:x:data' type='submit'/></query></iq>"], port)
        check(rc == 0 and lines[0]["step"] == "raw" and lines[0]["answer"]["type"] == "error", "raw: a malformed form", lines)
    finally:
        srv.stop()
        reg.stop()


# ---------------------------------------------------------------------------------------------

PROSODY_CFG = """-- stock Prosody for kontalk_selftest.py: no Kontalk module
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
run_as_root = true
log = {{ debug = "{d}/debug.log"; info = "{d}/info.log" }}
c2s_ports = {{ {port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
admin_socket = "{d}/data/prosody.sock"
modules_enabled = {{ "tls"; "saslauth"; "disco"; "register"; "ping"; "roster"; "presence"; "message"; "smacks"; "admin_shell"; "admin_socket" }}
modules_disabled = {{ "s2s"; "offline" }}
c2s_require_encryption = true
allow_registration = true
authentication = "internal_plain"
VirtualHost "localhost"
    ssl = {{
        certificate = "{crt}";
        key = "{key}";
        verify = {{ "peer", "client_once" }};
        verifyext = {{ "lsec_continue", "lsec_ignore_purpose" }};
    }}
"""

PEER_CERTS_LUA = ('> local m = require"core.modulemanager".get_module("*", "c2s") local api = m.module or m '
                  'local out = {} for conn, session in pairs(api:shared("sessions")) do local sock = conn:socket() '
                  'local c = sock and sock.getpeercertificate and sock:getpeercertificate() '
                  'table.insert(out, "peercert=" .. (c and c:digest("sha1") or "none")) end '
                  'return "sessions=" .. #out .. " " .. table.concat(out, " ")\n')


class Prosody:
    def __init__(self, work):
        self.dir = os.path.join(work, "prosody")
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.port = free_port()
        crt, key = server_cert(work)
        os.chmod(key, 0o644)
        self.cfg = os.path.join(self.dir, "prosody.cfg.lua")
        open(self.cfg, "w").write(PROSODY_CFG.format(d=self.dir, port=self.port, crt=crt, key=key))
        self.out = open(os.path.join(self.dir, "run.out"), "w")
        self.proc = subprocess.Popen(["prosody", "-F", "--config", self.cfg], stdout=self.out, stderr=subprocess.STDOUT)
        end = time.time() + 20
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prosody did not start")

    def ctl(self, *args, data=None):
        return subprocess.run(["prosodyctl", "--config", self.cfg, *args], input=data, capture_output=True,
                              text=True, timeout=30)

    def peer_certs(self):
        r = self.ctl("shell", data=PEER_CERTS_LUA)
        for line in r.stdout.splitlines():
            if "sessions=" in line:
                return [w.split("=", 1)[1] for w in line.split() if w.startswith("peercert=")]
        return None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


def cert_sha1(crt):
    import hashlib
    return hashlib.sha1(kb.unpem(open(crt).read())).hexdigest()


def test_prosody(work):
    pro = Prosody(work)
    try:
        port = pro.port
        rc, lines, err = run_client(["instructions"], port)
        check(rc == 0 and lines and lines[0]["step"] == "instructions" and lines[0]["tls"]["version"].startswith("TLS")
              and lines[0]["register_feature"] is True and lines[0]["answer"]["type"] == "result",
              "STARTTLS (required by Prosody), the register feature, the empty jabber:iq:register get answered",
              (rc, lines, err[-300:]))
        rc, lines, err = run_client(["request", "--phone", "+15555215554", "--force"], port)
        check(rc == 0 and [x["step"] for x in lines] == ["instructions", "request"] and lines[1]["ok"] is False
              and lines[1]["error"]["condition"] == "not-acceptable",
              "step 1 form (phone, force=true, challenge=pin) gets Prosody's own answer (not-acceptable)", lines)
        homes = {}
        for kind, phone in (("rsa", "+15555215554"), ("ed25519", "+15555215556")):
            h = os.path.join(work, f"pro-{kind}")
            rc, lines, err = run_client(["keygen", "--home", h, "--phone", phone, "--type", kind], port)
            homes[kind] = kc.Home(h)
            rc, lines, err = run_client(["submit-code", "--home", h, "--code", "123456"], port)
            check(rc == 0 and lines[0]["step"] == "code" and lines[0]["tls"]["client_certificate"]
                  and lines[0]["tls"]["certificate_loading"].startswith("ctypes") and lines[0]["answer"]["type"] == "error",
                  f"{kind}: step 2 on a connection presenting the bridge certificate (ctypes fallback) is answered", lines)
            crt, kf = homes[kind].cert()
            s = kc.Stream(opts(port=port), crt, kf).connect()
            seen = pro.peer_certs()
            s.close()
            check(seen is not None and cert_sha1(crt) in seen,
                  f"{kind}: Prosody got the Kontalk-encoded client certificate at the TLS level (admin shell)", seen)
            rc, lines, err = run_client(["login", "--home", h], port)
            check(rc == 0 and lines[0]["ok"] is False and lines[0]["error"]["condition"] == "no-external-mechanism",
                  f"{kind}: login reports that stock Prosody offers no EXTERNAL", lines)
            pro.ctl("register", kb.account_of(phone), "localhost", "pw")

        # registered sessions (PLAIN instead of EXTERNAL: the plumbing only)
        plain = ["--sasl", "PLAIN", "--sasl-password", "pw", "--sasl-user", kb.account_of("+15555215554")]
        rc, lines, err = run_client(plain + ["registered-get", "--home", homes["rsa"].path], port)
        check(rc == 0 and lines[0]["ok"] and lines[0]["registered"] is True
              and lines[0]["jid"].startswith(kb.account_of("+15555215554") + "@localhost/"),
              "a logged-in session's XEP-0077 get sees <registered/> (Prosody's answer)", lines)
        rc, lines, err = run_client(plain + ["upload-key", "--home", homes["rsa"].path, "--passphrase", "p"], port)
        check(rc == 0 and lines[0]["step"] == "upload-key" and lines[0]["answer"]["type"] == "error",
              "the #privatekey form is sent from a logged-in session and answered", lines)
        rc, lines, err = run_client(plain + ["rollover", "--home", homes["rsa"].path, "--revoked"], port)
        check(rc == 0 and lines[0]["step"] == "rollover" and lines[0]["answer"]["type"] == "error",
              "the #key form (new key certified by the old one, revoked) is sent and answered", lines)
        rc, lines, err = run_client(["retrieve-key", "--home", os.path.join(work, "pro-new"), "--token", "1234",
                                     "--passphrase", "p"], port)
        check(rc == 0 and lines[0]["step"] == "retrieve-key" and lines[0]["ok"] is False
              and "account" not in lines[0]["answer"],
              "the account/privatekey/token get is sent before login; Prosody's answer has no key", lines)

        async def slix():
            o = opts(port=port, sasl="PLAIN", sasl_password="pw")
            c = kc.slixmpp_client(homes["ed25519"], o)
            c.connect("127.0.0.1", port)
            err = await asyncio.wait_for(c.started, 15)
            seen = await asyncio.get_running_loop().run_in_executor(None, pro.peer_certs)
            c.disconnect()
            await asyncio.sleep(0.3)
            return err, seen
        err, seen = asyncio.run(slix())
        check(err is None and seen and cert_sha1(homes["ed25519"].cert()[0]) in seen,
              "slixmpp presents the bridge certificate through our ssl_context (admin shell)", (err, seen))
        rc, lines, err = run_client(["--sasl", "PLAIN", "--sasl-password", "pw", "chat", "--home", homes["rsa"].path,
                                     "--to-home", homes["ed25519"].path], port)
        check(rc == 0 and lines[0]["ok"] and lines[0]["jids_match"], "two accounts chat through slixmpp", (lines, err[-500:]))
        for h in homes.values():
            h.close()
    finally:
        pro.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref-cert", help="Android's test asset login.crt")
    p.add_argument("--ref-key", help="its login.key")
    p.add_argument("--registrar", help="a kontalk-registrar binary (for login-cert verify)")
    p.add_argument("--no-prosody", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="kselftest", dir="/tmp")
    try:
        if a.ref_cert and a.ref_key:
            test_reference(work, a.ref_cert, a.ref_key)
        test_keys(work)
        if a.registrar:
            test_registrar(work, a.registrar)
        test_external(work)
        if a.registrar:
            test_fake_server(work, a.registrar)
        if not a.no_prosody and shutil.which("prosody"):
            test_prosody(work)
    finally:
        for d in os.listdir(work):
            for sub in ("gnupg", ""):
                path = os.path.join(work, d, sub) if sub else os.path.join(work, d)
                if os.path.exists(os.path.join(path, "pubring.kbx")):
                    kb.Gpg(path).kill_agent()
        if a.keep:
            print("work directory:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
