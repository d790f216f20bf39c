"""Settings: one validated object from REFRAME_* and FAL_KEY; errors name the variable; secrets stay secret."""

from __future__ import annotations

import pytest

from config import AmbiguousSubmitPolicy, SettingsError, load_settings
from config.settings import Settings, env_name, redact_url
from worker.flow.accounts import pool_arg


def test_defaults_load_from_an_empty_environment() -> None:
    s = load_settings({})
    assert s.max_concurrency == 2
    assert s.ambiguous_submit_policy is AmbiguousSubmitPolicy.DEAD_LETTER
    assert s.fal_key is None


def test_every_field_has_a_documented_environment_variable() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert env_name(name) == ("FAL_KEY" if name == "fal_key" else f"REFRAME_{name.upper()}")


def test_environment_values_are_read_and_typed() -> None:
    s = load_settings(
        {"REFRAME_MAX_CONCURRENCY": "40", "REFRAME_USE_STATUS_STREAM": "false", "FAL_KEY": "id:sec"}
    )
    assert s.max_concurrency == 40 and s.use_status_stream is False
    assert s.fal_key_value == "id:sec"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REFRAME_REDIS_URL": "http://localhost:6379"}, "REFRAME_REDIS_URL: must be a redis://"),
        ({"REFRAME_REDIS_URL": "redis://"}, "REFRAME_REDIS_URL: has no host"),
        ({"REFRAME_MAX_CONCURRENCY": "-3"}, "REFRAME_MAX_CONCURRENCY: Input should be greater than 0"),
        (
            {"REFRAME_BUDGET_DAILY_USD": "-1"},
            "REFRAME_BUDGET_DAILY_USD: Input should be greater than or equal",
        ),
        ({"REFRAME_SUBMIT_RATE_PER_S": "fast"}, "REFRAME_SUBMIT_RATE_PER_S: Input should be a valid number"),
        ({"REFRAME_MAX_CONCURENCY": "3"}, "REFRAME_MAX_CONCURENCY: unknown setting"),
        ({"REFRAME_FAL_QUEUE_URL": "queue.fal.run"}, "REFRAME_FAL_QUEUE_URL: must be an http(s):// URL"),
        ({"REFRAME_LOG_LEVEL": "LOUD"}, "REFRAME_LOG_LEVEL: must be one of"),
        ({"REFRAME_AMBIGUOUS_SUBMIT_POLICY": "yolo"}, "REFRAME_AMBIGUOUS_SUBMIT_POLICY: Input should be"),
        (
            {"REFRAME_TASK_TIME_LIMIT_S": "10"},
            "REFRAME_TASK_TIME_LIMIT_S must be >= REFRAME_TASK_SOFT_TIME_LIMIT_S",
        ),
        ({"REFRAME_VISIBILITY_TIMEOUT_S": "100"}, "REFRAME_VISIBILITY_TIMEOUT_S must exceed"),
        (
            {"REFRAME_RESERVED_HIGH_SLOTS": "2"},
            "REFRAME_RESERVED_HIGH_SLOTS must be below REFRAME_MAX_CONCURRENCY",
        ),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"REFRAME_REDIS_URL": "http://x", "REFRAME_TYPO": "1", "REFRAME_MAX_CONCURRENCY": "0"})
    text = str(info.value)
    assert "REFRAME_REDIS_URL" in text and "REFRAME_TYPO" in text and "REFRAME_MAX_CONCURRENCY" in text


def test_fal_key_is_required_only_by_components_calling_real_fal() -> None:
    load_settings({})  # a producer needs no key
    with pytest.raises(SettingsError, match="FAL_KEY: required"):
        load_settings({}, require_fal_key=True)
    load_settings({"REFRAME_FAL_QUEUE_URL": "http://127.0.0.1:8080"}, require_fal_key=True)  # emulator


def test_secrets_never_show_in_repr_dumps_or_errors() -> None:
    env = {
        "FAL_KEY": "kid:topsecret",
        "REFRAME_REDIS_URL": "redis://:hunter2@redis:6379/0",
        "REFRAME_CALLBACK_SIGNING_KEY": "sigkey123",
    }
    s = load_settings(env)
    for text in (repr(s), str(s), str(s.redacted()), str(s.model_dump())):
        assert "topsecret" not in text and "sigkey123" not in text
    assert "hunter2" not in str(s.redacted())
    with pytest.raises(SettingsError) as info:
        load_settings({**env, "REFRAME_MAX_CONCURRENCY": "x"})
    assert "topsecret" not in str(info.value) and "hunter2" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


ACME = "whsec_" + "YWNtZSBzZWNyZXQgMDAwMDAwMDAwMDAwMDAwMDAwMDA="
OLD = "whsec_" + "b2xkIGNsdXN0ZXIgc2VjcmV0IDAwMDAwMDAwMDAwMDA="


def test_callback_secrets_per_tenant_fall_back_to_the_clusters() -> None:
    s = load_settings(
        {
            "REFRAME_CALLBACK_SECRETS": OLD,
            "REFRAME_CALLBACK_TENANT_SECRETS": f" acme = {ACME} {OLD} ; b2={ACME}",
        }
    )
    assert s.callback_secrets_for("acme") == [ACME, OLD]
    assert s.callback_secrets_for("b2") == [ACME]
    assert s.callback_secrets_for("other") == [OLD] == s.callback_secrets_for("")


