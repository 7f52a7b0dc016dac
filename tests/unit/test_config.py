"""The configuration: the example file, ``${ENV}`` interpolation, validation messages that name
the key, durations, and secrets kept out of reprs and messages (pure: no services)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from projector.config import (
    Config,
    ConfigError,
    CorrelationConfig,
    CorrelationPartConfig,
    KafkaConfig,
    LogConfig,
    MetricsConfig,
    OutboxConfig,
    PostgresConfig,
    ProjectionConfig,
    RedisConfig,
    ReplayConfig,
    correlation_rules,
    load_config,
    parse_config,
    parse_duration,
    redact,
)
from projector.runner.worker import load_handlers
from tests.conftest import ROOT

EXAMPLE = ROOT / "config.example.yaml"
SECRET = "s3cr3t-Pa55"

BASE: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "kafka:9092"},
    "postgres": {"dsn": "postgresql://app@db/app"},
    "projections": [
        {
            "name": "accounts",
            "topics": ["accounts"],
            "handlers": ["handlers.accounts"],
            "decoder": {"kind": "json", "stream": "stream", "seq": "seq"},
        }
    ],
}


def config_with(change: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    """A deep copy of ``BASE`` after ``change`` edited it in place."""
    data = copy.deepcopy(BASE)
    if change is not None:
        change(data)
    return data


def first(data: dict[str, Any]) -> dict[str, Any]:
    projection: dict[str, Any] = data["projections"][0]
    return projection


def with_redis(d: dict[str, Any]) -> None:
    """Adds a redis section and a second projection, ``scores``, kept in Redis."""
    d["redis"] = {"url": f"redis://:{SECRET}@cache:6379/0"}
    d["projections"].append({**copy.deepcopy(first(d)), "name": "scores", "store": "redis"})


def redis_with(**settings: object) -> Callable[[dict[str, Any]], None]:
    """A change for ``config_with``: ``with_redis``, then these redis settings."""

    def change(d: dict[str, Any]) -> None:
        with_redis(d)
        d["redis"].update(settings)

    return change


def uncommented(text: str, first_line: str) -> str:
    """``text`` with the commented-out block that starts at the line ``first_line`` made live:
    that line and the lines after it that start with its indentation and ``#`` lose the
    ``# `` (a nested comment ``#   # note`` stays a comment)."""
    lines = text.splitlines()
    start = lines.index(first_line)
    indent = first_line[: len(first_line) - len(first_line.lstrip())]
    end = start
    while end < len(lines) and lines[end].startswith(indent + "#"):
        rest = lines[end][len(indent) + 1 :]
        lines[end] = indent + rest.removeprefix(" ")
        end += 1
    return "\n".join(lines) + "\n"


def example_with_redis() -> str:
    """config.example.yaml with its commented redis section and Redis projection made live."""
    text = uncommented(EXAMPLE.read_text(), "# redis:")
    return uncommented(text, "  # - name: scores")


def error_of(data: Any, env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={} if env is None else env)
    return str(info.value)


# --- the example file -------------------------------------------------------------------------


def test_example_config_parses_with_an_empty_environment() -> None:
    """Proves config.example.yaml is valid as shipped: with no variable set, every
    ``${VAR:-default}`` takes its default, and the result is what the file says."""
    config = load_config(EXAMPLE, env={})

    assert config.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert config.kafka.group_prefix == "projector"
    assert config.kafka.instance_id is None
    assert config.kafka.consumer == {}
    assert config.kafka.producer == {}
    assert (
        config.postgres_config().dsn.get_secret_value()
        == "postgresql://projector@127.0.0.1:15432/projector"
    )
    assert config.postgres_config().schema_ == "projector"
    assert config.postgres_config().connect_timeout == 10.0
    assert (config.metrics.enabled, config.metrics.host, config.metrics.port) == (
        True,
        "127.0.0.1",
        9400,
    )
    assert (config.log.level, config.log.format) == ("INFO", "text")

    assert [p.name for p in config.projections] == [
        "accounts",
        "customers",
        "games",
        "profiles",
        "school",
    ]
    accounts, customers, games, profiles, _school = config.projections
    assert (profiles.mode, profiles.handlers, profiles.merge.view_table) == (
        "merge",
        [],
        "profiles",
    )
    assert profiles.topics == ["profiles-nlp", "profiles-cv"]
    assert accounts.topics == ["accounts"]
    assert accounts.mode == "sequence"
    assert accounts.store == "postgres"
    assert accounts.schema_name == "accounts"
    assert accounts.handlers == ["handlers.accounts"]
    assert accounts.decoder.kind == "json"
    assert accounts.decoder.options == {
        "stream": "stream",
        "stream_prefix": "",
        "seq": "seq",
        "ts": "ts",
        "type": "type",
        "data": "data",
        "id": None,
        "max_bytes": 1_000_000,
    }
    assert accounts.decoders == {}
    assert accounts.first_seq == 1
    assert accounts.max_seq_jump == 100_000
    assert accounts.batch_max_messages == 2000
    assert accounts.consumers == 1
    assert accounts.poll_timeout == pytest.approx(0.1)
    assert accounts.gap_timeout == 30.0

    assert customers.topics == ["customers"]
    assert customers.handlers == ["handlers.customers"]
    assert customers.schema_name == "customers"
    assert customers.mode == "sequence"
    assert games.topics == ["game-plays"]
    assert games.handlers == ["handlers.game"]
    assert games.schema_name == "games"
    assert games.decoder_for("game-plays").options["seq"] == "seq"


