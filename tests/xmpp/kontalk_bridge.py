"""Keys and X.509 "bridge" certificates exactly as Kontalk's clients make them.

Independent of kontalk-registrar's own code: GnuPG makes the OpenPGP keys, this module parses
the OpenPGP packets itself and writes the certificate's DER by hand, so that the bytes follow
Kontalk's `X509Bridge` (Bouncy Castle) field by field, including the quirks:

- subject = issuer = `O=OpenPGP to X.509 Bridge` + one `CN` per User ID (UTF8String each),
  serial 1, notBefore = the key's creation time, notAfter = notBefore for a key that never
  expires;
- extensions in this order: basicConstraints CA (critical), keyUsage digitalSignature,
  nonRepudiation, keyEncipherment, keyAgreement, keyCertSign (critical), netscapeCertType
  sslClient + S/MIME, subjectKeyIdentifier, authorityKeyIdentifier (keyIdentifier only, same
  value), subjectAltName with one otherName id-on-xmppAddr per User ID e-mail, **without** the
  `[0] EXPLICIT` wrapper around the UTF8String (Bouncy Castle's `GeneralName(otherName,
  DLSequence(oid, utf8))`), and `2.25.49058212633447845622587297037800555803` = DER BIT STRING of
  the transferable public key;
- signature sha1WithRSAEncryption for RSA (deterministic: the certificate Android's test
  assets ship is reproduced byte for byte), Ed25519 for Ed25519 keys (Android only does RSA/DSA;
  kontalk-registrar accepts Ed25519).

OpenSSL 3 refuses to load such a certificate for TLS (`load_cert_chain`: X509V3
INVALID_CERTIFICATE, because of the otherName), so `load_client_certificate` falls back to
`SSL_CTX_use_certificate_file` through ctypes.

Only the standard library and `cryptography` (key objects and signing).
"""

import base64
import ctypes
import datetime
import hashlib
import os
import re
import shutil
import ssl
import subprocess
import tempfile

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

BRIDGE_OID = "2.25.49058212633447845622587297037800555803"
XMPP_ADDR_OID = "1.3.6.1.5.5.7.8.5"
NETSCAPE_CERT_TYPE_OID = "2.16.840.1.113730.1.1"
EDDSA_LEGACY_OID = "1.3.6.1.4.1.11591.15.1"
DN_O = "OpenPGP to X.509 Bridge"

# OpenPGP public-key algorithms
PK_RSA = (1, 2, 3)
PK_ECDH, PK_ECDSA, PK_EDDSA = 18, 19, 22


class BridgeError(Exception):
    """A key or certificate that cannot be handled (a client bug or a bad input)."""


def account_of(phone):
    """The Kontalk account (JID localpart) of an E.164 number: SHA-1 hex of the number."""
    return hashlib.sha1(phone.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# DER (only what a certificate needs)

def der_len(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def tlv(tag, content):
    return bytes([tag]) + der_len(len(content)) + content


def der_int(n):
    if n == 0:
        return tlv(0x02, b"\x00")
    b = n.to_bytes((n.bit_length() + 8) // 8, "big")  # one spare bit keeps it positive
    while len(b) > 1 and b[0] == 0 and b[1] < 0x80:
        b = b[1:]
    return tlv(0x02, b)


def oid_body(dotted):
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1]] + arcs[2:]:  # arbitrary size arcs (the bridge OID: 126 bits)
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def der_oid(dotted):
    return tlv(0x06, oid_body(dotted))


def der_seq(*items):
    return tlv(0x30, b"".join(items))


def der_set(*items):
    return tlv(0x31, b"".join(sorted(items)))


def der_utf8(s):
    return tlv(0x0C, s.encode("utf-8"))


def der_octets(b):
    return tlv(0x04, b)


def der_bits(b, unused=0):
    return tlv(0x03, bytes([unused]) + b)


def der_bool(v):
    return tlv(0x01, b"\xff" if v else b"\x00")


def der_null():
    return b"\x05\x00"


def der_time(ts):
    """X.509 Time as Bouncy Castle's `Time(Date, Locale.US)`: UTCTime for 1950-2049."""
    t = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    if 1950 <= t.year < 2050:
        return tlv(0x17, t.strftime("%y%m%d%H%M%SZ").encode())
    return tlv(0x18, t.strftime("%Y%m%d%H%M%SZ").encode())


def explicit(n, content):
    return tlv(0xA0 | n, content)


def der_named_bits(bits, total):
    """A DER named BIT STRING from bit numbers (bit 0 = most significant), trailing zeros cut."""
    if not bits:
        return der_bits(b"")
    width = max(bits) + 1
    nbytes = (width + 7) // 8
    v = 0
    for b in bits:
        v |= 1 << (nbytes * 8 - 1 - b)
    return der_bits(v.to_bytes(nbytes, "big"), nbytes * 8 - width)


def der_read(buf, off=0):
    """(tag, content, next offset) of the DER element at `off`."""
    tag = buf[off]
    n = buf[off + 1]
    off += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[off:off + k], "big")
        off += k
    return tag, buf[off:off + n], off + n


