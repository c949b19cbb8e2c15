"""Settings come from defaults, a TOML file and the environment, in that order."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.settings import SettingsError, load_settings


def test_defaults_follow_the_national_rules() -> None:
    settings = load_settings(environ={})
    assert settings.province_code == "130000"
    assert settings.rules.grant_max_fen == 200_000
    assert settings.rules.grants_per_giver_per_day == 3
    assert settings.rules.grant_expiry_hour == 6
    assert settings.rules.max_receivers_per_giver is None
    assert settings.rules.health_checkups_allowed is False
    assert settings.rules.deduction_strategy == "filing_order"
    assert len(settings.rules.allowed_relation_types) == 8


def test_file_then_environment_override(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'province_code = "310000"\nnode_id = "prov-31"\nport = 8031\n'
        '[rules]\nmax_receivers_per_giver = 7\nallowed_relation_types = ["spouse", "parent", "child"]\n'
    )
    settings = load_settings(
        config,
        environ={
            "PLT_PORT": "9031",
            "PLT_RULES__HEALTH_CHECKUPS_ALLOWED": "true",
            "DATABASE_URL": "postgresql://u@db/x",
        },
    )
    assert (settings.province_code, settings.node_id, settings.port) == ("310000", "prov-31", 9031)
    assert settings.rules.max_receivers_per_giver == 7
    assert [t.value for t in settings.rules.allowed_relation_types] == ["spouse", "parent", "child"]
    assert settings.rules.health_checkups_allowed is True
    assert settings.database_url == "postgresql://u@db/x"


def test_unknown_environment_setting_is_refused() -> None:
    with pytest.raises(SettingsError, match="PLT_PROT"):
        load_settings(environ={"PLT_PROT": "1"})


def test_in_law_relation_type_is_not_a_setting(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[rules]\nallowed_relation_types = ["spouse", "father_in_law"]\n')
    with pytest.raises(SettingsError, match="father_in_law"):
        load_settings(config, environ={})


def test_wrong_type_is_refused() -> None:
    with pytest.raises(SettingsError, match="port"):
        load_settings(environ={"PLT_PORT": "eighty"})


def test_http_workers_are_a_setting_of_at_least_one() -> None:
    assert load_settings(environ={}).workers == 1
    assert load_settings(environ={"PLT_WORKERS": "3"}).workers == 3
    with pytest.raises(SettingsError, match="workers"):
        load_settings(environ={"PLT_WORKERS": "0"})