def test_example_config_has_no_redis_until_its_section_is_uncommented() -> None:
    """Proves the example as shipped needs no Redis (its redis section and Redis projection
    are comments), and that uncommenting them gives a valid config whose ``scores``
    projection is kept in Redis, with the documented defaults."""
    config = load_config(EXAMPLE, env={})
    assert config.redis is None
    assert {p.store for p in config.projections} == {"postgres"}

    config = parse_config(yaml.safe_load(example_with_redis()), env={})
    redis = config.redis_config()
    assert redis.url.get_secret_value() == "redis://127.0.0.1:16379/0"
    assert (redis.prefix, redis.disposable, redis.connect_timeout) == ("projector", False, 10.0)
    scores = config.projection("scores")
    assert (scores.store, scores.schema_name) == ("redis", "scores")
    assert config.postgres_config().schema_ == "projector"


def test_example_config_takes_values_from_the_environment() -> None:
    """Proves the example's ``${VAR:-default}`` references read the environment when it
    provides the variable."""
    env = {
        "KAFKA_BOOTSTRAP": "broker-1:9092,broker-2:9092",
        "PROJECTOR_PG_DSN": f"postgresql://projector:{SECRET}@db.internal/projector",
    }
    config = load_config(EXAMPLE, env=env)
    assert config.kafka.bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert config.postgres_config().dsn.get_secret_value() == env["PROJECTOR_PG_DSN"]


def test_example_config_documents_every_key() -> None:
    """Proves config.example.yaml names every key of every section (its first projection shows
    every projection key; the redis section, commented out in the file, counts once made
    live), so the file really documents them all."""
    raw = yaml.safe_load(example_with_redis())

    def keys(model: type[Any]) -> set[str]:
        return {f.alias or name for name, f in model.model_fields.items()}

    assert set(raw) == keys(Config)
    assert set(raw["redis"]) == keys(RedisConfig)
    assert set(raw["kafka"]) == keys(KafkaConfig)
    assert set(raw["postgres"]) == keys(PostgresConfig)
    assert set(raw["metrics"]) == keys(MetricsConfig)
    assert set(raw["log"]) == keys(LogConfig)
    assert set(raw["projections"][0]["replay"]) == keys(ReplayConfig)
    assert set(raw["projections"][0]) == keys(ProjectionConfig)
    [school] = [p for p in raw["projections"] if p["name"] == "school"]
    assert set(school["correlation"]) == keys(CorrelationConfig)
    assert set(school["correlation"]["parts"]["student_course"]) == keys(CorrelationPartConfig)
    assert set(school["correlation"]["outbox"]) == keys(OutboxConfig)


# --- ${VAR} interpolation ---------------------------------------------------------------------


def test_required_variable_missing_names_the_key_path_and_the_variable() -> None:
    """Proves a ``${VAR}`` whose variable is unset is a ConfigError naming both the key path
    (through lists) and the variable, and how to give it a default."""
    data = config_with(lambda d: first(d)["topics"].append("${EXTRA_TOPIC}"))
    message = error_of(data)
    assert "projections[0].topics[1]" in message
    assert "EXTRA_TOPIC" in message
    assert "${EXTRA_TOPIC:-" in message

    data = config_with(lambda d: d["postgres"].update(dsn="${PG_DSN}"))
    message = error_of(data)
    assert "postgres.dsn" in message
    assert "PG_DSN" in message


def test_required_variable_missing_in_a_file_is_a_config_error(tmp_path: Path) -> None:
    """Proves load_config reports an unset ``${VAR}`` as ConfigError naming key and variable."""
    path = tmp_path / "projector.yaml"
    path.write_text(yaml.safe_dump(config_with(lambda d: d["kafka"].update(group_prefix="${G}"))))
    with pytest.raises(ConfigError, match=r"kafka\.group_prefix.*\bG\b"):
        load_config(path, env={})


def test_interpolation_substitutes_values_and_defaults() -> None:
    """Proves ``${VAR}`` takes the variable, ``${VAR:-default}`` the default only when unset
    (an empty default is allowed), references can sit inside longer strings, and non-string
    values are coerced by the model afterwards."""
    data = config_with(
        lambda d: (
            d["kafka"].update(
                bootstrap_servers="${KAFKA_HOST}:${KAFKA_PORT:-9092}",
                group_prefix="${GROUP:-projector}",
                instance_id="${POD_NAME:-}",
            ),
            d["postgres"].update(dsn="postgresql://app:${PG_PASSWORD}@db/app"),
            d.update(metrics={"port": "${METRICS_PORT:-9400}", "enabled": "${METRICS:-false}"}),
        )
    )
    env = {"KAFKA_HOST": "broker", "GROUP": "prod", "PG_PASSWORD": SECRET}
    config = parse_config(data, env=env)
    assert config.kafka.bootstrap_servers == "broker:9092"
    assert config.kafka.group_prefix == "prod"
    assert config.kafka.instance_id == ""
    assert config.postgres_config().dsn.get_secret_value() == f"postgresql://app:{SECRET}@db/app"
    assert config.metrics.port == 9400
    assert config.metrics.enabled is False

    # A set variable wins over the default, even when it is empty.
    config = parse_config(data, env={**env, "KAFKA_PORT": "19092", "GROUP": ""})
    assert config.kafka.bootstrap_servers == "broker:19092"
    assert config.kafka.group_prefix == ""


def test_values_from_the_environment_are_not_interpolated_again() -> None:
    """Proves a variable's value is used verbatim: a ``${...}`` inside a secret is not expanded
    (nor reported as a missing variable)."""
    data = config_with(lambda d: d["postgres"].update(dsn="${PG_DSN}"))
    config = parse_config(data, env={"PG_DSN": "postgresql://u:${NOT_A_VAR}@db/app"})
    assert config.postgres_config().dsn.get_secret_value() == "postgresql://u:${NOT_A_VAR}@db/app"