def der_children(content):
    out, off = [], 0
    while off < len(content):
        tag, c, nxt = der_read(content, off)
        out.append((tag, c, content[off:nxt]))
        off = nxt
    return out


def oid_str(body):
    arcs, v = [], 0
    for byte in body:
        v = (v << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(v)
            v = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first] + arcs[1:])


# ---------------------------------------------------------------------------------------------
# OpenPGP packets

class Packet:
    def __init__(self, tag, body):
        self.tag, self.body = tag, body

    def __repr__(self):
        return f"Packet(tag={self.tag}, {len(self.body)} bytes)"


def read_packets(data):
    """The packets of binary OpenPGP data (old and new format headers; keys have no partial
    lengths)."""
    out, off = [], 0
    while off < len(data):
        ctb = data[off]
        if not ctb & 0x80:
            raise BridgeError(f"not OpenPGP data at offset {off}")
        if ctb & 0x40:  # new format
            tag = ctb & 0x3F
            o = data[off + 1]
            if o < 192:
                n, h = o, 2
            elif o < 224:
                n, h = ((o - 192) << 8) + data[off + 2] + 192, 3
            elif o == 255:
                n, h = int.from_bytes(data[off + 2:off + 6], "big"), 6
            else:
                raise BridgeError("partial body lengths are not expected in keys")
        else:
            tag = (ctb >> 2) & 0x0F
            lt = ctb & 3
            if lt == 3:
                raise BridgeError("indeterminate lengths are not expected in keys")
            k = (1, 2, 4)[lt]
            n, h = int.from_bytes(data[off + 1:off + 1 + k], "big"), 1 + k
        out.append(Packet(tag, data[off + h:off + h + n]))
        off += h + n
    return out


def read_mpi(buf, off):
    bits = int.from_bytes(buf[off:off + 2], "big")
    n = (bits + 7) // 8
    return int.from_bytes(buf[off + 2:off + 2 + n], "big"), off + 2 + n


def mpi_bytes(buf, off):
    bits = int.from_bytes(buf[off:off + 2], "big")
    n = (bits + 7) // 8
    return buf[off + 2:off + 2 + n], off + 2 + n


class PublicKey:
    """A v4 public (sub)key packet body: algorithm, creation time and key material."""

    def __init__(self, body):
        if body[0] != 4:
            raise BridgeError(f"only v4 keys are handled (got v{body[0]})")
        self.created = int.from_bytes(body[1:5], "big")
        self.algo = body[5]
        off = 6
        self.n = self.e = self.oid = self.point = None
        if self.algo in PK_RSA:
            self.n, off = read_mpi(body, off)
            self.e, off = read_mpi(body, off)
        elif self.algo in (PK_ECDH, PK_ECDSA, PK_EDDSA):
            k = body[off]
            self.oid = oid_str(body[off + 1:off + 1 + k])
            off += 1 + k
            self.point, off = mpi_bytes(body, off)
            if self.algo == PK_ECDH:
                off += 1 + body[off]  # KDF parameters
        else:
            raise BridgeError(f"unsupported OpenPGP algorithm {self.algo}")
        self.public_len = off
        self.body = body[:off]
        self.fingerprint = hashlib.sha1(b"\x99" + len(self.body).to_bytes(2, "big") + self.body).hexdigest().upper()
        self.keyid = self.fingerprint[-16:]

    def crypto_public(self):
        """The key as a `cryptography` public key (the certificate's SubjectPublicKeyInfo)."""
        if self.algo in PK_RSA:
            return rsa.RSAPublicNumbers(self.e, self.n).public_key()
        if self.algo == PK_EDDSA and self.oid == EDDSA_LEGACY_OID:
            if len(self.point) != 33 or self.point[0] != 0x40:
                raise BridgeError("EdDSA point without the 0x40 prefix")
            return ed25519.Ed25519PublicKey.from_public_bytes(self.point[1:])
        raise BridgeError(f"no X.509 form for OpenPGP algorithm {self.algo} ({self.oid})")


