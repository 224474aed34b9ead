"""The DTYPELAB_* environment settings (``dtypelab.settings``): one table, each value checked, and the CLI
stopping on a bad one before a command starts."""

from __future__ import annotations

import pytest

from dtypelab import settings
from dtypelab.cli import main
from dtypelab.errors import SettingError


def test_unset_settings_take_their_defaults(monkeypatch):
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert settings.value("DTYPELAB_MSE_KERNEL") == "auto"
    assert settings.value("DTYPELAB_CACHE") is None


def test_a_value_outside_the_choices_is_one_error_naming_them(monkeypatch):
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "fast")
    with pytest.raises(SettingError, match=r"DTYPELAB_MSE_KERNEL='fast' .*set one of auto, always, never"):
        settings.value("DTYPELAB_MSE_KERNEL")
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "never")
    assert settings.value("DTYPELAB_MSE_KERNEL") == "never"
    monkeypatch.setenv("DTYPELAB_CACHE", "/any/folder")  # free text: any value
    settings.check_all()


def test_the_cli_stops_on_a_bad_setting_before_the_command_runs(monkeypatch, capsys):
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "bogus")
    with pytest.raises(SystemExit) as exited:
        main(["inspect", "dummy"])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err.count("\n") == 1 and "DTYPELAB_MSE_KERNEL='bogus'" in err and "Traceback" not in err


def test_help_still_works_with_a_bad_setting(monkeypatch, capsys):
    monkeypatch.setenv("DTYPELAB_MSE_KERNEL", "bogus")
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "Usage" in capsys.readouterr().out