# --- validation messages name the key ---------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: first(d).update(max_seq_jump=-1), "projections[0].max_seq_jump"),
        (lambda d: first(d).update(max_seq_jump=0), "projections[0].max_seq_jump"),
        (lambda d: first(d).update(batch_max_messages=0), "projections[0].batch_max_messages"),
        (lambda d: first(d).update(consumers=0), "projections[0].consumers"),
        (lambda d: first(d).update(consumers=17), "projections[0].consumers"),
        (lambda d: first(d).update(name="Bad-Name"), "projections[0].name"),
        (lambda d: first(d).update(mode="fastest"), "projections[0].mode"),
        (lambda d: first(d).update(topics=[]), "projections[0].topics"),
        (lambda d: first(d).update(handlers=[]), "projections[0].handlers"),
        (lambda d: d["kafka"].pop("bootstrap_servers"), "kafka.bootstrap_servers"),
        (lambda d: d["postgres"].pop("dsn"), "postgres.dsn"),
        (lambda d: d.pop("projections"), "projections"),
        (lambda d: d.update(metrics={"port": 70000}), "metrics.port"),
        (lambda d: d.update(log={"level": "LOUD"}), "log.level"),
        (lambda d: first(d).update(store="mongodb"), "projections[0].store"),
        (lambda d: d.update(redis={"prefix": "p"}), "redis.url"),
        (lambda d: d.update(redis={"url": "redis://h", "prefix": "a:b"}), "redis.prefix"),
        (lambda d: d.update(redis={"url": "redis://h", "disposable": "maybe"}), "redis.disposable"),
        (
            lambda d: d.update(redis={"url": "redis://h", "connect_timeout": "soon"}),
            "redis.connect_timeout",
        ),
    ],
    ids=[
        "negative-max_seq_jump",
        "zero-max_seq_jump",
        "zero-batch",
        "zero-consumers",
        "too-many-consumers",
        "bad-name",
        "bad-mode",
        "no-topics",
        "no-handlers",
        "missing-bootstrap_servers",
        "missing-dsn",
        "missing-projections",
        "port-range",
        "log-level",
        "unknown-store",
        "missing-redis-url",
        "redis-prefix-colon",
        "redis-disposable",
        "redis-connect_timeout",
    ],
)
def test_invalid_values_name_their_key(
    change: Callable[[dict[str, Any]], object], key: str
) -> None:
    """Proves each invalid or missing value is reported on a line that starts with its full
    key path (``projections[0].max_seq_jump: ...``)."""
    message = error_of(config_with(change))
    assert f"\n  {key}: " in message, message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d.update(kafak={}), "kafak"),
        (lambda d: d["kafka"].update(group_prefx="x"), "kafka.group_prefx"),
        (lambda d: d["postgres"].update(shema="x"), "postgres.shema"),
        (lambda d: d.update(metrics={"prot": 1}), "metrics.prot"),
        (lambda d: d.update(log={"levle": "INFO"}), "log.levle"),
        (lambda d: first(d).update(max_seq_jmp=5), "projections[0].max_seq_jmp"),
        (lambda d: d.update(redis={"url": "redis://h", "prefx": "x"}), "redis.prefx"),
    ],
    ids=["top", "kafka", "postgres", "metrics", "log", "projection", "redis"],
)
def test_unknown_key_is_named(change: Callable[[dict[str, Any]], object], key: str) -> None:
    """Proves a typo'd key anywhere is rejected (extra="forbid"), not silently ignored, and the
    message names it with its path."""
    message = error_of(config_with(change))
    assert f"\n  {key}: " in message, message
    assert "not permitted" in message


def test_every_problem_is_reported_at_once() -> None:
    """Proves one run reports all the problems it found, each with its own key."""
    message = error_of(
        config_with(
            lambda d: (
                d["kafka"].pop("bootstrap_servers"),
                first(d).update(max_seq_jump=-1, gap_timeout="soon"),
            )
        )
    )
    assert "3 problem(s)" in message
    for key in ("kafka.bootstrap_servers", "projections[0].max_seq_jump", "gap_timeout"):
        assert key in message


def test_bad_duration_names_gap_timeout() -> None:
    """Proves an unparseable duration names its key and says how to write one."""
    message = error_of(config_with(lambda d: first(d).update(gap_timeout="30 parsecs")))
    assert "projections[0].gap_timeout" in message
    assert "30 parsecs" in message
    assert "30s" in message


@pytest.mark.parametrize("value", ["-5s", -1, True, "5 minutes", "", "m"])
def test_negative_and_malformed_durations_are_rejected(value: object) -> None:
    """Proves negative, boolean and malformed durations are errors naming the key."""
    message = error_of(config_with(lambda d: d["postgres"].update(connect_timeout=value)))
    assert "postgres.connect_timeout" in message


def test_duplicate_projection_names_are_rejected() -> None:
    """Proves two projections with one name (even with distinct view schemas) are an error
    naming the key and the duplicated value."""

    def dup(d: dict[str, Any]) -> None:
        d["projections"].append({**copy.deepcopy(first(d)), "view_schema": "other"})

    message = error_of(config_with(dup))
    assert "name" in message
    assert "'accounts'" in message


def test_duplicate_view_schemas_are_rejected() -> None:
    """Proves two projections whose views would share a schema are rejected."""

    def dup(d: dict[str, Any]) -> None:
        d["projections"].append({**copy.deepcopy(first(d)), "name": "b", "view_schema": "accounts"})

    message = error_of(config_with(dup))
    assert "view_schema" in message
    assert "'accounts'" in message


def test_view_schema_equal_to_postgres_schema_is_rejected() -> None:
    """Proves a projection may not put its views in projector's own schema, whether named by
    view_schema or defaulted from the projection's name."""
    message = error_of(config_with(lambda d: first(d).update(view_schema="projector")))
    assert "view_schema" in message
    assert "postgres.schema" in message

    # No view_schema: it defaults to the projection's name, here equal to postgres.schema.
    message = error_of(config_with(lambda d: d["postgres"].update(schema="accounts")))
    assert "postgres.schema" in message


def test_view_schema_clash_names_the_projection() -> None:
    """Proves the view_schema/postgres.schema clash names the offending projection, so a
    config with several projections can be fixed without guessing (here the second one,
    whose view schema defaults to its name ``projector``)."""

    def clash(d: dict[str, Any]) -> None:
        d["projections"].append({**copy.deepcopy(first(d)), "name": "projector"})

    message = error_of(config_with(clash))
    assert "projections[1]" in message or "'projector' (projection" in message, message