def key_expiration(sig_body):
    """Key expiration time (subpacket 9) of a v4 signature's hashed area, or None."""
    if sig_body[0] != 4:
        return None
    n = int.from_bytes(sig_body[4:6], "big")
    area, off = sig_body[6:6 + n], 0
    while off < len(area):
        o = area[off]
        if o < 192:
            ln, h = o, 1
        elif o < 255:
            ln, h = ((o - 192) << 8) + area[off + 1] + 192, 2
        else:
            ln, h = int.from_bytes(area[off + 1:off + 5], "big"), 5
        sub = area[off + h:off + h + ln]
        if sub and sub[0] & 0x7F == 9:
            return int.from_bytes(sub[1:5], "big")
        off += h + ln
    return None


class PublicKeyRing:
    """A transferable public key: the primary key, its User IDs (in order) and its subkeys."""

    def __init__(self, data):
        self.data = data
        pk = read_packets(data)
        if not pk or pk[0].tag not in (6, 5):
            raise BridgeError("the data does not start with a primary key")
        self.primary = PublicKey(pk[0].body)
        self.user_ids, self.subkeys, self.valid_seconds = [], [], 0
        in_uid = False
        for p in pk[1:]:
            if p.tag == 13:
                self.user_ids.append(p.body.decode("utf-8"))
                in_uid = True
            elif p.tag in (14, 7):
                self.subkeys.append(PublicKey(p.body))
                in_uid = False
            elif p.tag == 17:
                in_uid = False
            elif p.tag == 2 and in_uid and p.body[0] == 4 and 0x10 <= p.body[1] <= 0x13:
                exp = key_expiration(p.body)
                if exp is not None and p.body[4:6] and self._issued_by_primary(p.body):
                    self.valid_seconds = exp
            elif p.tag in (6, 5):
                raise BridgeError("more than one key in the data")

    def _issued_by_primary(self, sig):
        n = int.from_bytes(sig[4:6], "big")
        m = int.from_bytes(sig[6 + n:8 + n], "big")
        areas = sig[6:6 + n] + sig[8 + n:8 + n + m]
        return bytes.fromhex(self.primary.keyid) in areas or bytes.fromhex(self.primary.fingerprint) in areas


def uid_email(uid):
    """The e-mail of a User ID as Kontalk's `PGPUserID.parse` finds it."""
    m = re.match(r"^(.*) \((.*)\) <(.*)>$", uid) or re.match(r"^(.*) <(.*)>$", uid)
    return m.groups()[-1] if m else None


S2K_HASHES = {1: hashlib.md5, 2: hashlib.sha1, 8: hashlib.sha256, 9: hashlib.sha384,
              10: hashlib.sha512, 11: hashlib.sha224}
AES_KEY_SIZES = {7: 16, 8: 24, 9: 32}


def _s2k_key(spec, passphrase, size):
    """RFC 4880 3.7.1 string-to-key: (key, length of the specifier)."""
    kind, h = spec[0], S2K_HASHES.get(spec[1])
    if h is None:
        raise BridgeError(f"unsupported S2K hash {spec[1]}")
    pw = passphrase.encode("utf-8")
    if kind == 0:
        salt, count, n = b"", 0, 2
    elif kind == 1:
        salt, count, n = spec[2:10], 0, 10
    elif kind == 3:
        salt, c, n = spec[2:10], spec[10], 11
        count = (16 + (c & 15)) << ((c >> 4) + 6)
    else:
        raise BridgeError(f"unsupported S2K type {kind}")
    data = salt + pw
    total = max(count, len(data))
    key, preload = b"", 0
    while len(key) < size:
        ctx = h(b"\x00" * preload)
        reps, rest = divmod(total, len(data))
        ctx.update(data * reps + data[:rest])
        key += ctx.digest()
        preload += 1
    return key[:size], n


