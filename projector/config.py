"""The configuration: one YAML file, ``${ENV}`` interpolation, validated at start.

Every error names the key (``projections[1].max_seq_jump``) and what to do about it. Secrets
(``postgres.dsn``, ``redis.url``, SASL passwords in ``kafka.consumer``) are ``SecretStr`` or
redacted so they never reach a log line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from projector.core.correlate import BusinessRule, CorrelationRules, Part
from projector.core.decode import load_decoder


class ConfigError(Exception):
    """A configuration problem, worded for the person who has to fix it."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``"30s"``, ``"5m"``, ``"250ms"``, ``"1h"`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 250ms")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration; write e.g. 30s, 5m, 250ms, 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
_NAME = r"^[a-z_][a-z0-9_]{0,47}$"
Name = Annotated[str, Field(pattern=_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Strict):
    bootstrap_servers: str
    group_prefix: str = "projector"
    # Static group membership id, stable across restarts (a StatefulSet pod name). Unset: the
    # host name plus a slot number held by a lock file, so instances on one host differ.
    instance_id: str | None = None
    # Kept out of repr/str: they may hold SASL passwords.
    consumer: dict[str, str | int | float | bool] = Field(default_factory=dict, repr=False)
    producer: dict[str, str | int | float | bool] = Field(default_factory=dict, repr=False)


class PostgresConfig(_Strict):
    dsn: SecretStr
    # The migrator role's connection, for `migrate` and `rebuild` (DDL); unset: dsn. With it,
    # migrate grants dsn's role only row rights on projector's tables and the views.
    migrate_dsn: SecretStr | None = Field(None, repr=False)
    schema_: Name = Field("projector", alias="schema")
    connect_timeout: Duration = 10.0
    # The server ends a daemon's session whose transaction waits this long for its client (a
    # frozen or partitioned instance): its locks go, so the partitions' new owner goes on.
    idle_in_transaction_timeout: Duration = Field(30.0, gt=0)

    @field_validator("dsn", "migrate_dsn")
    @classmethod
    def _readable_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        # libpq's own message quotes the part it could not read, which may be the password:
        # it must not reach a log, so the reason is given without it.
        if value is not None:
            try:
                conninfo_to_dict(value.get_secret_value())
            except psycopg.ProgrammingError:
                raise ValueError(
                    "is not a connection string libpq can read: percent-encode special"
                    " characters in a URL's password ('%' as %25), or quote a key=value"
                    " password that holds spaces ('pass word')"
                ) from None
        return value

    @property
    def migrator_dsn(self) -> str:
        return (self.migrate_dsn or self.dsn).get_secret_value()


_REDIS_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _redis_prefix(value: str) -> str:
    if not _REDIS_PREFIX.match(value):
        raise ValueError(
            f"{value!r} is not a key prefix: write 1 to 64 letters, digits, '_', '.' or '-'"
            " (no ':', projector adds it)"
        )
    return value


def _redis_url(value: SecretStr) -> SecretStr:
    # The message must not quote the URL: it may hold the password.
    if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            "expected a URL such as redis://:password@host:6379/0 (rediss:// for TLS,"
            " unix:///path/to/redis.sock for a socket)"
        )
    return value


class RedisConfig(_Strict):
    """The Redis server of the projections with ``store: redis``."""

    # redis://[user:password@]host:port/db or rediss:// (TLS). Its password is never logged.
    url: Annotated[SecretStr, AfterValidator(_redis_url)]
    # Every key projector writes (views, positions, checkpoints) starts with "<prefix>:".
    prefix: Annotated[str, AfterValidator(_redis_prefix)] = "projector"
    # True: the views may be lost (rebuilt from Kafka after a Redis restart), so the start-up
    # check only warns about a Redis without persistence or with eviction instead of refusing.
    disposable: bool = False
    connect_timeout: Duration = 10.0


