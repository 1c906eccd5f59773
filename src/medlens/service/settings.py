"""Service settings: ``MEDLENS_*`` environment variables over an optional settings file over defaults.

Every setting has a file key (``max_upload_bytes``) and an environment variable (``MEDLENS_MAX_UPLOAD_BYTES``).
``MEDLENS_SETTINGS`` names a YAML (``.yaml`` / ``.yml``) or TOML (``.toml``) file with a flat mapping of file
keys; a key the service does not know is an error that names the file and the key (a typo must not silently
leave a limit at its default). Values given to :meth:`ServiceSettings.load` by the caller (the CLI's options)
win over both.

The audit hash key keys the HMACs that replace patient identifiers in the audit trail. It comes from
``MEDLENS_AUDIT_KEY`` / ``audit_key``, or else from a key file (``audit_key_file``; by default ``audit.key``
next to the SQLite database, or in the run directory), generated on first start with 0600 permissions so the
hashes stay the same across restarts: the same patient keeps the same pseudonym.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medlens import rundir
from medlens.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "MEDLENS_"
SETTINGS_ENV = "MEDLENS_SETTINGS"
KEY_FILE_NAME = "audit.key"
DB_FILE_NAME = rundir.AUDIT_DB
MIN_KEY_CHARS = 16


def _cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the service reads from its environment. Build it with :meth:`load`."""

    database_url: str
    audit_key: bytes = field(repr=False)  # never logged or printed
    max_upload_bytes: int = 20 * 1024 * 1024  # 20 MiB
    max_image_pixels: int = 50_000_000  # decompression-bomb guard: width x height of a decoded image
    # memory budget of the decodes in flight (estimated from the image headers; one image over it is 413)
    max_decode_bytes: int = 384 * 1024 * 1024
    max_concurrent_decodes: int = field(default_factory=_cpus)  # decodes at once (default: one a core)
    request_timeout_s: float = 30.0
    rate_limit_per_minute: int = 120  # per API key; 0 turns the limit off
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are listed
    batch_max_size: int = 16  # micro-batching: most images per model call
    batch_max_wait_ms: float = 5.0  # micro-batching: longest wait for a batch to fill
    # database connections a server process keeps open (as many again for a burst): with PostgreSQL, N processes
    # (--workers N) open up to N x 2 x this, which must stay under the server's max_connections (default 100)
    db_pool_size: int = 16
    # clients without a valid API key, per IP address (medlens.service.limits): a token bucket (0 turns it off)
    anonymous_rate_per_minute: int = 60
    anonymous_burst: int = 30
    anonymous_audit_sample: int = 5  # own audit rows per IP a minute; the rest: one summary row per IP a minute
    trusted_proxies: tuple[str, ...] = ()  # addresses whose X-Forwarded-For is believed (none by default)
    # slow clients (medlens.service.transport, medlens.service.limits)
    header_timeout_s: float = 10.0  # a request's headers must be complete this long after it starts
    body_timeout_s: float = 10.0  # a body must arrive within this, plus 1 s per body_min_rate bytes
    body_min_rate: int = 10_000  # bytes a second that extend the body deadline (a slow, honest upload)
    audit_key_file: Path | None = None  # where the key was read from; None when given as a value
    # the DICOM node's spool (`medlens dicom listen --spool`), where the API finds a node prediction's SR;
    # None: RUN/dicom-spool, the node's default
    dicom_spool: Path | None = None

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike | None = None,
        *,
        database: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ServiceSettings:
        """Settings from (highest first) ``database``, the environment, the ``MEDLENS_SETTINGS`` file, defaults.

        ``run_dir`` is the served run directory: the database defaults to ``sqlite:///RUN/audit.db``.
        ``database`` is a URL or a path to a SQLite file (a directory means ``DIR/audit.db``).
        ``env`` defaults to ``os.environ``. Raises :class:`ConfigError` for a bad file, key or value.
        """
        values = read_settings(env)
        if database is not None:
            values["database_url"] = database_url(database)
        if "database_url" not in values:
            if run_dir is None:
                raise ConfigError(
                    "no audit database configured",
                    hint=f"set {ENV_PREFIX}DATABASE_URL (a SQLAlchemy URL or a SQLite file path) or "
                         "database_url in the settings file",
                )
            values["database_url"] = database_url(Path(run_dir) / DB_FILE_NAME)
        if "audit_key" in values:
            values["audit_key"] = values["audit_key"].encode("utf-8")
        else:
            key_file = values.get("audit_key_file") or default_key_file(values["database_url"], run_dir)
            values["audit_key_file"] = key_file
            values["audit_key"] = load_or_create_key(key_file)
        return cls(**values)

    def public_dict(self) -> dict[str, Any]:
        """The settings without the secret key, JSON-ready (for start-up logs and the models endpoint)."""
        out = asdict(self)
        del out["audit_key"]
        out["database_url"] = redact_url(self.database_url)
        out["cors_origins"] = list(self.cors_origins)
        out["trusted_proxies"] = list(self.trusted_proxies)
        out["audit_key_file"] = None if self.audit_key_file is None else str(self.audit_key_file)
        out["dicom_spool"] = None if self.dicom_spool is None else str(self.dicom_spool)
        return out