# --- stores: which section each projection needs ---------------------------------------------


def test_redis_section_parses_with_defaults() -> None:
    """Proves a redis section needs only ``url``: prefix ``projector``, not disposable, 10 s
    connect timeout; and the given values are taken (durations in seconds)."""
    config = parse_config(config_with(with_redis), env={})
    redis = config.redis_config()
    assert redis.url.get_secret_value() == f"redis://:{SECRET}@cache:6379/0"
    assert (redis.prefix, redis.disposable, redis.connect_timeout) == ("projector", False, 10.0)
    assert [p.store for p in config.projections] == ["postgres", "redis"]

    custom = redis_with(prefix="app-1.views_v2", disposable=True, connect_timeout="250ms")
    redis = parse_config(config_with(custom), env={}).redis_config()
    assert (redis.prefix, redis.disposable) == ("app-1.views_v2", True)
    assert redis.connect_timeout == pytest.approx(0.25)


@pytest.mark.parametrize("prefix", ["projector", "P", "a.b-c_D9", "x" * 64])
def test_redis_prefix_accepts_letters_digits_dot_dash_underscore(prefix: str) -> None:
    """Proves 1 to 64 characters of [A-Za-z0-9_.-] make a valid redis.prefix."""
    data = config_with(redis_with(prefix=prefix))
    assert parse_config(data, env={}).redis_config().prefix == prefix


@pytest.mark.parametrize("prefix", ["", "x" * 65, "a:b", "views:", "a b", "a*", "ü"])
def test_redis_prefix_rejects_colons_and_odd_characters(prefix: str) -> None:
    """Proves an empty, too long, ':'-containing (projector adds the ':' itself) or otherwise
    odd redis.prefix is an error on the key that says what a prefix may hold."""
    message = error_of(config_with(redis_with(prefix=prefix)))
    assert "\n  redis.prefix: " in message, message
    assert "1 to 64 letters, digits" in message
    assert "no ':'" in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://h",
        "redis://:pw@h:6379/0",
        "rediss://user:pw@h/1",
        "unix:///run/redis.sock?db=0",
    ],
)
def test_redis_url_schemes_are_accepted(url: str) -> None:
    """Proves redis://, rediss:// (TLS) and unix:// (socket) URLs are valid redis.url values."""
    data = config_with(redis_with(url=url))
    assert parse_config(data, env={}).redis_config().url.get_secret_value() == url


def test_redis_url_with_another_scheme_is_rejected_without_quoting_it() -> None:
    """Proves a redis.url that is not a Redis URL (here a PostgreSQL DSN pasted by mistake) is
    an error on the key showing the expected form, and the message does not quote the URL,
    which may hold a password."""
    url = f"postgresql://app:{SECRET}@db/app"
    message = error_of(config_with(redis_with(url=url)))
    assert "\n  redis.url: " in message, message
    assert "redis://:password@host:6379/0" in message
    assert SECRET not in message


def test_redis_projection_without_redis_section_names_the_projection() -> None:
    """Proves a projection with ``store: redis`` in a config without a redis section is
    refused, naming the projection by index and name and the key to add."""

    def no_section(d: dict[str, Any]) -> None:
        with_redis(d)
        del d["redis"]

    message = error_of(config_with(no_section))
    assert (
        "projections[1] ('scores') has store: redis but there is no redis section:"
        " add redis.url" in message
    ), message


def test_postgres_projection_without_postgres_section_names_the_projection() -> None:
    """Proves a projection with ``store: postgres`` (the default, not written) in a config
    without a postgres section is refused, naming the projection and the key to add."""

    def no_section(d: dict[str, Any]) -> None:
        with_redis(d)
        del d["postgres"]

    message = error_of(config_with(no_section))
    assert "projections[0] ('accounts') has store: postgres" in message, message
    assert "no postgres section" in message
    assert "postgres.dsn" in message


def test_redis_only_config_needs_no_postgres_section() -> None:
    """Proves a config whose projections are all in Redis is valid without a postgres section,
    and that asking it for its postgres section is a ConfigError saying what to add."""

    def redis_only(d: dict[str, Any]) -> None:
        del d["postgres"]
        d["redis"] = {"url": "redis://cache:6379/0"}
        first(d)["store"] = "redis"

    config = parse_config(config_with(redis_only), env={})
    assert config.postgres is None
    assert config.redis_config().url.get_secret_value() == "redis://cache:6379/0"
    with pytest.raises(ConfigError, match=r"no postgres section.*add postgres\.dsn"):
        config.postgres_config()


def test_postgres_only_config_has_no_redis_section() -> None:
    """Proves the redis section is optional when no projection uses Redis, and that asking
    for it is a ConfigError saying what to add; the postgres section is returned as is."""
    config = parse_config(config_with(), env={})
    assert config.redis is None
    assert config.postgres_config() is config.postgres
    with pytest.raises(ConfigError, match=r"no redis section.*add redis\.url"):
        config.redis_config()


def test_config_without_any_store_section_is_rejected() -> None:
    """Proves a config with neither store section is refused (the default store is postgres),
    rather than failing later when the daemon starts."""
    message = error_of(config_with(lambda d: d.pop("postgres")))
    assert "projections[0] ('accounts') has store: postgres" in message


def test_redis_projection_may_use_the_postgres_schema_name() -> None:
    """Proves the view_schema/postgres.schema clash applies to PostgreSQL projections only: a
    Redis projection's view_schema names a key namespace, not a schema, so ``projector``
    is fine for it."""

    def same_name(d: dict[str, Any]) -> None:
        with_redis(d)
        d["projections"][1]["view_schema"] = "projector"

    config = parse_config(config_with(same_name), env={})
    assert config.projection("scores").schema_name == "projector"

    def redis_only(d: dict[str, Any]) -> None:
        del d["postgres"]
        d["redis"] = {"url": "redis://cache"}
        first(d).update(store="redis", view_schema="projector")

    assert parse_config(config_with(redis_only), env={}).postgres is None


