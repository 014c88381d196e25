"""Credentials to accounts: API keys, JWT bearer tokens and sign-in sessions.

* ``X-API-Key: <key>`` and ``Authorization: Bearer <key>`` name an API key,
  looked up by its SHA-256 hash (see :meth:`Ledger.account_for_api_key`).
* A bearer value with exactly two dots is a JWT, verified with pyjwt:
  HS256 with ``settings.jwt_hs256_secret``, RS256 / ES256 (P-256) with the PEM
  public keys in ``settings.jwt_public_keys``. Only algorithms with a
  configured key are accepted (so ``alg: none`` never is); the token's header
  picks the algorithm and every configured key of it is tried (key rotation).
  ``exp`` and ``sub`` are required, and so are ``aud`` and ``iss``, which
  must equal ``settings.jwt_audience`` / ``settings.jwt_issuer``: with JWTs
  enabled (a key configured), billing refuses to start without them unless
  ``settings.jwt_require_audience`` / ``settings.jwt_require_issuer`` is
  turned off (then that claim is not checked). ``nbf`` and ``iat`` are
  checked when present; clock skew is ``settings.jwt_leeway_seconds``. A
  token may live at most ``settings.jwt_max_lifetime_seconds`` (``exp`` minus
  ``iat``, or minus now without ``iat``). An HS256 secret shorter than 32
  bytes is refused at start (RFC 7518 asks for a key as long as the hash). The
  subject is an account's external id, or the id of an account that has no
  external id (an account bound to an external subject is never found by its
  internal id).
* A session token (the edge's ``kiln_session`` cookie, from SignIn) is looked up by its
  SHA-256 hash with its user and account (:mod:`services.billing.sessions`): an expired,
  signed-out or revoked session, or a disabled user, is refused.
* A disabled account (``kiln admin account disable``) is refused whatever the
  credential, in the same transaction that would hold its credits.

Every failure is ``authentication_error`` with the contract's message; for
JWTs and disabled accounts the reason is appended.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.billing.ledger import AccountFinder, AccountRecord, Ledger, api_key_finder, subject_finder
from services.billing.sessions import session_finder
from services.common.errors import AUTHENTICATION_MESSAGE, AuthenticationFailed
from services.common.settings import Settings

#: Longest credential accepted (a guard against abuse, far above any real token).
MAX_CREDENTIAL_CHARS = 8192
#: Shortest HS256 secret accepted, in bytes (the size of the SHA-256 output).
MIN_HS256_SECRET_BYTES = 32


def _failed(reason: str) -> AuthenticationFailed:
    return AuthenticationFailed(f"{AUTHENTICATION_MESSAGE} ({reason})")


def is_jwt(value: str) -> bool:
    """A bearer value with two dots is a JWT; anything else is an API key."""
    return value.count(".") == 2


def load_public_key(pem: bytes, *, source: str = "public key") -> tuple[str, Any]:
    """(algorithm, key) for a PEM public key: RSA -> RS256, EC P-256 -> ES256."""
    key = load_pem_public_key(pem)
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256", key
    raise ValueError(f"{source}: only RSA and EC P-256 public keys are supported for JWTs")


class Authenticator:
    """Turns a presented credential into an account."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        hs256_secret: str | None = None,
        public_keys: Iterable[bytes] = (),
        audience: str | None = None,
        issuer: str | None = None,
        leeway_seconds: float = 0,
        max_lifetime_seconds: float = 24 * 3600,
        require_audience: bool = True,
        require_issuer: bool = True,
    ) -> None:
        self.ledger = ledger
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = leeway_seconds
        self.max_lifetime = max_lifetime_seconds
        self._keys: dict[str, list[Any]] = {}
        if hs256_secret:
            if len(hs256_secret.encode()) < MIN_HS256_SECRET_BYTES:
                raise ValueError(
                    f"the HS256 secret for JWTs must be at least {MIN_HS256_SECRET_BYTES} bytes long"
                )
            self._keys["HS256"] = [hs256_secret.encode()]
        for index, pem in enumerate(public_keys):
            alg, key = load_public_key(pem, source=f"JWT public key #{index + 1}")
            self._keys.setdefault(alg, []).append(key)
        if self._keys:
            missing = [
                (claim, name)
                for claim, name, value, required in (
                    ("an audience", "AUDIENCE", self.audience, require_audience),
                    ("an issuer", "ISSUER", self.issuer, require_issuer),
                )
                if required and value is None
            ]
            if missing:
                claims = " and ".join(f"{claim} (KILN_JWT_{name})" for claim, name in missing)
                turn_off = " / ".join(f"KILN_JWT_REQUIRE_{name}=false" for _, name in missing)
                raise ValueError(
                    f"JWT authentication is enabled but {claims} {'are' if len(missing) > 1 else 'is'} "
                    f"not configured; configure {'them' if len(missing) > 1 else 'it'}, or accept "
                    f"tokens without that check explicitly with {turn_off}"
                )

    @classmethod
    def from_settings(cls, ledger: Ledger, settings: Settings) -> Authenticator:
        secret = settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret else None
        return cls(
            ledger,
            hs256_secret=secret,
            public_keys=[Path(path).expanduser().read_bytes() for path in settings.jwt_public_keys],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway_seconds=settings.jwt_leeway_seconds,
            max_lifetime_seconds=settings.jwt_max_lifetime_seconds,
            require_audience=settings.jwt_require_audience,
            require_issuer=settings.jwt_require_issuer,
        )

    @property
    def algorithms(self) -> list[str]:
        """The JWT algorithms accepted (those with a configured key)."""
        return sorted(self._keys)

    async def authenticate(
        self,
        *,
        api_key: str | None = None,
        bearer_token: str | None = None,
        session_token: str | None = None,
    ) -> AccountRecord:
        """The account of an ``X-API-Key`` value, a ``Bearer`` value or a session token."""
        return await self.ledger.find_account(
            self.finder(api_key=api_key, bearer_token=bearer_token, session_token=session_token)
        )

    def finder(
        self,
        *,
        api_key: str | None = None,
        bearer_token: str | None = None,
        session_token: str | None = None,
    ) -> AccountFinder:
        """Checks what can be checked without the database (a JWT's signature and claims)
        and returns the in-transaction lookup of the account, so that billing can find,
        price and hold in one transaction."""
        if api_key is not None:
            return self._api_key_finder(api_key)
        if session_token is not None:
            return session_finder(session_token.strip(), self.ledger.now_ms())
        if bearer_token is not None:
            token = bearer_token.strip()
            if is_jwt(token):
                claims = self.verify_jwt(token)
                return subject_finder(claims["sub"], lambda: _failed("unknown subject"))
            return self._api_key_finder(token)
        raise AuthenticationFailed()

    @staticmethod
    def _api_key_finder(key: str) -> AccountFinder:
        if not key or len(key) > MAX_CREDENTIAL_CHARS:
            raise AuthenticationFailed()
        return api_key_finder(key)

    async def account_for_api_key(self, key: str) -> AccountRecord:
        return await self.ledger.find_account(self._api_key_finder(key))

    async def account_for_jwt(self, token: str) -> AccountRecord:
        return await self.ledger.find_account(self.finder(bearer_token=token))

    def verify_jwt(self, token: str) -> dict[str, Any]:
        """The verified claims of a JWT; AuthenticationFailed with the reason otherwise."""
        if len(token) > MAX_CREDENTIAL_CHARS:
            raise _failed("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _failed("malformed token") from None
        alg = header.get("alg")
        keys = self._keys.get(alg) if isinstance(alg, str) else None
        if not keys or not isinstance(alg, str):
            raise _failed(f"algorithm {alg!r} is not accepted")
        required = ["exp", "sub"]
        required += ["aud"] if self.audience is not None else []
        required += ["iss"] if self.issuer is not None else []
        options: dict[str, Any] = {
            "require": required,
            "verify_aud": self.audience is not None,
            "verify_iss": self.issuer is not None,
        }
        for key in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options=options,  # type: ignore[arg-type]
                )
            except jwt.InvalidSignatureError:
                continue  # maybe another configured key of this algorithm
            except jwt.ExpiredSignatureError:
                raise _failed("token expired") from None
            except jwt.ImmatureSignatureError:
                raise _failed("token not yet valid") from None
            except jwt.InvalidAudienceError:
                raise _failed("wrong audience") from None
            except jwt.InvalidIssuerError:
                raise _failed("wrong issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise _failed(f"missing claim '{exc.claim}'") from None
            except jwt.PyJWTError:
                raise _failed("invalid token") from None
            sub = claims.get("sub")
            if not isinstance(sub, str) or not sub:
                raise _failed("invalid subject")
            issued = claims.get("iat")
            start = (
                issued if isinstance(issued, int | float) and not isinstance(issued, bool) else time.time()
            )
            if float(claims["exp"]) - float(start) > self.max_lifetime + self.leeway:
                raise _failed("token lifetime too long")
            return claims
        raise _failed("bad signature")
