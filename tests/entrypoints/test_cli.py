"""``pagedllm --help`` lists the commands that exist, and only those."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints import cli


def test_help_lists_only_real_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("serve", "generate", "bench", "plan"):
        assert command in text
    assert "chat" not in text  # there is no chat command (generate --chat renders a chat)
