"""The restore payload's no-op check: the stored zip is compared by its central directory, so a run
that changes nothing compresses nothing, and any change to a member still shows as drift."""
from __future__ import annotations

import pathlib
import zipfile

from ansible.module_utils.netloom import persist

FILES = [("ansible/modules/x.py", b"print(1)\n"), ("ansible/__init__.py", b""),
         ("ansible/module_utils/netloom/a.py", b"A = 1\n" * 100)]


def write(path: pathlib.Path, files: list[tuple[str, bytes]]) -> pathlib.Path:
    path.write_bytes(persist._zip_bytes(files))
    return path


def test_the_zip_written_for_the_files_holds_them(tmp_path: pathlib.Path) -> None:
    stored = write(tmp_path / "p.zip", FILES)
    assert persist._zip_holds(str(stored), FILES)
    assert persist._zip_holds(str(stored), list(reversed(FILES)))


def test_any_member_change_is_drift(tmp_path: pathlib.Path) -> None:
    stored = str(write(tmp_path / "p.zip", FILES))
    changed = [(name, data.replace(b"1", b"2")) for name, data in FILES]
    assert not persist._zip_holds(stored, changed)
    assert not persist._zip_holds(stored, FILES[:-1])
    assert not persist._zip_holds(stored, [*FILES, ("ansible/module_utils/netloom/b.py", b"")])
    assert not persist._zip_holds(stored, [(name.replace("x.py", "y.py"), data) for name, data in FILES])


def test_a_zip_written_otherwise_or_a_broken_file_is_drift(tmp_path: pathlib.Path) -> None:
    other = tmp_path / "stored.zip"
    with zipfile.ZipFile(other, "w", zipfile.ZIP_STORED) as archive:  # same contents, not our layout
        for name, data in FILES:
            archive.writestr(zipfile.ZipInfo(name, date_time=persist.ZIP_DATE), data)
    assert not persist._zip_holds(str(other), FILES)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip")
    assert not persist._zip_holds(str(broken), FILES)
    assert not persist._zip_holds(str(tmp_path / "missing.zip"), FILES)
