import pytest
from pydantic import ValidationError

from thoughtwire.shared.settings import (
    DOC,
    Settings,
    SettingsError,
    describe,
    env_name,
    markdown,
)


def test_defaults_are_embedded_and_simulated():
    settings = Settings.from_env({})
    assert settings.redis_url is None
    assert settings.agent == "simulated"


def test_openai_is_the_default_when_a_key_is_set():
    assert Settings.from_env({"OPENAI_API_KEY": "sk-test"}).agent == "openai"
    assert (
        Settings.from_env({"OPENAI_API_KEY": "sk", "THOUGHTWIRE_AGENT": "simulated"}).agent
        == "simulated"
    )


def test_types_are_parsed():
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://h:1/0",
            "THOUGHTWIRE_SIM_STEP_DELAY": "0",
            "THOUGHTWIRE_SEND_QUEUE_SIZE": "8",
            "THOUGHTWIRE_WS_PER_MESSAGE_DEFLATE": "yes",
        }
    )
    assert settings.redis_url == "redis://h:1/0"
    assert settings.sim_step_delay == 0.0
    assert settings.send_queue_size == 8
    assert settings.ws_per_message_deflate is True


@pytest.mark.parametrize(
    "env",
    [
        {"THOUGHTWIRE_SEND_QUEUE_SIZE": "many"},
        {"THOUGHTWIRE_SEND_QUEUE_SIZE": "0"},
        {"THOUGHTWIRE_AGENT": "nope"},
        {"THOUGHTWIRE_AGENT": "openai"},
        {"THOUGHTWIRE_KEY_PREFIX": "a:b"},
        {"THOUGHTWIRE_SIM_JITTER": "0.9"},
        {"THOUGHTWIRE_REDIS_POOL_SIZE": "1"},
        {"THOUGHTWIRE_MEMORY_TURNS": "-1"},
        {"THOUGHTWIRE_WS_PER_MESSAGE_DEFLATE": "maybe"},
        {"THOUGHTWIRE_PUBSUB_PROBE_INTERVAL": "0.01"},  # every busy link taken for deaf
        {"THOUGHTWIRE_PING_INTERVAL": "0.001"},  # browsers pinged 1,000 times a second
        {"THOUGHTWIRE_PING_INTERVAL": "1e7"},  # past a browser timer: its watchdog would spin
    ],
)
def test_bad_values_name_the_variable(env):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert next(iter(env)).split("_", 1)[1] in str(info.value) or "OPENAI_API_KEY" in str(
        info.value
    )


def test_secrets_stay_out_of_repr():
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-secret", "JWT_SECRET": "jwt-secret"})
    assert "sk-secret" not in repr(settings)
    assert "jwt-secret" not in repr(settings)


def test_overrides_win():
    assert Settings.from_env({"THOUGHTWIRE_KEY_PREFIX": "a"}, key_prefix="b").key_prefix == "b"


def test_direct_construction_is_validated_and_reads_no_environment(monkeypatch):
    monkeypatch.setenv("THOUGHTWIRE_KEY_PREFIX", "from-env")
    assert Settings().key_prefix == "tw"
    with pytest.raises(SettingsError, match="THOUGHTWIRE_SEND_QUEUE_SIZE"):
        Settings(send_queue_size=0)


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        Settings().key_prefix = "x"  # type: ignore[misc]


def test_every_setting_is_described():
    for variable, kind, _default, description in describe():
        assert variable.isupper() and kind and description, variable