def _unprotect(body, off, passphrase):
    """The cleartext secret MPIs of a protected (S2K usage 254/255) v4 secret key packet."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    try:
        from cryptography.hazmat.decrepit.ciphers.modes import CFB
    except ImportError:  # cryptography < 47
        from cryptography.hazmat.primitives.ciphers.modes import CFB
    usage = body[off]
    sym = body[off + 1]
    if sym not in AES_KEY_SIZES:
        raise BridgeError(f"unsupported secret key cipher {sym}")
    key, n = _s2k_key(body[off + 2:], passphrase, AES_KEY_SIZES[sym])
    p = off + 2 + n
    iv, enc = body[p:p + 16], body[p + 16:]
    dec = Cipher(algorithms.AES(key), CFB(iv)).decryptor()
    clear = dec.update(enc) + dec.finalize()
    if usage == 254:
        data, check = clear[:-20], clear[-20:]
        if hashlib.sha1(data).digest() != check:
            raise BridgeError("wrong passphrase (the secret key's SHA-1 check fails)")
    else:
        data, check = clear[:-2], clear[-2:]
        if sum(data) & 0xFFFF != int.from_bytes(check, "big"):
            raise BridgeError("wrong passphrase (the secret key's checksum fails)")
    return data


def secret_primary(data, passphrase=None):
    """(PublicKey, cryptography private key) of the primary key of a secret key export
    (unprotected, or protected with `passphrase`), cross-checked against the key material."""
    pk = read_packets(data)
    if not pk or pk[0].tag != 5:
        raise BridgeError("the data does not start with a secret key packet")
    body = pk[0].body
    pub = PublicKey(body)
    off = pub.public_len
    usage = body[off]
    if usage in (254, 255):
        if passphrase is None:
            raise BridgeError("the secret key is protected: a passphrase is needed")
        cleartext = _unprotect(body, off, passphrase)
        body = body[:off] + b"\x00" + cleartext + (sum(cleartext) & 0xFFFF).to_bytes(2, "big")
    elif usage != 0:
        raise BridgeError(f"unsupported secret key protection (S2K usage {usage})")
    off += 1
    start = off
    if pub.algo in PK_RSA:
        d, off = read_mpi(body, off)
        p, off = read_mpi(body, off)
        q, off = read_mpi(body, off)
        u, off = read_mpi(body, off)  # OpenPGP: u = p^-1 mod q (p < q)
        if p * q != pub.n or (u * p) % q != 1:
            raise BridgeError("RSA secret key does not match its modulus")
        numbers = rsa.RSAPrivateNumbers(
            p=p, q=q, d=d, dmp1=rsa.rsa_crt_dmp1(d, p), dmq1=rsa.rsa_crt_dmq1(d, q),
            iqmp=rsa.rsa_crt_iqmp(p, q), public_numbers=rsa.RSAPublicNumbers(pub.e, pub.n))
        priv = numbers.private_key()
    elif pub.algo == PK_EDDSA and pub.oid == EDDSA_LEGACY_OID:
        seed, off = mpi_bytes(body, off)
        priv = ed25519.Ed25519PrivateKey.from_private_bytes(seed.rjust(32, b"\x00"))
    else:
        raise BridgeError(f"unsupported primary key algorithm {pub.algo}")
    checksum = int.from_bytes(body[off:off + 2], "big")
    if sum(body[start:off]) & 0xFFFF != checksum:
        raise BridgeError("secret key checksum mismatch")
    if public_der(priv.public_key()) != public_der(pub.crypto_public()):
        raise BridgeError("the secret key does not match the public key")
    return pub, priv


def public_der(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------------------------------------
# The bridge certificate

SHA1_RSA = der_seq(der_oid("1.2.840.113549.1.1.5"), der_null())
SHA256_RSA = der_seq(der_oid("1.2.840.113549.1.1.11"), der_null())
ED25519_ALG = der_seq(der_oid("1.3.101.112"))


def _key_bits(key):
    """The subjectPublicKey BIT STRING content (what the key identifiers hash)."""
    spki = public_der(key)
    _, content, _ = der_read(spki)
    tag, bits, _ = der_children(content)[1]
    return bits[1:]


def _ext(oid, value, critical=False):
    return der_seq(der_oid(oid), *([der_bool(True)] if critical else []), der_octets(value))


def build_bridge_certificate(public_key_data, private_key, x509_key=None, rename_domain=None,
                             sha256=False):
    """DER of the bridge certificate of `public_key_data` (binary transferable public key),
    signed with `private_key` (the primary key's `cryptography` private key).

    Variants for refusal tests: `x509_key` (a private key) puts another key in the X.509 part
    than the embedded OpenPGP key's primary (and signs with it); `rename_domain` rewrites the
    domain of the X.509 names (CN and xmppAddr) but not the embedded key; `sha256` signs RSA with
    SHA-256."""
    ring = PublicKeyRing(public_key_data)
    signer = x509_key or private_key
    pub = signer.public_key()
    if x509_key is None and public_der(pub) != public_der(ring.primary.crypto_public()):
        raise BridgeError("the private key is not the embedded key's primary key")

    uids = ring.user_ids
    if rename_domain:
        uids = [re.sub(r"@[^>@]*>$", "@" + rename_domain + ">", u) for u in uids]
    name = der_seq(
        der_set(der_seq(der_oid("2.5.4.10"), der_utf8(DN_O))),
        *[der_set(der_seq(der_oid("2.5.4.3"), der_utf8(u))) for u in uids])
    emails = [e for e in (uid_email(u) for u in uids) if e is not None]

    not_before = ring.primary.created
    not_after = not_before + ring.valid_seconds if ring.valid_seconds > 0 else not_before

    if isinstance(signer, rsa.RSAPrivateKey):
        alg = SHA256_RSA if sha256 else SHA1_RSA
    elif isinstance(signer, ed25519.Ed25519PrivateKey):
        alg = ED25519_ALG
    else:
        raise BridgeError("only RSA and Ed25519 keys make bridge certificates")

    key_id = hashlib.sha1(_key_bits(pub)).digest()
    exts = [
        _ext("2.5.29.19", der_seq(der_bool(True)), critical=True),
        # digitalSignature, nonRepudiation, keyEncipherment, keyAgreement, keyCertSign
        _ext("2.5.29.15", der_named_bits([0, 1, 2, 4, 5], 9), critical=True),
        # Netscape: sslClient (bit 0), smime (bit 2)
        _ext(NETSCAPE_CERT_TYPE_OID, der_named_bits([0, 2], 8)),
        _ext("2.5.29.14", der_octets(key_id)),
        _ext("2.5.29.35", der_seq(tlv(0x80, key_id))),
    ]
    if emails:
        # GeneralName otherName [0] (IMPLICIT) over SEQUENCE { type-id, UTF8String } -- no
        # [0] EXPLICIT around the value, as Kontalk's XmppAddrIdentifier writes it.
        exts.append(_ext("2.5.29.17", der_seq(*[
            tlv(0xA0, der_oid(XMPP_ADDR_OID) + der_utf8(e)) for e in emails])))
    exts.append(_ext(BRIDGE_OID, der_bits(public_key_data)))

    tbs = der_seq(
        explicit(0, der_int(2)),
        der_int(1),
        alg,
        name,
        der_seq(der_time(not_before), der_time(not_after)),
        name,
        public_der(pub),
        explicit(3, der_seq(*exts)),
    )
    if isinstance(signer, rsa.RSAPrivateKey):
        sig = signer.sign(tbs, padding.PKCS1v15(), hashes.SHA256() if sha256 else hashes.SHA1())
    else:
        sig = signer.sign(tbs)
    return der_seq(tbs, alg, der_bits(sig))


def pem(der, label="CERTIFICATE"):
    b = base64.encodebytes(der).decode().replace("\n", "")
    return f"-----BEGIN {label}-----\n" + "\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + f"\n-----END {label}-----\n"


def unpem(text):
    if isinstance(text, bytes):
        if not text.lstrip().startswith(b"-----"):
            return text
        text = text.decode()
    body = re.search(r"-----BEGIN [A-Z ]+-----(.*?)-----END", text, re.S).group(1)
    return base64.b64decode("".join(body.split()))


def private_key_pem(key):
    """PKCS#8 PEM, as Kontalk's key pack `kontalk-login.key`."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate_fields(der):
    """A summary of a certificate's structure, to compare two certificates field by field."""
    _, cert, _ = der_read(der)
    tbs_t, sig_alg, sig = der_children(cert)
    f = der_children(tbs_t[1])
    out = {"version": f[0][2].hex(), "serial": f[1][2].hex(), "signature": f[2][2].hex(),
           "issuer": f[3][2].hex(), "validity": f[4][2].hex(), "subject": f[5][2].hex(),
           "outer_signature_algorithm": sig_alg[2].hex(), "extensions": []}
    spki = der_children(f[6][1])
    out["spki_algorithm"] = spki[0][2].hex()
    for _, ext, _ in der_children(der_children(f[7][1])[0][1]):
        parts = der_children(ext)
        crit = len(parts) == 3
        out["extensions"].append({"oid": oid_str(parts[0][1]), "critical": crit,
                                  "value": parts[-1][1]})
    nb = der_children(f[4][1])
    out["not_before"], out["not_after"] = nb[0][1].decode(), nb[1][1].decode()
    return out


# ---------------------------------------------------------------------------------------------
# TLS: presenting a bridge certificate

def _loaded_lib(name):
    """The path of the shared library `name` as this process (Python's _ssl) loaded it."""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if os.path.basename(path).startswith(name + ".so"):
                return path
    return name + ".so.3"


def load_client_certificate(ctx, certfile, keyfile):
    """Makes `ctx` present the certificate `certfile` with the key `keyfile`. Returns how:
    `load_cert_chain`, or the ctypes fallback with the reason `load_cert_chain` gave.

    OpenSSL 3's `SSL_CTX_use_certificate_chain_file` (behind `load_cert_chain`) refuses Kontalk's
    certificates (X509V3 INVALID_CERTIFICATE: the otherName lacks the `[0] EXPLICIT` wrapper);
    `SSL_CTX_use_certificate_file` does not check the extensions, so it is called through
    ctypes on the context's `SSL_CTX *` (the first member after the PyObject header)."""
    try:
        ctx.load_cert_chain(certfile, keyfile)
        return "load_cert_chain"
    except ssl.SSLError as e:
        why = f"{e.reason or ''} {e}".strip()
    libssl = ctypes.CDLL(_loaded_lib("libssl"))
    libcrypto = ctypes.CDLL(_loaded_lib("libcrypto"))
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    for fn in ("SSL_CTX_use_certificate_file", "SSL_CTX_use_PrivateKey_file"):
        getattr(libssl, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        getattr(libssl, fn).restype = ctypes.c_int
    libssl.SSL_CTX_check_private_key.argtypes = [ctypes.c_void_p]
    libssl.SSL_CTX_check_private_key.restype = ctypes.c_int
    libcrypto.ERR_clear_error.argtypes = []
    libcrypto.ERR_clear_error.restype = None
    libcrypto.ERR_clear_error()
    if libssl.SSL_CTX_use_certificate_file(ptr, os.fsencode(certfile), 1) != 1:
        libcrypto.ERR_clear_error()
        raise BridgeError(f"OpenSSL cannot load {certfile} even with SSL_CTX_use_certificate_file")
    if libssl.SSL_CTX_use_PrivateKey_file(ptr, os.fsencode(keyfile), 1) != 1:
        libcrypto.ERR_clear_error()
        raise BridgeError(f"OpenSSL cannot load the key {keyfile}")
    if libssl.SSL_CTX_check_private_key(ptr) != 1:
        libcrypto.ERR_clear_error()
        raise BridgeError(f"{keyfile} is not the key of {certfile}")
    libcrypto.ERR_clear_error()
    return f"ctypes SSL_CTX_use_certificate_file (load_cert_chain refused: {why})"


def client_context(certfile=None, keyfile=None, cafile=None):
    """(SSLContext, how the certificate was loaded or None). No server verification unless
    `cafile` is given (then the chain, not the host name, is checked)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if cafile:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    how = load_client_certificate(ctx, certfile, keyfile) if certfile else None
    return ctx, how


# ---------------------------------------------------------------------------------------------
# GnuPG

class Gpg:
    """GnuPG in its own home, batch mode, no passphrase unless given."""

    def __init__(self, home):
        self.home = os.path.abspath(home)
        os.makedirs(self.home, exist_ok=True)
        os.chmod(self.home, 0o700)

    def run(self, *args, data=None, passphrase="", check=True):
        cmd = ["gpg", "--homedir", self.home, "--batch", "--no-tty", "--pinentry-mode", "loopback",
               "--passphrase", passphrase, *args]
        r = subprocess.run(cmd, input=data, capture_output=True, timeout=120)
        if check and r.returncode != 0:
            raise BridgeError(f"gpg {' '.join(args)} failed: {r.stderr.decode(errors='replace').strip()}")
        return r

    def out(self, *args, **kw):
        return self.run(*args, **kw).stdout

    def generate(self, uid, kind="rsa"):
        """A key as Kontalk makes it. `rsa`: RSA-2048 primary for certification and
        authentication (Android's PGP.create/store: key flags 0x21), an ECDSA P-256 signing
        subkey and an ECDH P-256 encryption subkey, in that order. `ed25519`: Ed25519 primary
        (sign, certify) and a Curve25519 encryption subkey. Returns the fingerprint."""
        before = set(self.fingerprints())
        if kind == "rsa":
            self.run("--yes", "--quick-gen-key", uid, "rsa2048", "cert,auth", "never")
        elif kind == "ed25519":
            self.run("--yes", "--quick-gen-key", uid, "ed25519", "sign,cert", "never")
        else:
            raise BridgeError(f"unknown key type {kind}")
        (fpr,) = set(self.fingerprints()) - before
        if kind == "rsa":
            self.run("--quick-add-key", fpr, "nistp256/ecdsa", "sign", "never")
            self.run("--quick-add-key", fpr, "nistp256", "encr", "never")
        else:
            self.run("--quick-add-key", fpr, "cv25519", "encr", "never")
        return fpr

    def fingerprints(self, query=None):
        r = self.run("--with-colons", "--list-keys", *([query] if query else []), check=query is not None)
        lines = r.stdout.decode().splitlines()
        fprs, want = [], False
        for line in lines:
            f = line.split(":")
            if f[0] == "pub":
                want = True
            elif f[0] == "sub":
                want = False
            elif f[0] == "fpr" and want:
                fprs.append(f[9])
                want = False
        return fprs

    def export(self, fpr):
        return self.out("--export", fpr)

    def export_secret(self, fpr):
        return self.out("--export-secret-keys", fpr)

    def export_secret_protected(self, fpr, passphrase):
        """The secret key protected with `passphrase` (in a copy of the home, whose key gets
        the passphrase), as Kontalk uploads and exports it."""
        tmp = tempfile.mkdtemp(prefix="kgpg", dir="/tmp")
        try:
            for name in ("pubring.kbx", "trustdb.gpg", "private-keys-v1.d"):
                src = os.path.join(self.home, name)
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(tmp, name))
                elif os.path.exists(src):
                    shutil.copy2(src, tmp)
            g = Gpg(tmp)
            g.run("--passwd", fpr, passphrase=passphrase)
            data = g.out("--export-secret-keys", fpr, passphrase=passphrase)
            g.kill_agent()
            return data
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def import_(self, data, passphrase=""):
        return self.run("--import", data=data, passphrase=passphrase)

    def sigs(self, fpr):
        """`--check-sigs` as (validity char, issuer key id, signature class, issuer uid) for each
        User ID signature, with the User ID."""
        out, uid = [], None
        for line in self.out("--with-colons", "--check-sigs", fpr).decode().splitlines():
            f = line.split(":")
            if f[0] == "uid":
                uid = f[9]
            elif f[0] == "sub":
                uid = None
            elif f[0] == "sig" and uid is not None:
                out.append({"uid": uid, "status": f[1], "keyid": f[4], "class": f[10], "issuer": f[9]})
        return out

    def certify(self, signer_fpr, target_fpr):
        """Certifies every User ID of `target_fpr` with `signer_fpr` (exportable)."""
        self.run("--default-key", signer_fpr, "--quick-sign-key", target_fpr)

    def kill_agent(self):
        subprocess.run(["gpgconf", "--homedir", self.home, "--kill", "gpg-agent"],
                       capture_output=True, timeout=30)