def test_sequence_mode_needs_a_seq_path() -> None:
    """Proves sequence mode (the default) refuses a JSON decoder without ``seq``, naming the
    projection and the topic; merge mode does not need it."""
    message = error_of(config_with(lambda d: first(d)["decoder"].pop("seq")))
    assert "projections[0]" in message
    assert "decoder.seq" in message
    assert "'accounts'" in message

    def merge(d: dict[str, Any]) -> None:
        first(d)["decoder"].pop("seq")
        first(d)["mode"] = "merge"

    assert parse_config(config_with(merge), env={}).projections[0].mode == "merge"


def test_sequence_mode_checks_per_topic_decoders() -> None:
    """Proves a per-topic decoder override without ``seq`` is caught in sequence mode, and one
    naming a topic the projection does not consume is an error."""

    def override(d: dict[str, Any]) -> None:
        first(d)["topics"] = ["accounts", "replays"]
        first(d)["decoders"] = {"replays": {"kind": "json", "stream": "s"}}

    message = error_of(config_with(override))
    assert "projections[0]" in message
    assert "'replays'" in message

    message = error_of(
        config_with(lambda d: first(d).update(decoders={"elsewhere": {"stream": "s", "seq": "n"}}))
    )
    assert "elsewhere" in message


def test_debezium_decoder_in_sequence_mode_is_rejected() -> None:
    """Proves a Debezium decoder in sequence mode is refused with the fix (merge mode), and
    accepted in merge mode."""
    message = error_of(config_with(lambda d: first(d).update(decoder={"kind": "debezium"})))
    assert "projections[0]" in message
    assert "Debezium" in message
    assert "merge" in message

    data = config_with(lambda d: first(d).update(decoder={"kind": "debezium"}, mode="merge"))
    assert parse_config(data, env={}).projections[0].decoder.kind == "debezium"


@pytest.mark.parametrize("kind", ["json", "debezium"])
def test_unknown_decoder_option_is_named(kind: str) -> None:
    """Proves a typo in a decoder's options is rejected with the option's name and the
    decoder's known options, at ``projections[0].decoder``."""

    def typo(d: dict[str, Any]) -> None:
        first(d)["mode"] = "merge"
        first(d)["decoder"] = {"kind": kind, "stream": "stream", "sqe": "seq"}
        if kind == "debezium":
            del first(d)["decoder"]["stream"]

    message = error_of(config_with(typo))
    assert "projections[0].decoder" in message
    assert "'sqe'" in message
    assert "known options" in message


def test_unknown_decoder_kind_is_rejected() -> None:
    """Proves a decoder kind that is neither built in nor a ``module:Name`` path is an error
    naming the decoder key."""
    message = error_of(config_with(lambda d: first(d)["decoder"].update(kind="avro")))
    assert "projections[0].decoder" in message
    assert "'avro'" in message


@pytest.mark.parametrize("path", ["not a path!", "handlers/accounts.py", "handlers.accounts:", ""])
def test_bad_handler_path_is_named(path: str) -> None:
    """Proves a handler entry that is not a ``module`` or ``module:function`` path names its
    key with its list index."""
    message = error_of(config_with(lambda d: first(d).update(handlers=["handlers.game", path])))
    assert "projections[0].handlers[1]" in message
    assert "module path" in message


def test_handler_paths_that_look_right_pass_validation() -> None:
    """Proves handler paths are only checked for shape at parse time (importing them is
    check-config's and run's job), and ``module:function`` is accepted."""
    config = parse_config(
        config_with(lambda d: first(d).update(handlers=["handlers.accounts:handle", "pkg.mod"])),
        env={},
    )
    assert config.projections[0].handlers == ["handlers.accounts:handle", "pkg.mod"]


def test_top_level_must_be_a_mapping() -> None:
    """Proves a YAML file that is a list, a scalar or empty is a ConfigError, not a crash."""
    for data in ([1, 2], "text", None):
        assert "mapping" in error_of(data)


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5m", 300.0),
        ("30s", 30.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1.5s", 1.5),
        (" 10 s ", 10.0),
        ("45", 45.0),
        (30, 30.0),
        (0.5, 0.5),
    ],
)
def test_durations_parse(value: object, seconds: float) -> None:
    """Proves the duration forms: a unit suffix (ms, s, m, h, d), a bare number of seconds, or
    a YAML number."""
    assert parse_duration(value) == pytest.approx(seconds)


def test_durations_in_the_config_are_seconds() -> None:
    """Proves duration keys are stored in seconds after parsing."""
    config = parse_config(
        config_with(lambda d: first(d).update(poll_timeout="250ms", gap_timeout="5m")), env={}
    )
    assert config.projections[0].poll_timeout == pytest.approx(0.25)
    assert config.projections[0].gap_timeout == 300.0
    config = parse_config(config_with(lambda d: first(d).update(gap_timeout=30)), env={})
    assert config.projections[0].gap_timeout == 30.0


