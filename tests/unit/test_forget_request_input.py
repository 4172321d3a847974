"""Forget-request input (issue 8): an empty id item is an error, and an id already requested names its request."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import EXIT_INPUT, main
from pipeline.config import Config
from pipeline.storage.ledger import ForgetRequestError, Ledger, parse_ids


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path)
    ids = np.arange(50, dtype=np.int64)
    led.write_assignments({"sample_id": ids, "shard": ids % 2, "slice": (ids // 2) % 3, "label": ids % 10})
    return led


@pytest.mark.parametrize("text, expected", [
    ("2,3,4", [2, 3, 4]),
    (" 2 , 3,4  ", [2, 3, 4]),  # spaces around ids
    ("2\n3\n4\n", [2, 3, 4]),  # one id per line, the file's final newline
    ("2\r\n3\r\n4\r\n", [2, 3, 4]),  # Windows line ends
    ("2,3\n4 \n  ", [2, 3, 4]),  # trailing whitespace
    ("7", [7]),
])
def test_well_formed_ids_parse(text, expected):
    assert parse_ids(text) == expected


@pytest.mark.parametrize("text, where", [
    ("2,,4", "an empty item at position 2"),
    (",2,4", "an empty item at position 1"),  # "$A,2,4" with A unset
    ("2,4,", "an empty item at position 3"),  # "2,4,$B" with B unset
    ("2, ,4", "an empty item at position 2"),
    ("2\n\n4\n", "a blank line at line 2"),  # a file with a lost id in the middle
    ("\n2\n4\n", "a blank line at line 1"),
    ("2\n4\n\n", "a blank line at line 3"),  # only one final newline is a file's end
    ("2\n4,,5\n", "an empty item at line 2, position 2"),
])
def test_an_empty_item_is_an_error_naming_where(text, where):
    with pytest.raises(ForgetRequestError, match=where) as info:
        parse_ids(text, source="--ids")
    message = str(info.value)
    assert "\n" not in message and "nothing was requested" in message and message.startswith("--ids")


@pytest.mark.parametrize("text", ["", "   ", "\n", " \n "])
def test_an_empty_request_is_an_error(text):
    with pytest.raises(ForgetRequestError, match="is empty .*nothing was requested"):
        parse_ids(text)


def test_the_message_shows_a_short_single_line_input_only():
    with pytest.raises(ForgetRequestError) as info:
        parse_ids("2,,4", source="--ids")
    assert str(info.value).startswith("--ids '2,,4' has an empty item at position 2 (")
    with pytest.raises(ForgetRequestError) as info:
        parse_ids("2\n\n4\n", source="--ids-file ids.txt")
    assert str(info.value).startswith("--ids-file ids.txt has a blank line at line 2 (")


def test_already_requested_ids_name_their_request_and_status(ledger):
    done = ledger.append_request([17, 3])
    ledger.mark_done(done, {0: 1, 1: 1})
    pending = ledger.append_request([42])
    with pytest.raises(ForgetRequestError) as info:
        ledger.validate([42, 5, 17])
    message = str(info.value)
    assert f"ids already forgotten or pending: 17 (request {done} done), 42 (request {pending} pending)" in message
    assert "\n" not in message and "5 (" not in message
    assert ledger.holders([3, 5, 42]) == {3: (done, "done"), 42: (pending, "pending")}
    ledger.validate([5])  # a fresh id is still accepted


def test_already_requested_lists_at_most_ten_ids(ledger):
    rid = ledger.append_request(list(range(12)))
    with pytest.raises(ForgetRequestError) as info:
        ledger.validate(list(range(12)))
    message = str(info.value)
    assert message.count(f"(request {rid} pending)") == 10 and "and 2 more" in message


def test_already_requested_is_reported_beside_other_problems(ledger):
    rid = ledger.append_request([1])
    with pytest.raises(ForgetRequestError) as info:
        ledger.validate([1, 99])
    message = str(info.value)
    assert "not in this run's private training set [99]" in message and f"1 (request {rid} pending)" in message


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def run_dir(tmp_path, ledger):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(Config().to_dict(), sort_keys=False))
    return tmp_path


def test_cli_refuses_an_empty_item_with_exit_3_and_one_line(capsys, run_dir, ledger):
    line = _cli_error(capsys, ["forget", "--run-dir", str(run_dir), "--ids", "2,,4"])
    assert line.startswith("dpsisa forget: error: ") and "empty item at position 2" in line
    ids_file = run_dir / "ids.txt"
    ids_file.write_text("2\n\n4\n")
    line = _cli_error(capsys, ["forget", "--run-dir", str(run_dir), "--ids-file", str(ids_file)])
    assert "a blank line at line 2" in line
    assert not (Path(ledger.dir) / "requests.parquet").exists()  # nothing was requested


def test_cli_refuses_an_already_requested_id_with_exit_3_naming_the_request(capsys, run_dir, ledger):
    rid = ledger.append_request([4])
    line = _cli_error(capsys, ["forget", "--run-dir", str(run_dir), "--ids", "4, 6"])
    assert f"4 (request {rid} pending)" in line and "6 (" not in line
    assert ledger.pending() == {rid: [4]}  # nothing changed
