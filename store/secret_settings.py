"""Secrets for Settings: `RIGL_<NAME>_FILE` variables, passwords put into URLs, placeholders refused.

Why: a password in an environment variable or a URL shows in `docker inspect`, and one on a command line
in every `ps` of the host. docker-compose.yml hands the stack's passwords over as files (compose
`secrets:`, mounted under /run/secrets) and names them in `RIGL_DATABASE_PASSWORD_FILE`,
`RIGL_BROKER_PASSWORD_FILE` and `RIGL_METRICS_TOKEN_FILE`; any setting can be read that way.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic_settings import PydanticBaseSettingsSource

PLACEHOLDER_PREFIXES = ("change-me", "changeme", "change_me")  # what example files ship instead of a secret


class SecretFiles(PydanticBaseSettingsSource):
    """`RIGL_<NAME>_FILE=path`: the setting's value is that file's text, without its final line break.
    A file that is missing, unreadable or empty, or `RIGL_<NAME>` set as well, is a ValueError naming
    the variable (a secret that silently fell back to a default would start a service without it)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ reads every field at once
        return None, field_name, False

    def __call__(self) -> dict[str, str]:
        environ = {key.upper(): value for key, value in os.environ.items()}
        values = {}
        for name in self.settings_cls.model_fields:
            variable = f"RIGL_{name.upper()}"
            path = environ.get(f"{variable}_FILE")
            if not path:
                continue
            if variable in environ:
                raise ValueError(f"{variable} and {variable}_FILE are both set: keep one")
            try:
                text = Path(path).read_text()
            except OSError as error:
                raise ValueError(f"{variable}_FILE: cannot read {path} ({error.strerror or error})") from None
            value = text.rstrip("\r\n")
            if not value.strip():
                raise ValueError(f"{variable}_FILE: {path} is empty")
            values[name] = value
        return values


def is_placeholder(secret: str | None) -> bool:
    """A `change-me…` value: what an example file holds, known to everyone who read it."""
    return bool(secret) and secret.strip().lower().startswith(PLACEHOLDER_PREFIXES)


def refuse_placeholder(variable: str, secret: str | None) -> None:
    if is_placeholder(secret):
        raise ValueError(f"{variable}: a `change-me…` placeholder is not a secret; generate the stack's secrets "
                         "with `sh docker/make-secrets.sh` (docs: operations/compose)")


def url_password(url: str) -> str | None:
    """The password in a database or broker URL (None when it has none), percent-decoded."""
    password = urlsplit(url).password
    return None if password is None else unquote(password)


def with_password(url: str, password: str) -> str:
    """`url` with `password` for its user (percent-encoded), replacing any it had: `redis://redis:6379/0`
    → `redis://:<password>@redis:6379/0`, `postgresql+psycopg://rigl@postgres/rigl` → `…rigl:<password>@…`."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("has no host to log in to")
    user = parts.netloc.rpartition("@")[0].partition(":")[0] if "@" in parts.netloc else ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def without_password(url: str) -> str:
    """`url` with any password removed (the user kept): what may travel to another process, which adds the
    password from its own RIGL_<NAME>_PASSWORD(_FILE)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}@{host}"))
