"""Settings: the documented example, environment overrides, --set, clear errors."""

from pathlib import Path

import pytest

from bot.config import Settings, load_settings
from bot.errors import InputNotFoundError, UsageError

EXAMPLE = Path(__file__).resolve().parent.parent / "safeguard.example.toml"


def test_the_example_file_is_the_defaults():
    """Every key documented, with the default value: the example cannot drift from the code."""
    example = load_settings(EXAMPLE)
    assert example == Settings()
    import tomllib

    documented = tomllib.loads(EXAMPLE.read_text())
    assert set(documented) == set(Settings.model_fields)


def test_precedence_file_then_environment_then_set(tmp_path, monkeypatch):
    path = tmp_path / "s.toml"
    path.write_text('[ledger]\nurl = "sqlite:///file.db"\n[watch]\nmax_candidates = 5\n')
    assert load_settings(path).ledger.url == "sqlite:///file.db"
    monkeypatch.setenv("SAFEGUARD_LEDGER_URL", "sqlite:///env.db")
    monkeypatch.setenv("SAFEGUARD_WATCH_MAX_MODEL_GB", "3.5")
    monkeypatch.setenv("SAFEGUARD_TEST_SOMETHING", "not a setting")  # other prefixes ignored
    s = load_settings(path)
    assert s.ledger.url == "sqlite:///env.db" and s.watch.max_model_gb == 3.5
    assert s.watch.max_candidates == 5
    s = load_settings(path, ["ledger.url=sqlite:///set.db", "watch.bases=org/base-it"])
    assert s.ledger.url == "sqlite:///set.db" and s.watch.bases == ["org/base-it"]


def test_errors_name_the_setting(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="watch.max_candidates"):
        load_settings(None, ["watch.max_candidates=0"])
    with pytest.raises(UsageError, match="SECTION.KEY=VALUE"):
        load_settings(None, ["nosection=1"])
    with pytest.raises(InputNotFoundError):
        load_settings(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[watch\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_settings(tmp_path / "bad.toml")
    monkeypatch.setenv("SAFEGUARD_WATCH_TYPO", "1")
    with pytest.raises(UsageError, match="watch.typo"):
        load_settings()