# --- secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        (f"postgresql://app:{SECRET}@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            f"postgres://app:{SECRET}@db/app?sslmode=require",
            "postgres://app:***@db/app?sslmode=require",
        ),
        (
            f"postgresql://app:{SECRET}@h1:5432,h2:5433/app",
            "postgresql://app:***@h1:5432,h2:5433/app",
        ),
        (
            f"host=db user=app password={SECRET} dbname=app",
            "host=db user=app password=*** dbname=app",
        ),
        (f"host=db password = {SECRET} user=app", "host=db password = *** user=app"),
        (f"host=db password={SECRET}", "host=db password=***"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("host=db user=app", "host=db user=app"),
        # Unencoded "#" and "?" in the password: libpq takes them as part of it.
        ("postgresql://app:Xy7#Qp?2Secret@db:5432/app", "postgresql://app:***@db:5432/app"),
    ],
)
def test_redact_hides_passwords(dsn: str, redacted: str) -> None:
    """Proves redact() replaces the password of URL and key=value DSNs and leaves the rest
    (and DSNs without a password) readable."""
    assert redact(dsn) == redacted
    assert SECRET not in redact(dsn)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"redis://:{SECRET}@host:6379/0", "redis://:***@host:6379/0"),
        (f"redis://user:{SECRET}@host/0", "redis://user:***@host/0"),
        (f"rediss://user:{SECRET}@host:6380/2", "rediss://user:***@host:6380/2"),
        (f"redis://:p@{SECRET}@host/0", "redis://:***@host/0"),
        (
            f"unix:///run/redis.sock?db=0&password={SECRET}",
            "unix:///run/redis.sock?db=0&password=***",
        ),
        (f"redis://host:6379/0?password={SECRET}", "redis://host:6379/0?password=***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host/0", "redis://user@host/0"),
    ],
)
def test_redact_hides_redis_passwords(url: str, redacted: str) -> None:
    """Proves redact() hides the password of redis:// and rediss:// URLs, with or without a
    user name, given in the query, or holding an unencoded ``@`` (redis-py takes the
    password up to the last ``@``), and leaves URLs without a password readable."""
    assert redact(url) == redacted
    assert SECRET not in redact(url)


def test_redis_url_never_shows_in_repr_or_str() -> None:
    """Proves redis.url (a SecretStr) stays out of repr(config), str(config), the redis
    section's repr and a JSON dump, wherever its password came from."""
    data = config_with(redis_with(url="redis://:${REDIS_PASSWORD}@cache:6379/0"))
    config = parse_config(data, env={"REDIS_PASSWORD": SECRET})
    assert config.redis_config().url.get_secret_value() == f"redis://:{SECRET}@cache:6379/0"
    for text in (
        repr(config),
        str(config),
        repr(config.redis),
        str(config.redis_config().url),
        config.model_dump_json(),
    ):
        assert SECRET not in text
        assert "cache:6379" not in text


def test_redact_hides_a_quoted_password_with_spaces() -> None:
    """Proves a libpq quoted value (``password='correct horse'``, which libpq reads as the
    password ``correct horse``) is hidden completely."""
    out = redact("host=db password='correct horse' user=app")
    assert "horse" not in out
    assert "correct" not in out


def test_redact_hides_a_url_password_without_a_user() -> None:
    """Proves ``postgresql://:pw@db/app`` (libpq: no user, password ``pw``) is redacted."""
    assert SECRET not in redact(f"postgresql://:{SECRET}@db/app")


def test_dsn_never_shows_in_repr_or_str() -> None:
    """Proves the DSN (a SecretStr) stays out of repr(config), str(config), the postgres
    section's repr and a JSON dump, wherever its password came from."""
    data = config_with(lambda d: d["postgres"].update(dsn="postgresql://app:${PG_PASSWORD}@db/app"))
    config = parse_config(data, env={"PG_PASSWORD": SECRET})
    assert config.postgres_config().dsn.get_secret_value() == f"postgresql://app:{SECRET}@db/app"
    for text in (
        repr(config),
        str(config),
        repr(config.postgres),
        str(config.postgres_config().dsn),
        config.model_dump_json(),
    ):
        assert SECRET not in text
        assert "db/app" not in text


def test_validation_errors_do_not_echo_the_dsn() -> None:
    """Proves a ConfigError about another key does not quote the DSN's password."""
    data = config_with(
        lambda d: (
            d["postgres"].update(dsn=f"postgresql://app:{SECRET}@db/app", shema="x"),
            first(d).update(max_seq_jump=-1),
        )
    )
    message = error_of(data)
    assert "postgres.shema" in message
    assert SECRET not in message


def test_sasl_password_never_shows_in_repr() -> None:
    """Proves a SASL password given in ``kafka.consumer`` stays out of repr(config) and
    str(config), as the config module promises for secrets."""
    data = config_with(
        lambda d: d["kafka"].update(
            consumer={"sasl.username": "projector", "sasl.password": "${KAFKA_PASSWORD}"}
        )
    )
    config = parse_config(data, env={"KAFKA_PASSWORD": SECRET})
    assert SECRET not in repr(config)
    assert SECRET not in str(config)


# --- loading files ----------------------------------------------------------------------------


def test_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    """Proves a config file that does not exist gives ConfigError with its path."""
    path = tmp_path / "nowhere" / "projector.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_invalid_yaml_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    """Proves a file that is not YAML gives ConfigError with its path, not a yaml traceback."""
    path = tmp_path / "projector.yaml"
    path.write_text("kafka: [unclosed\n  bootstrap_servers: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


def test_validation_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    """Proves a validation error from load_config starts with the file's path, then the key."""
    path = tmp_path / "projector.yaml"
    path.write_text(yaml.safe_dump(config_with(lambda d: first(d).update(max_seq_jump=-3))))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: ")
    assert "projections[0].max_seq_jump" in str(info.value)


HOSTILE = ['x"; drop table projector.checkpoints; --', "Accounts", "a b", "a.b", "x" * 49, ""]


def _set_name(where: str, value: str) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        if where == "projections[0].name":
            first(d)["name"] = value
        elif where == "projections[0].view_schema":
            first(d)["view_schema"] = value
        elif where == "postgres.schema":
            d["postgres"]["schema"] = value
        elif where == "projections[0].merge.view_table":
            first(d).update(mode="merge", handlers=[], merge={"view_table": value})
            first(d)["decoder"] = {"kind": "json", "stream": "stream", "ts": "ts"}
        else:
            with_redis(d)
            d["redis"]["prefix"] = value

    return change


