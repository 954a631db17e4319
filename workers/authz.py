"""Per-user authorization of registry servers that declare a ``policy:`` (who may call them).

The Gateway authorizes HTTP/SSE calls itself; stdio servers run inside the worker and had no such
check: anyone who could enqueue could call every stdio tool. A server with a policy is now called
only with a user token that

1. is a JWT whose signature verifies with a key from the settings (``SARK_AUTH_HS256_SECRET``, a PEM
   public key ``SARK_AUTH_PUBLIC_KEY`` or a JWKS file ``SARK_AUTH_JWKS_PATH``), carries ``sub`` and
   ``exp`` and is not expired (with
   ``SARK_TOKEN_LEEWAY``) and, when set, carries ``SARK_AUTH_AUDIENCE`` / ``SARK_AUTH_ISSUER``;
2. names a listed subject (``sub``), or one listed team (``SARK_AUTH_TEAMS_CLAIM``), or one listed role
   (``SARK_AUTH_ROLES_CLAIM``).

Anything else is :class:`~workers.errors.AuthorizationDenied` before the server is touched (default
deny). Servers without a policy are not checked (SECURITY.md says what that means).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from config.registry import AccessPolicy
from config.settings import Settings
from workers.errors import AuthorizationDenied

__all__ = ["TokenVerifier", "authorize"]

_HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
_PUBLIC_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


@dataclass(frozen=True)
class _Key:
    key: Any
    algorithms: list[str]


class TokenVerifier:
    """Verifies user JWTs with the keys the settings name (none: every verification is refused)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys: list[_Key] = []
        self._by_kid: dict[str, _Key] = {}
        if settings.auth_hs256_secret is not None:
            self._keys.append(_Key(settings.auth_hs256_secret.get_secret_value(), _HMAC_ALGORITHMS))
        if settings.auth_public_key:
            pem = settings.auth_public_key
            if not pem.lstrip().startswith("-----BEGIN"):
                pem = Path(pem).read_text(encoding="utf-8")
            self._keys.append(_Key(pem, _PUBLIC_ALGORITHMS))
        if settings.auth_jwks_path is not None:
            jwks = jwt.PyJWKSet.from_json(settings.auth_jwks_path.read_text(encoding="utf-8"))
            for jwk in jwks.keys:
                entry = _Key(jwk.key, [jwk.algorithm_name] if jwk.algorithm_name else _PUBLIC_ALGORITHMS)
                if jwk.key_id:
                    self._by_kid[jwk.key_id] = entry
                else:
                    self._keys.append(entry)

    @property
    def configured(self) -> bool:
        """True when at least one verification key is set."""
        return bool(self._keys or self._by_kid)

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``.

        Raises:
            AuthorizationDenied: no key verifies it, it expired, or audience/issuer do not match.
        """
        if not self.configured:
            raise AuthorizationDenied("this server has an access policy but the worker has no key to verify "
                                      "user tokens (SARK_AUTH_*)", {"status_code": 403})
        s = self._settings
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise AuthorizationDenied("the user's token is not a JWT", {"status_code": 403}) from None
        candidates = [self._by_kid[kid]] if isinstance(kid, str) and kid in self._by_kid else self._keys
        problem = "no configured key verifies the user's token"
        for candidate in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, candidate.key, algorithms=candidate.algorithms, audience=s.auth_audience,
                    issuer=s.auth_issuer, leeway=s.token_leeway,
                    options={"require": ["sub", "exp"], "verify_aud": s.auth_audience is not None},
                )
                return claims
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue  # another key may verify it (an RS256 header against an EC key is InvalidKeyError)
            except jwt.ExpiredSignatureError:
                problem = "the user's token expired"
                break
            except jwt.InvalidTokenError as exc:  # audience, issuer, missing sub or exp, bad algorithm…
                problem = f"the user's token was refused ({type(exc).__name__})"
                if not isinstance(exc, jwt.InvalidAlgorithmError):
                    break
            except jwt.PyJWTError as exc:  # anything else PyJWT raises on a forged token: refused, never a crash
                problem = f"the user's token was refused ({type(exc).__name__})"
        raise AuthorizationDenied(problem, {"status_code": 403})


def _listed(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return {str(v) for v in value}
    return set()


def authorize(server_name: str, policy: AccessPolicy, token: str | None, verifier: TokenVerifier,
              settings: Settings) -> None:
    """Allow the call, or raise.

    Raises:
        AuthorizationDenied: no token, an unverifiable token, or a caller the policy does not list.
            The message names the server, never the token or the caller's claims.
    """
    if not token:
        raise AuthorizationDenied(f"server {server_name!r} requires a user token", {"status_code": 403})
    try:
        claims = verifier.claims(token)
    except AuthorizationDenied as exc:
        raise AuthorizationDenied(f"server {server_name!r} refused the call: {exc.message}", exc.detail) from None
    if (str(claims.get("sub")) in policy.subjects
            or _listed(claims.get(settings.auth_teams_claim)) & set(policy.teams)
            or _listed(claims.get(settings.auth_roles_claim)) & set(policy.roles)):
        return
    raise AuthorizationDenied(f"the caller is not allowed to call server {server_name!r} (policy)",
                              {"status_code": 403})
