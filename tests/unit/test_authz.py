"""Token verification for registry policies: HS256 secret, PEM public key, JWKS file; default deny."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from config.registry import AccessPolicy
from config.settings import Settings
from workers.authz import TokenVerifier, authorize
from workers.errors import AuthorizationDenied

SECRET = "policy-secret-0123456789abcdef0123456789"
POLICY = AccessPolicy(subjects=["carol"], teams=["admins"], roles=["operator"])


def _settings(**fields: object) -> Settings:
    # Only the keys given here: the test session's environment also sets SARK_AUTH_HS256_SECRET.
    none: dict[str, object] = {"auth_hs256_secret": None, "auth_public_key": None, "auth_jwks_path": None,
                               "auth_audience": None, "auth_issuer": None}
    return Settings(_env_file=None, **{**none, **fields})  # type: ignore[arg-type]


def _hs(**claims: object) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, SECRET, algorithm="HS256")


def _hs_with(secret: str, **claims: object) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, secret, algorithm="HS256")


def _check(token: str | None, settings: Settings) -> None:
    authorize("tools", POLICY, token, TokenVerifier(settings), settings)


def test_listed_subject_team_or_role_is_allowed() -> None:
    settings = _settings(auth_hs256_secret=SECRET)
    _check(_hs(sub="carol"), settings)
    _check(_hs(sub="x", teams=["users", "admins"]), settings)
    _check(_hs(sub="x", roles="operator"), settings)


@pytest.mark.parametrize("case", ["none", "unlisted", "expired", "wrong secret", "alg none", "no sub", "no exp"])
def test_everyone_else_is_denied(case: str) -> None:
    settings = _settings(auth_hs256_secret=SECRET)
    token = {
        "none": None,
        "unlisted": _hs(sub="alice", teams=["users"]),
        "expired": jwt.encode({"sub": "carol", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"),
        "wrong secret": _hs_with("another-secret-0123456789abcdefgh", sub="carol"),
        "alg none": jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, None, algorithm="none"),
        "no sub": _hs(teams=["admins"]),
        "no exp": jwt.encode({"sub": "carol"}, SECRET, algorithm="HS256"),
    }[case]
    with pytest.raises(AuthorizationDenied, match="tools"):
        _check(token, settings)


def test_no_verification_key_denies_everything() -> None:
    with pytest.raises(AuthorizationDenied, match="no key to verify"):
        _check(_hs(sub="carol"), _settings())


def _rsa() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, pem


def test_rs256_with_a_pem_public_key_audience_and_issuer(tmp_path: Path) -> None:
    key, pem = _rsa()
    path = tmp_path / "key.pem"
    path.write_text(pem, encoding="utf-8")
    settings = _settings(auth_public_key=str(path), auth_audience="sark", auth_issuer="https://idp.local")
    exp = int(time.time()) + 60
    good = jwt.encode({"sub": "carol", "aud": "sark", "iss": "https://idp.local", "exp": exp}, key, algorithm="RS256")
    _check(good, settings)
    _check(good, _settings(auth_public_key=pem, auth_audience="sark", auth_issuer="https://idp.local"))
    for claims in ({"sub": "carol", "aud": "other", "iss": "https://idp.local", "exp": exp},
                   {"sub": "carol", "aud": "sark", "iss": "https://evil.local", "exp": exp}):
        with pytest.raises(AuthorizationDenied):
            _check(jwt.encode(claims, key, algorithm="RS256"), settings)
    # An HS256 token "signed" with the public key text must not pass (algorithm confusion).
    with pytest.raises(AuthorizationDenied):
        _check(jwt.encode({"sub": "carol", "aud": "sark", "iss": "https://idp.local", "exp": exp}, "x" * 32,
                          algorithm="HS256"), settings)


def test_a_token_for_another_key_type_is_refused_not_a_crash() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    rsa_key, _ = _rsa()
    forged = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, rsa_key, algorithm="RS256")
    with pytest.raises(AuthorizationDenied):  # RS256 header against an EC key: InvalidKeyError inside PyJWT
        _check(forged, _settings(auth_public_key=pem))


def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    (one, _), (two, _) = _rsa(), _rsa()
    keys = []
    for kid, key in (("k1", one), ("k2", two)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}), encoding="utf-8")
    settings = _settings(auth_jwks_path=str(path))
    claims = {"sub": "carol", "exp": int(time.time()) + 60}
    _check(jwt.encode(claims, two, algorithm="RS256", headers={"kid": "k2"}), settings)
    with pytest.raises(AuthorizationDenied):  # signed by k1 but claims to be k2
        _check(jwt.encode(claims, one, algorithm="RS256", headers={"kid": "k2"}), settings)
