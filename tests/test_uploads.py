"""Upload ingestion through a real Celery worker, the real model and the real database."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from worker import client
from worker.app import TASK_PROCESS_UPLOAD, app
from worker.db import queries
from worker.db.engine import session_scope
from worker.errors import SourceError
from worker.fixtures import blank_pdf, encrypt_pdf, make_docx, make_pdf, rezip

pytestmark = pytest.mark.integration

PROSE = (
    "The river town grew around its mill. Farmers brought grain from the hills every autumn, "
    "and the miller kept careful accounts of each sack.\n\n"
    "When the railway arrived, the mill lost its trade to the city factories. The town turned "
    "to tourism, and the old mill became a museum about bread and water power."
)


def write(root: Path, rel: str, data: bytes | str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def wait_done(user_id: str, ids: list[int], timeout: float = 240) -> dict[int, dict]:  # type: ignore[type-arg]
    client.wait_for_items(user_id, ids, timeout=timeout, poll=0.3)
    out = {}
    for item_id in ids:
        status = client.item_status(user_id, item_id)
        assert status is not None
        out[item_id] = status
    return out


def counts(item_id: int) -> tuple[int, int]:
    with session_scope() as s:
        analyses = s.execute(
            text("SELECT count(*) FROM analysis WHERE item_id = :i"), {"i": item_id}
        ).scalar_one()
        vectors = s.execute(
            text("SELECT count(*) FROM embedding WHERE item_id = :i"), {"i": item_id}
        ).scalar_one()
    return analyses, vectors


def raw_enqueue(user_id: str, rel_path: str) -> int:
    """Register a row as a producer that skipped the client's checks would, and send it."""
    with session_scope() as s:
        item_id = queries.insert_upload(
            s,
            user_id=user_id,
            file_path=rel_path,
            filename=Path(rel_path).name,
            original_filename=None,
            file_size=None,
            mime_type=None,
        )
    app.send_task(TASK_PROCESS_UPLOAD, args=[item_id])
    return item_id


def mixed_folder(root: Path) -> dict[str, Path]:
    return {
        "txt": write(root, "mixed/notes.txt", PROSE),
        "md": write(root, "mixed/readme.md", "# The Mill\n\n" + PROSE),
        "html": write(
            root,
            "mixed/page.html",
            "<html><head><title>Mill history</title><script>var x=1</script></head><body>"
            "<nav>Home | About</nav><main><h1>Mill history</h1><p>"
            + PROSE.replace("\n\n", "</p><p>")
            + "</p></main></body></html>",
        ),
        "pdf": write(root, "mixed/report.pdf", make_pdf("Quarterly grain report for the mill")),
        "docx": write(root, "mixed/letter.docx", make_docx(title="Letter", body=PROSE)),
        "json": write(
            root, "mixed/data.json", json.dumps({"mill": {"name": "Old Mill", "story": PROSE}})
        ),
        "csv": write(root, "mixed/sacks.csv", "farmer,sacks\nAnna,12\nBruno,7\n"),
    }


