#!/usr/bin/env python3
"""RS256 material for bench/compare.sh, standard library only.

The gateway's `dev-token` signs ES256, but HAProxy's `jwt_verify` is run
with RS256 here (as in the reference measurement): both sides must verify
the same tokens, so the bench mints its own. The key is made by openssl
(`openssl genrsa -traditional`) and read here as PKCS#1 DER.

  rs256.py jwks KEY.der KID                  > jwks.json
  rs256.py mint KEY.der KID ISS AUD TTL USER... > one JWT per line
"""
import base64
import hashlib
import json
import sys
import time

# DigestInfo prefix of SHA-256 for PKCS#1 v1.5 signatures (RFC 8017 §9.2).
SHA256_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def int_bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def der_integers(der: bytes) -> list:
    """The INTEGERs of an RSAPrivateKey SEQUENCE (RFC 8017 A.1.2)."""

    def length(i):
        first = der[i]
        if first < 0x80:
            return first, i + 1
        count = first & 0x7F
        return int.from_bytes(der[i + 1 : i + 1 + count], "big"), i + 1 + count

    assert der[0] == 0x30, "not a DER SEQUENCE"
    _, i = length(1)
    values = []
    while i < len(der):
        assert der[i] == 0x02, "expected an INTEGER"
        size, i = length(i + 1)
        values.append(int.from_bytes(der[i : i + size], "big"))
        i += size
    return values


class Key:
    def __init__(self, path):
        with open(path, "rb") as f:
            der = f.read()
        _, self.n, self.e, _d, self.p, self.q, self.dp, self.dq, self.qinv = der_integers(der)[:9]
        self.size = (self.n.bit_length() + 7) // 8
        try:  # the same signature, ten times faster, where the package is installed
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import padding

            private = serialization.load_der_private_key(der, password=None)
            self.sign = lambda message: private.sign(message, padding.PKCS1v15(), hashes.SHA256())
        except ImportError:
            pass

    def sign(self, message: bytes) -> bytes:
        digest = SHA256_PREFIX + hashlib.sha256(message).digest()
        padded = b"\x00\x01" + b"\xff" * (self.size - len(digest) - 3) + b"\x00" + digest
        m = int.from_bytes(padded, "big")
        # CRT: about 3x faster than pow(m, d, n).
        m1, m2 = pow(m, self.dp, self.p), pow(m, self.dq, self.q)
        s = m2 + self.q * ((self.qinv * (m1 - m2)) % self.p)
        return s.to_bytes(self.size, "big")


def main(argv):
    if len(argv) >= 4 and argv[1] == "jwks":
        key = Key(argv[2])
        jwk = {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": argv[3],
               "n": b64url(int_bytes(key.n)), "e": b64url(int_bytes(key.e))}
        print(json.dumps({"keys": [jwk]}))
        return 0
    if len(argv) >= 8 and argv[1] == "mint":
        key = Key(argv[2])
        kid, iss, aud, ttl = argv[3], argv[4], argv[5], int(argv[6])
        header = b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode())
        now = int(time.time())
        out = []
        for user in argv[7:]:
            claims = {"iss": iss, "aud": aud, "sub": "bench-app", "koodrive_uid": user,
                      "iat": now, "nbf": now, "exp": now + ttl}
            payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
            signing_input = f"{header}.{payload}".encode()
            out.append(f"{header}.{payload}.{b64url(key.sign(signing_input))}")
        print("\n".join(out))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