# --------------------------------------------------------------------------------------------------- parsing


def _int(minimum: int) -> Callable[[Any, str], int]:
    def parse(value: Any, where: str) -> int:
        number: Any = value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)  # 50e6
                except ValueError:
                    number = None
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
            raise ConfigError(f"{where}: expected a whole number >= {minimum}, got {value!r}")
        return number

    return parse


def _float(minimum: float, *, strict: bool) -> Callable[[Any, str], float]:
    def parse(value: Any, where: str) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number != number or number < minimum or (strict and number == minimum):
            op = ">" if strict else ">="
            raise ConfigError(f"{where}: expected a number {op} {minimum:g}, got {value!r}")
        return number

    return parse


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _url(value: Any, where: str) -> str:
    return database_url(_text(value, where))


def _key(value: Any, where: str) -> str:
    text = _text(value, where)
    if len(text) < MIN_KEY_CHARS:
        raise ConfigError(f"{where}: the audit key is too short ({len(text)} characters)",
                          hint=f"use at least {MIN_KEY_CHARS} random characters, e.g. "
                               "`python -c 'import secrets; print(secrets.token_hex(32))'`")
    return text


def _path(value: Any, where: str) -> Path:
    return Path(_text(value, where)).expanduser()


def _origins(value: Any, where: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}: expected a list of origins (or a comma-separated string), got {value!r}")
    origins = tuple(i.strip().rstrip("/") for i in items if i.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: '{origin}' is not an origin",
                              hint="write origins as scheme://host[:port], e.g. https://pacs.example.org, or *")
    return origins


def _proxies(value: Any, where: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}: expected a list of IP addresses (or a comma-separated string), got {value!r}")
    return tuple(i.strip() for i in items if i.strip())


# file key -> parser(value, where); the environment variable is MEDLENS_ + the key in capitals
PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "database_url": _url,
    "audit_key": _key,
    "audit_key_file": _path,
    "max_upload_bytes": _int(1),
    "max_image_pixels": _int(1),
    "max_decode_bytes": _int(1024 * 1024),
    "max_concurrent_decodes": _int(1),
    "request_timeout_s": _float(0.0, strict=True),
    "rate_limit_per_minute": _int(0),
    "cors_origins": _origins,
    "batch_max_size": _int(1),
    "batch_max_wait_ms": _float(0.0, strict=False),
    "db_pool_size": _int(1),
    "anonymous_rate_per_minute": _int(0),
    "anonymous_burst": _int(1),
    "anonymous_audit_sample": _int(0),
    "trusted_proxies": _proxies,
    "header_timeout_s": _float(0.0, strict=True),
    "body_timeout_s": _float(0.0, strict=True),
    "body_min_rate": _int(1),
    "dicom_spool": _path,
}