SQL_NAMES = [
    "projections[0].name",
    "projections[0].view_schema",
    "postgres.schema",
    "projections[0].merge.view_table",
]
REDIS_PREFIXES = ['x"; flushall', "a b", "a:b", "", "x" * 65]


@pytest.mark.parametrize(
    ("where", "value"),
    [(w, v) for w in SQL_NAMES for v in HOSTILE] + [("redis.prefix", v) for v in REDIS_PREFIXES],
)
def test_hostile_names_for_schemas_tables_and_keys_are_refused_naming_the_key(
    where: str, value: str
) -> None:
    """Proves every name from the config that becomes part of SQL (a schema, a table, a
    projection's name in projector's tables) or of a Redis key is checked at start: a quote,
    a statement, upper case, a space, a dot, an overlong or empty name is refused with the key
    named, so no such name ever reaches a statement (they are also always quoted with
    ``psycopg.sql.Identifier``; event data is only ever bound as parameters)."""
    with pytest.raises(ConfigError) as info:
        parse_config(config_with(_set_name(where, value)), env={})
    assert where in str(info.value)


# --- correlation ------------------------------------------------------------------------------


def school(**correlation: object) -> Callable[[dict[str, Any]], None]:
    """The first projection made the example's correlated school projection, its correlation
    section updated with ``correlation`` (a value of None removes the key)."""

    def change(d: dict[str, Any]) -> None:
        section: dict[str, Any] = {
            "rule": "handlers.school_correlation:name_business_events",
            "window": "10s",
            "parts": {t: f"public.{t}" for t in ("student", "course", "student_course")},
        }
        section.update(correlation)
        d["projections"][0] = {
            "name": "school",
            "mode": "merge",
            "topics": ["s.public.student", "s.public.course", "s.public.student_course"],
            "decoder": {"kind": "debezium"},
            "decoders": {"s.transaction": {"kind": "debezium"}},
            "handlers": ["handlers.school", "handlers.school_history"],
            "correlation": {k: v for k, v in section.items() if v is not None},
        }
        d["projections"][0]["topics"].append("s.transaction")

    return change


def test_example_school_correlation_becomes_the_cores_rules() -> None:
    """Proves the example's correlation section parses into the core's rules: durations as
    event-time milliseconds, the name defaulting to the projection's, parts with their own key
    or none, and transaction metadata switched on by the Debezium ``*.transaction`` topic."""
    config = load_config(EXAMPLE, env={})
    proj = config.projection("school")
    assert proj.transaction_metadata is True
    assert proj.correlation_topics == proj.topics
    rules = correlation_rules(proj, lambda parts: None)
    assert (rules.window, rules.name, rules.key, rules.time) == (
        10_000,
        "school",
        "meta.tx_id",
        "meta.ts_ms",
    )
    assert [(p.name, p.source, p.key) for p in rules.parts] == [
        ("student", "public.student", None),
        ("course", "public.course", None),
        ("student_course", "public.student_course", None),
    ]
    assert rules.transaction_metadata and rules.complete_when is None
    assert rules.closed_retention == 7 * 86_400_000
    assert proj.correlation is not None
    assert (proj.correlation.idle_after, proj.correlation.lateness) == (30.0, 0.0)


def test_transaction_metadata_is_off_without_a_transaction_topic() -> None:
    """Proves the default of ``transaction_metadata`` follows the topics: with no Debezium
    ``*.transaction`` topic among the correlation's topics it is off, and a field-path key
    with ``complete_when`` is accepted."""
    data = config_with(
        school(topics=["s.public.student"], key="data.id", complete_when=["student"])
    )
    proj = parse_config(data, env={}).projections[0]
    assert proj.transaction_metadata is False
    assert correlation_rules(proj, lambda parts: None).complete_when == frozenset({"student"})


@pytest.mark.parametrize(
    ("correlation", "message"),
    [
        ({"window": "0s"}, "correlation.window must be a positive duration"),
        ({"rule": "handlers.school_correlation"}, "write e.g. handlers.school_correlation:name"),
        ({"parts": {}}, "correlation.parts must name at least one part"),
        (
            {"parts": {"a": "public.student", "b": "public.student"}},
            "correlation.parts lists a source twice",
        ),
        ({"key": "tx_id"}, "correlation.key must be a path such as meta.tx_id"),
        ({"time": "when"}, "correlation.time must be a path"),
        (
            {"parts": {"student": {"source": "public.student", "key": "id"}}},
            "correlation.parts.student.key must be a path",
        ),
        ({"topics": ["elsewhere"]}, "correlation.topics names topics not in topics: ['elsewhere']"),
        (
            {"part_by": "topic", "transaction_metadata": True},
            "correlation.transaction_metadata needs part_by: table and key: meta.tx_id",
        ),
        (
            {"complete_when": ["student"]},
            "correlation.complete_when does not apply with transaction_metadata",
        ),
        (
            {"transaction_metadata": False, "complete_when": ["nobody"]},
            "correlation.complete_when names parts not in correlation.parts: ['nobody']",
        ),
        (
            {"outbox": {"topic": "s.public.student"}},
            "correlation.outbox.topic must not be one of the projection's topics",
        ),
        ({"outbox": {}}, "projections[0].correlation.outbox.topic"),
        ({"outbox": {"topic": "b", "key": "tx"}}, "projections[0].correlation.outbox.key"),
        ({"outbox": {"topic": "b", "max_batch": 0}}, "projections[0].correlation.outbox.max_batch"),
        ({"outbox": {"topic": "b", "retention": "a week"}}, "correlation.outbox.retention"),
        ({"lateness": "-1s"}, "projections[0].correlation.lateness"),
    ],
)
def test_correlation_problems_name_the_key(correlation: dict[str, Any], message: str) -> None:
    """Proves each problem of a correlation section is a ConfigError naming its key and the
    fix, as docs/correlation.md section 3 words them."""
    assert message in error_of(config_with(school(**correlation)))