@pytest.mark.parametrize(
    "value",
    ["acme", f"Acme={ACME}", "acme=", "acme=whsec_not base64!", f"acme={ACME.removeprefix('whsec_')}"],
)
def test_bad_tenant_secrets_are_refused_without_echoing_a_secret(value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"REFRAME_CALLBACK_TENANT_SECRETS": value})
    assert "REFRAME_CALLBACK_TENANT_SECRETS" in str(info.value)
    assert ACME.removeprefix("whsec_") not in str(info.value)


def test_without_accounts_the_pool_is_one_default_account_of_max_concurrency() -> None:
    s = load_settings({"REFRAME_MAX_CONCURRENCY": "7", "FAL_KEY": "id:sec"})
    assert [(a.id, a.cap, a.rate_per_s) for a in s.fal_account_specs] == [("default", 7, None)]
    assert s.slot_capacity == 7 and s.fal_key_of("default") == "id:sec"


def test_accounts_their_caps_rates_and_keys() -> None:
    s = load_settings(
        {
            "REFRAME_FAL_ACCOUNTS": "a:3, b:5:2.5",
            "REFRAME_FAL_ACCOUNT_KEYS": "b=bid:bsecret",
            "FAL_KEY": "aid:asecret",
            "REFRAME_RESERVED_HIGH_SLOTS": "7",
        }
    )
    assert [(a.id, a.cap, a.rate_per_s) for a in s.fal_account_specs] == [("a", 3, None), ("b", 5, 2.5)]
    assert s.slot_capacity == 8  # REFRAME_MAX_CONCURRENCY no longer counts
    assert (s.fal_key_of("a"), s.fal_key_of("b")) == ("aid:asecret", "bid:bsecret")
    assert "bsecret" not in str(s.redacted())


def test_accounts_with_budgets_pass_their_caps_in_micro_dollars_to_the_slot_scripts() -> None:
    s = load_settings(
        {
            "REFRAME_FAL_ACCOUNTS": "a:3:-:40:900,b:5:2.5",
            "REFRAME_PRICE_PER_S_USD": "0.1",
            "REFRAME_MAX_VIDEO_DURATION_S": "30",
            "REFRAME_ESTIMATE_MARGIN_S": "1",
            "REFRAME_BILLING_UNIT_S": "1",
        }
    )
    a, b = s.fal_account_specs
    assert (a.rate_per_s, a.daily_usd, a.monthly_usd, a.has_budget) == (None, 40.0, 900.0, True)
    assert (b.rate_per_s, b.daily_usd, b.has_budget) == (2.5, None, False)
    # the largest job: 31 s at $0.10/s
    assert pool_arg(s) == "a:3:40000000:900000000,b:5#3100000"
    assert pool_arg(load_settings({"REFRAME_FAL_ACCOUNTS": "a:3,b:5:2.5"})) == "a:3,b:5"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REFRAME_FAL_ACCOUNTS": "a:0"}, "REFRAME_FAL_ACCOUNTS: entry 'a:0': cap must be >= 1"),
        ({"REFRAME_FAL_ACCOUNTS": "A:3"}, "REFRAME_FAL_ACCOUNTS: entry 'A:3': must be id:cap"),
        ({"REFRAME_FAL_ACCOUNTS": "a:3,a:4"}, "account 'a' is listed twice"),
        (
            {"REFRAME_FAL_ACCOUNTS": "a:3:-:ten"},
            "REFRAME_FAL_ACCOUNTS: entry 'a:3:-:ten': daily_usd and monthly_usd must be numbers",
        ),
        ({"REFRAME_FAL_ACCOUNTS": "a:3::5:-2"}, "REFRAME_FAL_ACCOUNTS: entry 'a:3::5:-2': daily_usd and"),
        (
            {"REFRAME_FAL_ACCOUNTS": "a:3", "REFRAME_FAL_ACCOUNT_KEYS": "zz=id:topsecret"},
            "keys for undeclared accounts: zz",
        ),
        ({"REFRAME_FAL_ACCOUNT_KEYS": "a id:topsecret"}, "REFRAME_FAL_ACCOUNT_KEYS: each entry must be id="),
        (
            {
                "REFRAME_FAL_ACCOUNTS": "a:1,b:1",
                "REFRAME_FAL_ACCOUNT_KEYS": "a=x:y",
                "REFRAME_RESERVED_HIGH_SLOTS": "2",
            },
            "REFRAME_RESERVED_HIGH_SLOTS must be below",
        ),
    ],
)
def test_bad_accounts_name_the_variable_and_never_a_key(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    assert expected in str(err.value)
    assert "topsecret" not in str(err.value)


def test_a_worker_needs_a_key_per_account_but_the_exporter_does_not() -> None:
    env = {"REFRAME_FAL_ACCOUNTS": "a:3,b:4"}
    assert load_settings(env).slot_capacity == 7  # the exporter and the API read the pool only
    with pytest.raises(SettingsError, match="accounts a, b have no key: at most one may use FAL_KEY"):
        load_settings(env, require_fal_key=True)


def test_a_worker_against_real_fal_needs_every_account_keyed() -> None:
    env = {"REFRAME_FAL_QUEUE_URL": "https://queue.fal.run", "REFRAME_FAL_ACCOUNTS": "a:3,b:5"}
    with pytest.raises(SettingsError, match="FAL_KEY: required"):
        load_settings({**env, "REFRAME_FAL_ACCOUNT_KEYS": "a=x:y"}, require_fal_key=True)
    load_settings({**env, "REFRAME_FAL_ACCOUNT_KEYS": "a=x:y; b=z:w"}, require_fal_key=True)
