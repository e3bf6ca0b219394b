"""``kdcl --help`` and ``kdcl experiment --help`` read as plain text in a terminal: no reStructuredText markup
(issue 26 item 6)."""

import re

import pytest

from pyterrier_kdcl.experiment.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["experiment", "--help"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert "experiment" in text
    markup = re.findall(r"``|:\w+:`|\.\. \w+::|`[^`\s][^`]*`", text)
    assert not markup, f"help shows markup {markup}: write the docstring and help strings as plain text\n{text}"
