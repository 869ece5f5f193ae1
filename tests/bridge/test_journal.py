"""The in-flight journal: atomic, survives kill -9, arbitrates one submit per id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bridge.journal import ALCHEMY, GENERATION, Journal

REPO = Path(__file__).resolve().parents[2]


def test_add_finish_roundtrip(tmp_path):
    journal = Journal(tmp_path / "inflight.json")
    journal.add(["a", "b"], GENERATION)
    journal.add(["c"], ALCHEMY)
    assert json.loads((tmp_path / "inflight.json").read_text()).keys() == {"a", "b", "c"}
    journal.finish("a")
    assert Journal(tmp_path / "inflight.json").leftovers.keys() == {"b", "c"}
    assert Journal(tmp_path / "inflight.json").leftovers["c"]["family"] == ALCHEMY


def test_claim_succeeds_once_across_threads(tmp_path):
    journal = Journal(tmp_path / "inflight.json")
    journal.add(["x"], GENERATION)
    wins = []
    threads = [threading.Thread(target=lambda: wins.append(journal.claim("x"))) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1
    assert journal.claim("unknown") is False
    assert journal.unclaimed() == {}


def test_survives_kill_9_mid_write(tmp_path):
    path = tmp_path / "inflight.json"
    script = (
        "import sys, os\n"
        "from bridge.journal import Journal\n"
        f"j = Journal(__import__('pathlib').Path({str(path)!r}))\n"
        "j.add(['first'], 'generation')\n"
        "print('ready', flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    j.add([f'id{i}'], 'generation'); j.finish(f'id{i}'); i += 1\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    leftovers = Journal(path).leftovers
    # Whatever instant the kill hit, the file parses and still holds the id that was never finished.
    assert "first" in leftovers


def test_corrupt_journal_starts_empty(tmp_path, caplog):
    path = tmp_path / "inflight.json"
    path.write_text("{not json")
    assert Journal(path).leftovers == {}
    assert "unreadable" in caplog.text


def test_a_finished_id_cannot_be_claimed_again_and_is_forgotten(tmp_path):
    journal = Journal(tmp_path / "inflight.json")
    journal.add(["done"], GENERATION)
    assert journal.claim("done")
    journal.finish("done")
    assert journal.claim("done") is False
    assert journal._claimed == set()


def test_unsent_results_are_kept_until_finished_under_hashed_names(tmp_path):
    from bridge.jobs.base import Submission

    journal = Journal(tmp_path / "inflight.json")
    hostile = "../../etc/passwd\n\x1b[2J"  # ids come from the server: never a file name
    journal.add([hostile, "b"], GENERATION)
    result = Submission(job_id=hostile, seed=7, image=b"\x00webp", upload_url="https://r2/x?sig=1")
    journal.keep_result(hostile, GENERATION, 1234.5, result.to_record())
    journal.keep_result("b", GENERATION, 99.0, Submission(job_id="b", result={"caption": "x"}).to_record())
    files = sorted(p.name for p in journal.results_dir.iterdir())
    assert len(files) == 2 and all(len(name) == 37 and name.endswith(".json") for name in files)
    assert not (tmp_path.parent / "etc").exists()
    saved = Journal(tmp_path / "inflight.json").saved_results()
    assert saved[hostile]["expires_at"] == 1234.5
    assert Submission.from_record(saved[hostile]["submission"]) == result
    journal.finish(hostile)
    assert list(Journal(tmp_path / "inflight.json").saved_results()) == ["b"]
    (journal.results_dir / "junk.json").write_text("{not json")
    assert list(journal.saved_results()) == ["b"] and not (journal.results_dir / "junk.json").exists()


def test_claims_never_wait_for_the_disk_and_waiting_writes_share_one(tmp_path, monkeypatch):
    import bridge.journal as journal_module

    journal = Journal(tmp_path / "inflight.json")
    journal.add(["a"], GENERATION)
    real_write, writes = journal_module._write_atomic, []
    writing, disk = threading.Event(), threading.Event()

    def slow_write(path, data):  # a slow disk: the first write waits until `disk` is set
        writes.append(sorted(data))
        writing.set()
        assert disk.wait(10)
        real_write(path, data)

    monkeypatch.setattr(journal_module, "_write_atomic", slow_write)
    adding = threading.Thread(target=journal.add, args=(["b"], GENERATION))
    adding.start()
    assert writing.wait(10)
    assert journal.claim("a")  # while "b" is being written: no wait for the disk
    later = [threading.Thread(target=journal.add, args=([i], GENERATION)) for i in ("c", "d")]
    later.append(threading.Thread(target=journal.finish, args=("a",)))
    for thread in later:
        thread.start()
    deadline = time.monotonic() + 10
    while journal._version < 5 and time.monotonic() < deadline:  # all three changes made (a, b, c, d, -a)
        time.sleep(0.005)
    disk.set()
    for thread in [adding, *later]:
        thread.join(10)
    # The three changes made while the disk was busy went to it in one write, holding all of them.
    assert writes == [["a", "b"], ["b", "c", "d"]]
    assert Journal(tmp_path / "inflight.json").leftovers.keys() == {"b", "c", "d"}