class DecoderConfig(BaseModel):
    """``kind`` (json, debezium, or ``package.module:Factory``) and that decoder's options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = "json"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _decoder_accepts_options(self) -> DecoderConfig:
        load_decoder(self.kind, self.options)
        return self


class MergeConfig(_Strict):
    """Merge mode: how deletions are told, and the built-in view."""

    # Event types that delete the whole document (Debezium's op d decodes to "delete").
    delete_types: list[str] = Field(default_factory=lambda: ["delete"])
    # A data field listing removed field paths ("a.b" or ["a", "b"]); null: none.
    removed_field: str | None = "$removed"
    # With no handlers, the built-in one keeps each document as JSONB in this table of the
    # view schema: (id text primary key, doc jsonb, updated_at timestamptz).
    view_table: Name | None = None
    # Deletion tombstones of a document unchanged for this long are forgotten (a deleted
    # document's state goes entirely). After that, a write older than the delete arriving
    # late could bring the data back: set it well above the longest delivery delay. null: keep.
    tombstone_retention: Duration | None = 7 * 86400.0


class ReplayConfig(_Strict):
    """Where replay requests for gaps go. ``none``: gaps wait (and alert) without asking."""

    channel: Literal["none", "kafka", "http"] = "none"
    topic: str | None = None  # kafka: the request topic
    url: str | None = None  # http: the endpoint that gets a POST per request
    timeout: Duration = 5.0
    # Requests are re-sent at exponentially growing intervals (gap_timeout, 2x, 4x ...) up to this.
    max_interval: Duration = 600.0

    @model_validator(mode="after")
    def _channel_target(self) -> ReplayConfig:
        if self.channel == "kafka" and not self.topic:
            raise ValueError("channel kafka needs topic: the topic replay requests go to")
        if self.channel == "http" and not self.url:
            raise ValueError("channel http needs url: the endpoint replay requests are POSTed to")
        return self


def _handler_path(value: str) -> str:
    if not re.match(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$", value):
        raise ValueError(f"{value!r} is not a module path; write e.g. handlers.customers")
    return value


def _rule_path(value: str) -> str:
    if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value):
        raise ValueError(
            f"{value!r} is not a module path; write e.g."
            " handlers.school_correlation:name_business_events"
        )
    return value


class CorrelationPartConfig(_Strict):
    """A part given in full: its source (a Debezium ``schema.table``, or a topic) and its own
    key path (default: ``correlation.key``)."""

    source: str = Field(min_length=1)
    key: str | None = None


class OutboxConfig(_Strict):
    """``correlation.outbox``: business events queued in the batch transaction and published
    to ``topic`` at least once, each with its stable id (docs/correlation.md, section 7)."""

    topic: str = Field(min_length=1)
    # The Kafka message key: the event's stream (one student's events keep their order) or id.
    key: Literal["stream", "id"] = "stream"
    # Published rows are kept this long, so a business event closed again is not re-queued.
    retention: Duration = 7 * 86400.0
    max_batch: int = Field(500, gt=0, le=100_000)  # rows per publishing round


class CorrelationConfig(_Strict):
    """A correlation step (docs/correlation.md): which events belong together (one source
    transaction, or a field) and the rule that names the business event they make."""

    # "module:function" returning the business events of a closed window's parts.
    rule: Annotated[str, AfterValidator(_rule_path)]
    window: Duration  # event time; must be positive (checked with the other rules)
    name: Name | None = None  # default: the projection's name (prefix of ids and streams)
    topics: list[str] | None = None  # default: every topic of the projection
    part_by: Literal["table", "topic"] = "table"
    parts: dict[str, str | CorrelationPartConfig] = Field(default_factory=dict)
    key: str = "meta.tx_id"
    time: str = "meta.ts_ms"
    # Default: true when one of `topics` has the Debezium decoder and ends in ".transaction".
    transaction_metadata: bool | None = None
    complete_when: list[str] | None = None
    lateness: Duration = 0.0
    idle_after: Duration | None = 30.0
    closed_retention: Duration = 7 * 86400.0
    # Publish the business events to a Kafka topic (at least once, with their stable id).
    outbox: OutboxConfig | None = None

    def part_list(self) -> list[tuple[str, str, str | None]]:
        """(name, source, key path or None) per configured part."""
        return [
            (name, p, None) if isinstance(p, str) else (name, p.source, p.key)
            for name, p in self.parts.items()
        ]


class ProjectionConfig(_Strict):
    name: Name
    topics: list[str] = Field(min_length=1)
    mode: Literal["sequence", "merge"] = "sequence"
    store: Literal["postgres", "redis"] = "postgres"
    view_schema: Name | None = None
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    decoders: dict[str, DecoderConfig] = Field(default_factory=dict)
    merge: MergeConfig = MergeConfig()
    # Unset in merge mode with merge.view_table: the built-in JSONB document view.
    handlers: list[Annotated[str, AfterValidator(_handler_path)]] = Field(default_factory=list)
    first_seq: int = 1
    max_seq_jump: int = Field(100_000, gt=0)
    batch_max_messages: int = Field(2000, gt=0, le=100_000)
    poll_timeout: Duration = 0.1
    # Kafka consumers of this projection in one process (members of its group, each with its
    # own store connection): one applies while another waits on the store.
    consumers: int = Field(1, gt=0, le=16)
    gap_timeout: Duration = Field(30.0, gt=0)
    # After this long a gap is given up on, and on_give_up decides: hold (keep waiting, stay
    # visible), skip (step over it, record the range) or fail (stop the projection). Unset: never.
    give_up_after: Duration | None = None
    on_give_up: Literal["hold", "skip", "fail"] = "hold"
    replay: ReplayConfig = ReplayConfig()
    # A topic the write side re-publishes requested events on; consumed too, never paused.
    replay_topic: str | None = None
    # Parked events allowed for the projection; at the bound its source partitions pause.
    max_parked: int = Field(100_000, gt=0)
    # Business events from correlated events (docs/correlation.md); merge mode, PostgreSQL.
    correlation: CorrelationConfig | None = None

    @field_validator("handlers")
    @classmethod
    def _some_handler(cls, value: list[str], info: ValidationInfo) -> list[str]:
        merge = info.data.get("merge")
        if not value and not (info.data.get("mode") == "merge" and merge and merge.view_table):
            raise ValueError(
                "name at least one handler module, or in merge mode set merge.view_table for"
                " the built-in JSONB view"
            )
        return value

    @property
    def schema_name(self) -> str:
        return self.view_schema or self.name

    @property
    def consumed_topics(self) -> list[str]:
        """The source topics, then the replay topic if there is one."""
        extra = (
            [self.replay_topic]
            if self.replay_topic and self.replay_topic not in self.topics
            else []
        )
        return [*self.topics, *extra]

    def decoder_for(self, topic: str) -> DecoderConfig:
        return self.decoders.get(topic, self.decoder)

    @model_validator(mode="after")
    def _consistent(self) -> ProjectionConfig:
        if len(set(self.topics)) != len(self.topics):
            raise ValueError("topics lists a topic twice")
        unknown = set(self.decoders) - set(self.consumed_topics)
        if unknown:
            raise ValueError(f"decoders names topics not in topics: {sorted(unknown)}")
        if self.store == "redis" and self.merge.view_table:
            raise ValueError(
                "merge.view_table is the built-in PostgreSQL JSONB view; with store: redis name"
                " a handler module with handle_documents(changes, view) instead"
            )
        if self.mode == "sequence":
            for topic in self.consumed_topics:
                dec = self.decoder_for(topic)
                if dec.kind == "json" and not dec.options.get("seq"):
                    raise ValueError(
                        f"sequence mode needs a seq path: set decoder.seq (topic {topic!r})"
                    )
                if dec.kind == "debezium":
                    raise ValueError(
                        "Debezium events carry no contiguous sequence: use mode: merge"
                    )
        if self.correlation is not None:
            problems = self._correlation_problems(self.correlation)
            problems += self._outbox_problems(self.correlation)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    @property
    def correlation_topics(self) -> list[str]:
        """The topics whose events the correlation takes (empty without a correlation)."""
        if self.correlation is None:
            return []
        return list(self.correlation.topics or self.topics)

    @property
    def transaction_metadata(self) -> bool:
        """Whether the correlation reads Debezium's transaction topic (its END records decide
        when a transaction is complete): as configured, else whether one of its topics has the
        Debezium decoder and a name ending in ".transaction"."""
        c = self.correlation
        if c is None:
            return False
        if c.transaction_metadata is not None:
            return c.transaction_metadata
        return any(
            t.endswith(".transaction") and self.decoder_for(t).kind == "debezium"
            for t in self.correlation_topics
        )

    def _outbox_problems(self, c: CorrelationConfig) -> list[str]:
        if c.outbox is None:
            return []
        problems: list[str] = []
        if c.outbox.topic in self.consumed_topics:
            problems.append(
                f"correlation.outbox.topic must not be one of the projection's topics"
                f" ({c.outbox.topic!r}): the projection would read its own business events"
            )
        return problems

    def _correlation_problems(self, c: CorrelationConfig) -> list[str]:
        problems: list[str] = []
        if self.mode != "merge":
            problems.append(
                "correlation is supported in merge mode only for now: set mode: merge (CDC"
                " streams are merge projections), or remove correlation"
            )
        unknown = sorted(set(c.topics or ()) - set(self.topics))
        if unknown:
            problems.append(f"correlation.topics names topics not in topics: {unknown}")
        if c.transaction_metadata and not any(
            self.decoder_for(t).kind == "debezium" for t in self.correlation_topics
        ):
            problems.append(
                "correlation.transaction_metadata is on but no topic in correlation.topics has"
                " the Debezium decoder"
            )
        if not problems:
            problems = correlation_rule_problems(self)
        return problems


def correlation_rule_problems(projection: ProjectionConfig) -> list[str]:
    """The core's own checks of a projection's correlation (its messages name the keys)."""
    try:
        correlation_rules(projection, lambda parts: None)
    except ValueError as exc:
        return [str(exc)]
    return []


def correlation_rules(projection: ProjectionConfig, rule: BusinessRule) -> CorrelationRules:
    """The core's ``CorrelationRules`` of a projection's correlation, with its loaded ``rule``;
    durations become event-time milliseconds. ``ValueError`` naming the key."""
    c = projection.correlation
    if c is None:
        raise ValueError(f"projection {projection.name!r} has no correlation")
    return CorrelationRules(
        window=_ms(c.window),
        parts=tuple(Part(name, source, key) for name, source, key in c.part_list()),
        rule=rule,
        name=c.name or projection.name,
        part_by=c.part_by,
        key=c.key,
        time=c.time,
        transaction_metadata=projection.transaction_metadata,
        complete_when=None if c.complete_when is None else frozenset(c.complete_when),
        closed_retention=_ms(c.closed_retention),
    )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class MetricsConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535)
    # /healthz turns 503 when a projection's poll loop has not gone round for this long.
    stall_after: Duration = Field(60.0, gt=0)
    # /readyz: every assigned partition within this many messages of its end, and no gap
    # older than ready_max_gap_age (unset: gaps do not affect readiness).
    ready_max_lag: int = Field(1000, ge=0)
    ready_max_gap_age: Duration | None = 300.0


class LogConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Config(_Strict):
    kafka: KafkaConfig
    # Each section is needed only when a projection has that store (postgres is the default).
    postgres: PostgresConfig | None = None
    redis: RedisConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    projections: list[ProjectionConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Config:
        for what, values in (
            ("name", [p.name for p in self.projections]),
            ("view_schema", [p.schema_name for p in self.projections]),
        ):
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                raise ValueError(f"two projections share the {what} {sorted(dup)}")
        return self

    @model_validator(mode="after")
    def _stores(self) -> Config:
        for i, p in enumerate(self.projections):
            where = f"projections[{i}] ({p.name!r})"
            if p.store == "redis" and self.redis is None:
                raise ValueError(
                    f"{where} has store: redis but there is no redis section: add redis.url"
                )
            if p.store == "postgres" and self.postgres is None:
                raise ValueError(
                    f"{where} has store: postgres but there is no postgres section:"
                    " add postgres.dsn (or set the projection's store: redis)"
                )
            if (
                p.store == "postgres"
                and self.postgres is not None
                and p.schema_name == self.postgres.schema_
            ):
                raise ValueError(
                    f"{where} would keep its views in schema {p.schema_name!r}, which is"
                    " postgres.schema (projector's own tables): set its view_schema"
                )
        return self

    def postgres_config(self) -> PostgresConfig:
        """The postgres section; ConfigError if the config has none."""
        if self.postgres is None:
            raise ConfigError(
                "the config has no postgres section, and this needs PostgreSQL: add postgres.dsn"
            )
        return self.postgres

    def redis_config(self) -> RedisConfig:
        """The redis section; ConfigError if the config has none."""
        if self.redis is None:
            raise ConfigError(
                "the config has no redis section, and this needs Redis: add redis.url"
            )
        return self.redis

    def projection(self, name: str) -> ProjectionConfig:
        for p in self.projections:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.projections)
        raise ConfigError(f"no projection named {name!r} in the config (known: {known})")


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of the parsed YAML."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{path}: environment variable {name} is not set (set it, or write ${{{name}:-default}})"
        )

    return _ENV_REF.sub(substitute, value)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.startswith(("function-", "literal[", "str", "int", "float", "bool")):
            out += f".{part}" if out else part
    return out or "(top level)"


def parse_config(data: Any, env: Mapping[str, str] | None = None, origin: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    data = interpolate(data, os.environ if env is None else env)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"{origin}: {len(exc.errors())} problem(s):"]
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_loc(err['loc'])}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    try:
        return parse_config(data, env, origin=str(p))
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(str(p)) else f"{p}: {message}") from None


def redact(dsn: str) -> str:
    """A DSN or URL with its password replaced, for logs and messages (postgresql://,
    redis://, rediss://: ``user:password@`` or ``:password@``, or ``password=``)."""
    # Up to the last "@" before the path, as redis-py (urllib) reads it: a password with an
    # unencoded "@", "?" or "#" (libpq takes those too) is hidden whole.
    dsn = re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", dsn)
    dsn = re.sub(r"([?&]password=)[^&]*", r"\1***", dsn)
    return re.sub(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", dsn)
