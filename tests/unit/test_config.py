"""DaemonConfig / AgentConfig: TOML file, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotwise.config import AgentConfig, ConfigError, DaemonConfig


def test_defaults_are_fast_and_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPOTWISE_STATE_DIR", str(tmp_path))
    config = DaemonConfig.load()
    assert config.listen == "127.0.0.1:7450"
    assert (config.heartbeat_interval_s, config.lease_s, config.settle_s) == (0.5, 2.0, 1.0)
    assert config.provider == "none"
    assert config.db_path == tmp_path / "spotwise.db"
    assert config.effective_log_dir == tmp_path / "logs"


def test_file_then_environment_then_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "spotwise.toml"
    path.write_text('[daemon]\nlease_s = 5.0\nsettle_s = 3.0\nprovider = "local"\n'
                    "[agent]\nslots = 4\n")
    monkeypatch.setenv("SPOTWISE_DAEMON_SETTLE_S", "0.5")
    config = DaemonConfig.load(path, provider="none")
    assert config.lease_s == 5.0  # from the file
    assert config.settle_s == 0.5  # the environment beats the file
    assert config.provider == "none"  # an argument beats both
    assert AgentConfig.load(path).slots == 4  # the same file, the other table


def test_a_file_without_tables_is_the_section_itself(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('daemon = "10.0.0.1:7450"\nslots = 2\n')
    assert AgentConfig.load(path).daemon == "10.0.0.1:7450"


def test_an_invalid_file_names_the_file_and_each_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nlease_s = "soon"\nsettle_s = -1\nflavour = 1\nprovider = "ec9"\n')
    with pytest.raises(ConfigError) as err:
        DaemonConfig.load(path)
    text = str(err.value)
    for field in ("lease_s", "settle_s", "flavour", "provider"):
        assert field in text
    assert str(path) in text


def test_cross_field_and_syntax_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lease_s"):
        DaemonConfig.load(None, heartbeat_interval_s=2.0, lease_s=1.0)
    with pytest.raises(ConfigError, match="listen must be host:port"):
        DaemonConfig.load(None, listen="nowhere")
    with pytest.raises(ConfigError, match="metrics_listen must be host:port"):
        AgentConfig.load(None, metrics_listen="9451")
    assert AgentConfig.load(None, metrics_listen="10.0.0.7:9451").metrics_listen == "10.0.0.7:9451"
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        DaemonConfig.load(broken)
    with pytest.raises(ConfigError, match="no such config file"):
        DaemonConfig.load(tmp_path / "missing.toml")