def test_settings_page_is_current():
    """docs/settings.md is generated from the declared settings; regenerate it with
    ``python -m thoughtwire.shared.settings``."""
    assert DOC.read_text() == markdown(), "run `python -m thoughtwire.shared.settings`"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"THOUGHTWIRE_SEND_QUEUE_SIZE": "many"},
            "THOUGHTWIRE_SEND_QUEUE_SIZE='many' is not a valid int",
        ),
        ({"THOUGHTWIRE_SIM_JITTER": "0.9"}, "THOUGHTWIRE_SIM_JITTER='0.9': must be less than"),
        ({"THOUGHTWIRE_KEY_PREFIX": "a:b"}, "THOUGHTWIRE_KEY_PREFIX='a:b': must not contain"),
        # '}' would end the tag that keeps an idempotency key's digest in the key's slot.
        ({"THOUGHTWIRE_KEY_PREFIX": "a}b"}, "THOUGHTWIRE_KEY_PREFIX='a}b': must not contain"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable_and_the_value(env, line):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(line) and "\n" not in str(info.value)


def test_an_unknown_setting_is_refused():
    with pytest.raises(SettingsError, match="bogus is not a setting"):
        Settings(bogus=1)


# Settings whose 0 would break the process (a lease, a TTL or a timeout of nothing, no
# attempt at all); every other number takes 0 as "none" or "off".
POSITIVE = {
    "redis_pool_timeout",
    "openai_timeout",
    "openai_idle_timeout",
    "max_steps",
    "max_tokens_per_run",
    "tool_timeout",
    "log_ttl",
    "max_message_bytes",
    "max_prompt_chars",
    "viewer_token_ttl",
    "rate_limit",
    "max_runs_per_user",
    "max_sockets_per_user",
    "idle_timeout",
    "lease_seconds",
    "max_attempts",
}
NUMBERS = [
    name
    for name, info in Settings.model_fields.items()
    if info.annotation in (int, float) and name != "metrics_port"
]


@pytest.mark.parametrize("name", NUMBERS)
def test_every_number_refuses_negative_huge_and_non_finite_values(name):
    """A lease of NaN, a TTL of -1 or a count past any protocol's integer fails at start."""
    variable = env_name(name)
    refused = ["-1", "nan", "inf", "-inf", "1e400", "99999999999999999999"]
    refused += ["0"] if name in POSITIVE else []
    for raw in refused:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({variable: raw})
        assert str(info.value).startswith(variable) and "\n" not in str(info.value), raw
        assert info.value.variable == variable


def test_a_public_key_that_does_not_parse_fails_at_start_without_printing_it():
    """Not at every request, as a 500 with a traceback; a private key pasted there stays out."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"JWT_PUBLIC_KEY": "-----BEGIN PRIVATE KEY-----\nnot-a-key\n"})
    assert str(info.value).startswith("JWT_PUBLIC_KEY") and "not-a-key" not in str(info.value)
    assert info.value.variable == "JWT_PUBLIC_KEY"
    rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
    from cryptography.hazmat.primitives import serialization

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert Settings.from_env({"JWT_PUBLIC_KEY": pem}).jwt_public_key == pem


@pytest.mark.parametrize("url", ["notaurl", "keys.example.com/jwks", "file:///etc/jwks.json"])
def test_a_jwks_url_that_is_not_http_fails_at_start(url):
    """One line naming JWKS_URL, not PyJWT's traceback from inside the app's start."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"JWKS_URL": url})
    assert str(info.value).startswith("JWKS_URL") and info.value.variable == "JWKS_URL"
    assert Settings.from_env({"JWKS_URL": "https://idp.example.com/jwks"}).jwks_url


@pytest.mark.parametrize("url", ["::bad", "api.openai.com/v1", "http://[bad"])
def test_an_openai_base_url_that_is_not_http_fails_at_start(url):
    """Not the openai client's traceback as a worker starts, or every run failing later."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OPENAI_BASE_URL": url})
    assert str(info.value).startswith("OPENAI_BASE_URL")
    assert Settings.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1"}).openai_base_url


@pytest.mark.parametrize("variable", ["OPENAI_BASE_URL", "JWKS_URL"])
def test_a_bad_url_is_shown_without_its_password(variable):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: "https://proxy:pa55w0rd-k3y@[bad/v1"})
    assert "pa55w0rd-k3y" not in str(info.value) and str(info.value).startswith(variable)