def test_correlation_is_accepted_on_redis_and_refused_in_sequence_mode() -> None:
    """Proves a correlation on a Redis projection is accepted since slice 4 (docs/correlation.md
    section 11), while sequence mode, which the step does not support, is still refused at
    start with a clear message."""

    def on_redis(d: dict[str, Any]) -> None:
        school()(d)
        with_redis(d)
        first(d)["store"] = "redis"
        first(d)["handlers"] = ["handlers.profiles_redis", "handlers.school_history_redis"]

    projection = parse_config(config_with(on_redis), env={}).projections[0]
    assert (projection.store, projection.correlation is not None) == ("redis", True)

    def in_sequence(d: dict[str, Any]) -> None:
        school()(d)
        first(d).update(mode="sequence", decoder={"kind": "json", "stream": "s", "seq": "q"})
        first(d)["decoders"] = {}

    assert "correlation is supported in merge mode only" in error_of(config_with(in_sequence))


def test_transaction_metadata_needs_a_debezium_topic() -> None:
    """Proves transaction metadata switched on over topics none of which has the Debezium
    decoder is refused, naming the key."""

    def json_only(d: dict[str, Any]) -> None:
        school(transaction_metadata=True)(d)
        first(d).update(decoder={"kind": "json", "stream": "s", "ts": "ts"}, decoders={})

    assert "no topic in correlation.topics has the Debezium decoder" in error_of(
        config_with(json_only)
    )


def test_correlation_rule_and_business_handler_are_checked_at_load() -> None:
    """Proves the load-time checks (``projector check-config`` and ``run``): a rule module
    without the named function, and a correlation whose business events no handler takes."""
    config = parse_config(config_with(school()), env={})
    load_handlers(config.projections[0])  # the example's: fine

    no_rule = parse_config(
        config_with(school(rule="handlers.school_correlation:no_such_rule")), env={}
    )
    with pytest.raises(
        ValueError, match=r"module handlers\.school_correlation has no no_such_rule"
    ):
        load_handlers(no_rule.projections[0])

    def only_rows(d: dict[str, Any]) -> None:
        school()(d)
        first(d)["handlers"] = ["handlers.school"]

    nowhere = parse_config(config_with(only_rows), env={})
    with pytest.raises(ValueError, match="business events would reach nothing"):
        load_handlers(nowhere.projections[0])


# --- the outbox (docs/correlation.md, section 7) ---------------------------------------------


def test_outbox_section_parses_with_its_defaults() -> None:
    """Proves ``correlation.outbox``: only ``topic`` is required; the key defaults to the
    business event's stream, published rows are kept 7 days, 500 rows a round."""
    config = parse_config(config_with(school(outbox={"topic": "school.business"})), env={})
    outbox = config.projections[0].correlation.outbox  # type: ignore[union-attr]
    assert outbox is not None
    assert (outbox.topic, outbox.key, outbox.retention, outbox.max_batch) == (
        "school.business",
        "stream",
        7 * 86400.0,
        500,
    )
    custom = {"topic": "b", "key": "id", "retention": "1d", "max_batch": 50}
    config = parse_config(config_with(school(outbox=custom)), env={})
    outbox = config.projections[0].correlation.outbox  # type: ignore[union-attr]
    assert outbox is not None
    assert (outbox.key, outbox.retention, outbox.max_batch) == ("id", 86400.0, 50)


def test_outbox_is_accepted_on_redis_with_the_same_checks() -> None:
    """Proves a Redis projection may have an outbox (the Redis outbox,
    ``store/redis_outbox.py``), and that it is checked as on PostgreSQL: an outbox topic that
    is one of the projection's own topics is refused, naming ``correlation.outbox.topic``."""

    def on_redis(topic: str) -> Callable[[dict[str, Any]], None]:
        def change(d: dict[str, Any]) -> None:
            school(outbox={"topic": topic})(d)
            with_redis(d)
            first(d)["store"] = "redis"
            first(d)["handlers"] = ["handlers.profiles_redis"]

        return change

    config = parse_config(config_with(on_redis("school.business")), env={})
    outbox = config.projections[0].correlation.outbox  # type: ignore[union-attr]
    assert config.projections[0].store == "redis"
    assert outbox is not None and outbox.topic == "school.business"
    assert "correlation.outbox.topic must not be one of the projection's topics" in error_of(
        config_with(on_redis("s.public.student"))
    )


def test_an_outbox_topic_is_somewhere_for_business_events_to_go() -> None:
    """Proves the load-time check "business events would reach nothing" accepts an outbox
    topic instead of a ``handle_business`` handler, and still names both ways out without
    either."""

    def rows_only(outbox: dict[str, Any] | None) -> Callable[[dict[str, Any]], None]:
        def change(d: dict[str, Any]) -> None:
            school(outbox=outbox)(d)
            first(d)["handlers"] = ["handlers.school"]

        return change

    published = parse_config(config_with(rows_only({"topic": "school.business"})), env={})
    load_handlers(published.projections[0])
    nowhere = parse_config(config_with(rows_only(None)), env={})
    with pytest.raises(ValueError, match=r"or set correlation\.outbox\.topic"):
        load_handlers(nowhere.projections[0])


@pytest.mark.parametrize(
    ("key", "dsn"),
    [
        ("dsn", "postgresql://app:Pa%zzS3cret@db/app"),  # '%' not followed by two hex digits
        ("migrate_dsn", "host=db password=my S3cret user=app"),  # a space, unquoted
    ],
)
def test_a_dsn_libpq_cannot_read_is_refused_naming_the_key_not_the_password(
    key: str, dsn: str
) -> None:
    """Proves a malformed PostgreSQL DSN is a configuration error at start that names the key
    and the fix, and never quotes the DSN: libpq's own message quotes the unreadable part,
    here the password, which went to stderr (and the logs) with a traceback."""
    message = error_of(config_with(lambda d: d["postgres"].update({key: dsn})))
    assert f"postgres.{key}" in message and "percent-encode" in message
    assert "S3cret" not in message
