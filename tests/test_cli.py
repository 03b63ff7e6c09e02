"""The `open360` dispatcher: usage errors go to stderr with exit status 2 and say what was wrong."""

from __future__ import annotations

import pytest

from open360.cli import main


@pytest.mark.parametrize(("argv", "says"), [
    ([], "open360: no command given"),
    (["data"], "open360 data: no verb given"),
    (["nope"], "open360: unknown command group 'nope' (groups: analysis, ckpt, data)"),
    (["nope", "--help"], "open360: unknown command group 'nope'"),
    (["data", "nope"], "open360: unknown command 'data nope'"),
])
def test_a_usage_error_says_what_on_stderr_with_status_2(argv, says, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(says) and "usage: open360" in err and out == ""


def test_a_group_without_a_verb_lists_that_groups_verbs(capsys):
    assert main(["ckpt"]) == 2
    err = capsys.readouterr().err
    assert "open360 ckpt pull" in err and "open360 data build" not in err


def test_help_lists_the_verbs_on_stdout_with_status_0(capsys):
    assert main(["ckpt", "--help"]) == 0
    out, err = capsys.readouterr()
    assert "open360 ckpt pull" in out and "open360 data build" not in out and err == ""
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert "open360 ckpt pull" in out and "open360 data build" in out and err == ""