def test_client_does_not_import_torch(service_urls) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    code = (
        "import sys, worker.client, worker.search; "
        "bad = [m for m in ('torch', 'sentence_transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_client_refuses_paths_outside_root(upload_root: Path, user_id: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    with pytest.raises(SourceError, match="outside the upload root"):
        client.enqueue_upload(user_id, outside)
    with pytest.raises(SourceError, match="outside the upload root"):
        client.enqueue_upload(user_id, "../../etc/passwd")
    link = upload_root / f"{user_id}-link.txt"
    link.symlink_to(outside)
    with pytest.raises(SourceError, match="outside the upload root"):
        client.enqueue_upload(user_id, link.name)


def test_mixed_folder_processes_once_and_rerun_adds_nothing(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    files = mixed_folder(upload_root / user_id)
    ids = {kind: client.enqueue_upload(user_id, path) for kind, path in files.items()}
    statuses = wait_done(user_id, list(ids.values()))
    for kind, item_id in ids.items():
        st = statuses[item_id]
        assert st["status"] == "done", (kind, st, celery_worker.log()[-3000:])
        assert st["analysis_version"] == 1 and st["chunks"] >= 1, (kind, st)
    assert statuses[ids["html"]]["title"] == "Mill history"
    with session_scope() as s:
        html_text = s.execute(
            text("SELECT string_agg(content, ' ') FROM embedding WHERE item_id = :i"),
            {"i": ids["html"]},
        ).scalar_one()
    assert "railway" in html_text and "Home | About" not in html_text and "var x" not in html_text
    before = {i: counts(i) for i in ids.values()}

    again = {kind: client.enqueue_upload(user_id, path) for kind, path in files.items()}
    assert again == ids  # the same items, queued again: no duplicates
    statuses = wait_done(user_id, list(ids.values()))
    assert all(st["status"] == "done" for st in statuses.values())
    assert {i: counts(i) for i in ids.values()} == before


def test_an_unchanged_reupload_is_a_no_op_until_the_analyzer_changes(
    upload_root: Path, user_id: str
) -> None:
    """In-process, so each attempt's outcome can be read: an unchanged file is marked done
    from what its claim read (no parse, no model); another analyzer analyses it again."""
    from worker.config import get_settings
    from worker.ingest.process import process_upload

    path = write(upload_root, f"{user_id}/same.txt", PROSE)
    rel = str(path.relative_to(upload_root))

    def register() -> int:  # what the client does, without sending a message
        with session_scope() as s:
            return queries.insert_upload(
                s,
                user_id=user_id,
                file_path=rel,
                filename="same.txt",
                original_filename=None,
                file_size=None,
                mime_type=None,
            )

    settings = get_settings().model_copy(
        update={"analysis_provider": "off", "upload_root": upload_root}
    )
    item_id = register()
    assert process_upload(item_id, settings=settings).status == "done"
    before = counts(item_id)
    assert register() == item_id
    assert process_upload(item_id, settings=settings).status == "unchanged"
    assert counts(item_id) == before
    assert register() == item_id
    local = settings.model_copy(update={"analysis_provider": "local"})
    assert process_upload(item_id, settings=local).status == "done"
    assert counts(item_id)[0] == before[0] + 1  # a second analysis version
    assert client.item_status(user_id, item_id)["status"] == "done"  # type: ignore[index]


def test_changed_content_gives_new_version_and_replaces_vectors(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    path = write(upload_root, f"{user_id}/doc.txt", PROSE)
    item_id = client.enqueue_upload(user_id, path)
    wait_done(user_id, [item_id])
    path.write_text("A completely different text about volcanoes and lava flows in Iceland.")
    assert client.enqueue_upload(user_id, path) == item_id
    st = wait_done(user_id, [item_id])[item_id]
    assert st["status"] == "done" and st["analysis_version"] == 2
    with session_scope() as s:
        contents = (
            s.execute(
                text("SELECT content FROM embedding WHERE item_id = :i AND chunk_index >= 0"),
                {"i": item_id},
            )
            .scalars()
            .all()
        )
    assert contents and all("volcano" in c for c in contents)


def test_redelivery_after_a_crash_writes_each_row_once(
    celery_worker, upload_root: Path, user_id: str, engine
) -> None:  # type: ignore[no-untyped-def]
    from worker.ingest import store

    path = write(upload_root, f"{user_id}/crash.md", "# Crash\n\n" + PROSE)
    with session_scope() as s:
        item_id = queries.insert_upload(
            s,
            user_id=user_id,
            file_path=str(path.relative_to(upload_root)),
            filename=path.name,
            original_filename=None,
            file_size=None,
            mime_type=None,
        )
    # A worker claimed it and died before writing; then the message comes back twice.
    assert store.claim_upload(engine, item_id, max_attempts=5).claim is not None
    app.send_task(TASK_PROCESS_UPLOAD, args=[item_id])
    app.send_task(TASK_PROCESS_UPLOAD, args=[item_id])
    st = wait_done(user_id, [item_id])[item_id]
    time.sleep(1.0)  # let the second delivery finish too
    assert st["status"] == "done"
    analyses, vectors = counts(item_id)
    assert analyses == 1
    with session_scope() as s:
        dupes = s.execute(
            text(
                "SELECT count(*) FROM (SELECT chunk_index FROM embedding WHERE item_id = :i "
                "GROUP BY model, chunk_index HAVING count(*) > 1) d"
            ),
            {"i": item_id},
        ).scalar_one()
    assert dupes == 0 and vectors == st["chunks"] + 1


def test_bad_inputs_each_get_their_message_and_others_complete(
    celery_worker, upload_root: Path, user_id: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    base = upload_root / user_id / "bad"
    pdf = make_pdf("Some text that will be cut")
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    big = base / "huge.txt"
    base.mkdir(parents=True, exist_ok=True)
    with big.open("wb") as fh:  # sparse: over the 50 MB cap without writing 50 MB
        fh.truncate(60 * 1024 * 1024)
    (base / "escape.txt").symlink_to(outside)
    cases: dict[str, tuple[str, str, str]] = {
        # name: (relative path, expected status, expected words in the error)
        "empty": (str(write(base, "empty.txt", b"")), "skipped", "empty"),
        "garbage": (str(write(base, "garbage.txt", os.urandom(4096))), "failed", "binary"),
        "truncated_pdf": (str(write(base, "cut.pdf", pdf[: len(pdf) // 2])), "failed", "pdf"),
        "encrypted_pdf": (
            str(write(base, "locked.pdf", encrypt_pdf(pdf, "pw"))),
            "failed",
            "encrypted",
        ),
        "scanned_pdf": (str(write(base, "scan.pdf", blank_pdf())), "skipped", "ocr"),
        "too_big": (str(big), "failed", "MAX_UPLOAD_BYTES"),
        "outside": ("../../../../etc/hostname", "failed", "outside"),
        "symlink_escape": (str(base / "escape.txt"), "failed", "outside"),
        "deleted": (str(base / "gone.txt"), "failed", "deleted"),
        "scripts_only": (
            str(write(base, "scripts.html", "<html><script>alert(1)</script></html>")),
            "skipped",
            "no text",
        ),
        "deep_json": (
            str(write(base, "deep.json", "[" * 100_000 + "]" * 100_000)),
            "failed",
            "nested",
        ),
        "zip_bomb": (
            str(write(base, "bomb.docx", rezip(make_docx(body=PROSE), add=300 * 1024 * 1024))),
            "failed",
            "zip bomb",
        ),
    }
    good = {
        "latin1": write(
            base, "latin1.txt", "Un café très animé à Montréal, près du fleuve.".encode("latin-1")
        ),
        "utf16": write(
            base, "utf16.txt", "Grüße aus Köln am Rhein, wo der Dom steht.".encode("utf-16")
        ),
    }
    ids: dict[str, int] = {}
    for name, (path, _, _) in cases.items():
        rel = os.path.relpath(path, upload_root) if os.path.isabs(path) else path
        ids[name] = raw_enqueue(user_id, rel)
    for name, path in good.items():
        ids[name] = client.enqueue_upload(user_id, path)
    # An id that does not exist: logged and dropped, never retried forever.
    app.send_task(TASK_PROCESS_UPLOAD, args=[987654321])
    statuses = wait_done(user_id, list(ids.values()))
    for name, (_, status, words) in cases.items():
        st = statuses[ids[name]]
        assert st["status"] == status, (name, st)
        assert words.lower() in (st["error"] or "").lower(), (name, st["error"])
    for name in good:
        assert statuses[ids[name]]["status"] == "done", (name, statuses[ids[name]])
    with session_scope() as s:
        latin = s.execute(
            text("SELECT string_agg(content, ' ') FROM embedding WHERE item_id = :i"),
            {"i": ids["latin1"]},
        ).scalar_one()
    assert "café très animé" in latin
    assert "not yours" not in json.dumps(statuses, default=str)
    assert celery_worker.proc.poll() is None  # the worker lives on


def test_deleted_item_leaves_listings_and_search_and_is_per_user(
    celery_worker, upload_root: Path, user_id: str
) -> None:  # type: ignore[no-untyped-def]
    from worker import search

    path = write(upload_root, f"{user_id}/delete-me.md", "# Volcanoes\n\n" + PROSE)
    item_id = client.enqueue_upload(user_id, path)
    wait_done(user_id, [item_id])
    with session_scope() as s:
        assert any(hit.item_id == item_id for hit in search.text_search(s, user_id, "river mill"))
    assert not client.delete_item(user_id + "-other", item_id)  # not theirs
    assert client.item_status(user_id, item_id) is not None
    assert client.delete_item(user_id, item_id)
    assert not client.delete_item(user_id, item_id)  # already deleted
    assert client.item_status(user_id, item_id) is None
    assert all(row["id"] != item_id for row in client.list_items(user_id))
    with session_scope() as s:
        hits = search.text_search(s, user_id, "river mill")
    assert all(hit.item_id != item_id for hit in hits)
