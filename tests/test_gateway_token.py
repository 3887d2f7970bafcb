"""The install's API token: made once, kept, and safe to paste after `densecap submit --token`."""

from __future__ import annotations

import stat

from gateway import auth


def test_a_new_token_never_starts_with_a_dash(monkeypatch):
    drawn = iter(["-starts-with-a-dash", "-again", "fine_token-with-dash-inside"])
    monkeypatch.setattr(auth.secrets, "token_urlsafe", lambda n: next(drawn))
    assert auth.new_token() == "fine_token-with-dash-inside"
    monkeypatch.undo()
    tokens = [auth.new_token() for _ in range(2000)]  # a leading dash would be drawn ~31 times in 2000
    assert not any(t.startswith("-") for t in tokens) and len(set(tokens)) == 2000


def test_the_token_is_made_once_and_kept_private(tmp_path):
    token = auth.load_or_create_token(tmp_path / "state")
    assert auth.load_or_create_token(tmp_path / "state") == token
    assert stat.S_IMODE((tmp_path / "state" / "token").stat().st_mode) == 0o600