def read_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given in the ``MEDLENS_SETTINGS`` file and the environment (environment wins), parsed.

    Only keys that were given appear in the result; defaults are the dataclass's.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    file = env.get(SETTINGS_ENV)
    if file:
        values.update(read_settings_file(file))
    for key, parse in PARSERS.items():
        name = ENV_PREFIX + key.upper()
        if env.get(name, "").strip():
            values[key] = parse(env[name], name)
    return values


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML or TOML settings file; unknown keys and bad values raise :class:`ConfigError`."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"settings file {path}: cannot be read ({exc.strerror or exc})",
                          hint=f"fix or unset {SETTINGS_ENV}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(f"settings file {path}: TOML needs Python >= 3.11",
                                  hint="write the settings as YAML (.yaml)") from None
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"settings file {path}: unknown format '{suffix or '(no suffix)'}'",
                              hint="use a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, tomllib.TOMLDecodeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"settings file {path}: cannot be parsed ({first})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path}: expected a mapping of settings, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in PARSERS:
            raise ConfigError(f"settings file {path}: unknown setting '{key}'",
                              hint=f"known settings: {', '.join(PARSERS)}")
        if key in ("database_url", "audit_key_file", "dicom_spool") and isinstance(value, str) and "://" not in value:
            value = str(path.parent / Path(value).expanduser())  # relative paths: relative to the file
        values[key] = PARSERS[key](value, f"settings file {path}: {key}")
    return values


# ----------------------------------------------------------------------------------------- database + key


def database_url(value: str | os.PathLike) -> str:
    """A SQLAlchemy URL as given, or a path made into a SQLite URL (a directory means ``DIR/audit.db``)."""
    text = os.fspath(value)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / DB_FILE_NAME
    return f"sqlite:///{path.resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL; None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite") or "://" not in url:
        return None
    rest = url.split("://", 1)[1]
    if not rest.startswith("/"):
        return None
    name = rest[1:].split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(name)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


def default_key_file(url: str, run_dir: str | os.PathLike | None) -> Path:
    """Where the generated audit key lives: beside the SQLite database, else in the run directory."""
    db = sqlite_path(url)
    if db is not None:
        return db.parent / KEY_FILE_NAME
    if run_dir is not None:
        return Path(run_dir) / KEY_FILE_NAME
    raise ConfigError(
        "no audit hash key: the database is not a SQLite file and there is no run directory to keep one in",
        hint=f"set {ENV_PREFIX}AUDIT_KEY (>= {MIN_KEY_CHARS} random characters) or {ENV_PREFIX}AUDIT_KEY_FILE",
    )


def load_or_create_key(path: str | os.PathLike) -> bytes:
    """The key stored in ``path``; if there is none, a new random one written there with 0600 permissions.

    Creation is atomic (a complete temporary file is hard-linked into place), so two processes starting at
    once end up with the same key.
    """
    path = Path(path).expanduser()
    if not path.exists():
        try:
            _create_key_file(path)
        except OSError as exc:
            raise ConfigError(f"audit key file {path}: cannot be created ({exc.strerror or exc})",
                              hint=f"make the folder writable, or set {ENV_PREFIX}AUDIT_KEY") from exc
        log.info("generated a new audit hash key in %s", path)
    try:
        text = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"audit key file {path}: cannot be read ({exc})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("audit key file %s can be read by other users (mode %o): chmod 600 it",
                    path, stat.S_IMODE(mode))
    return _key(text, f"audit key file {path}").encode("utf-8")


def private_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) with mode 0700 if missing; warn if it exists and any user can write in
    it (they could replace the audit database or its key) without the sticky bit."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = folder.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        log.warning("folder %s is writable by every user (mode %o): keep the audit database and its key in a "
                    "folder only the service can write (chmod 700 it)", folder, stat.S_IMODE(mode))


def _create_key_file(path: Path) -> None:
    private_folder(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process won the race: then its key is the key
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a plain rename (last writer wins a tie)
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
