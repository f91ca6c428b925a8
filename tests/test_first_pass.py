"""The first pass: a bulk import embedded with a static model while it is staged, searchable
at once, its stand-in vectors replaced batch by batch by the serving model's.

The first-pass model is real: the model2vec model distilled from the packaged files
(``static_model_dir`` in conftest.py). The registry is shared by the whole test database, so
the module registers it under its own prefix and removes it at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from worker import client
from worker.bookmarks import importer, segments
from worker.cli import progress_line
from worker.config import Settings, get_settings
from worker.db import queries
from worker.db.engine import session_scope
from worker.errors import ModelLifecycleError
from worker.ingest.static_embed import StaticModelEmbedder
from worker.models import activate, add_model, list_models, resume, retire
from worker.search import hybrid_search, semantic_search, text_search

FIRST = "fpt-minilm-static-256"
SERVING = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def first_pass_model(engine: Engine, static_model_dir: Path) -> Iterator[str]:
    result = add_model(engine, FIRST, path=str(static_model_dir), first_pass=True)
    assert result["state"] == "first_pass" and result["dimensions"] == 256
    try:
        yield FIRST
    finally:
        # Everything of the module's users goes, segments included (other tests count the
        # segments still waiting for their index).
        with session_scope() as s:
            jobs = (
                s.execute(text("SELECT id FROM import_job WHERE user_id LIKE 'fpt-%'"))
                .scalars()
                .all()
            )
            s.execute(text("DELETE FROM item WHERE user_id LIKE 'fpt-%'"))
            s.execute(text("DELETE FROM embedding WHERE model LIKE 'fpt-%'"))
            s.execute(text("DELETE FROM embedding_model WHERE name LIKE 'fpt-%'"))
        for job in jobs:
            segments.drop_segment(engine, job)
        with session_scope() as s:
            s.execute(text("DELETE FROM import_job WHERE user_id LIKE 'fpt-%'"))


@pytest.fixture
def user_id() -> str:
    return f"fpt-user-{uuid.uuid4().hex[:10]}"


def _settings(**extra: int) -> Settings:
    return get_settings().model_copy(
        update={
            "first_pass_min_bookmarks": 5,
            "bulk_segment_min_bookmarks": 5,
            "bookmark_batch_size": 5,
            **extra,
        }
    )


# Distinct subjects: a static model tells them apart at once (numbered copies of one title
# differ by a token or two, and their order then hung on the rest of the text).
TOPICS = [
    "Sourdough bread baking",
    "Kubernetes cluster upgrades",
    "Marathon training plan",
    "Watercolor painting lessons",
    "Solar panel installation",
    "Jazz piano chords",
    "Vegetable garden compost",
    "Rust borrow checker",
    "Mountain bike repair",
    "Chess opening theory",
    "Espresso coffee grinder",
    "Bird watching binoculars",
]


def _title(i: int) -> str:
    return f"{TOPICS[i % len(TOPICS)]} guide"


def _export(n: int) -> bytes:
    entries = "\n".join(
        f'    <DT><A HREF="https://site{i}.example.org/page">{_title(i)}</A>' for i in range(n)
    )
    return (
        "<!DOCTYPE NETSCAPE-Bookmark-file-1>\n<TITLE>Bookmarks</TITLE>\n<DL><p>\n"
        f"{entries}\n</DL><p>\n"
    ).encode()


def _stage(
    engine: Engine, upload_root: Path, user_id: str, n: int, settings: Settings
) -> tuple[int, list[int]]:
    path = upload_root / f"{user_id}-fp.html"
    path.write_bytes(_export(n))
    with session_scope() as s:
        job = queries.insert_import_job(s, user_id=user_id, filename=path.name, file_size=1)
    return job, importer.run_import(engine, settings, job)


def _rows_by_model(user_id: str) -> dict[str, int]:
    with session_scope() as s:
        return dict(
            s.execute(
                text("SELECT model, count(*) FROM embedding WHERE user_id = :u GROUP BY model"),
                {"u": user_id},
            ).all()
        )


def test_a_bulk_import_is_searchable_when_staged_and_the_serving_vectors_replace_the_first_pass(
    engine: Engine, upload_root: Path, user_id: str, first_pass_model: str
) -> None:
    settings = _settings()
    job, batches = _stage(engine, upload_root, user_id, 12, settings)
    assert len(batches) == 3
    with session_scope() as s:
        row = s.execute(
            text(
                "SELECT first_pass_at, first_pass_model, segment, processed FROM import_job "
                "WHERE id = :id"
            ),
            {"id": job},
        ).one()
        in_segment = s.execute(
            text(f"SELECT count(*) FROM embedding_s{job} WHERE model = :m AND user_id = :u"),
            {"m": first_pass_model, "u": user_id},
        ).scalar_one()
    # Staged, nothing embedded by the serving model yet, and already searchable.
    assert row.first_pass_at is not None and row.first_pass_model == first_pass_model
    progress = client.import_status(user_id, job)
    assert progress is not None and progress.searchable_at == row.first_pass_at
    assert "searchable: first pass done" in progress_line(progress)
    assert (row.segment, row.processed, in_segment) == (job, 0, 12)
    assert _rows_by_model(user_id) == {first_pass_model: 12}
    with session_scope() as s:
        hits = semantic_search(s, user_id, "rust borrow checker", limit=3)
        assert hits[0].title == _title(7)
        assert {h.why["model"] for h in hits} == {first_pass_model}
        assert semantic_search(s, f"{user_id}-other", "rust borrow checker") == []
        # The stand-ins carry no text (it made their COPY 2.2x slower): full text finds a
        # bookmark once its batch has written the real row.
        assert text_search(s, user_id, "guide") == []

    # One batch embedded: its items have the serving model's vectors and no stand-in left.
    assert importer.embed_batch(engine, settings, batches[0])["status"] == "done"
    assert _rows_by_model(user_id) == {first_pass_model: 7, SERVING: 5}
    with session_scope() as s:
        both = semantic_search(s, user_id, "guide", limit=12)
        assert len(both) == 12 and len({h.item_id for h in both}) == 12
        assert {h.why["model"] for h in both} == {first_pass_model, SERVING}
        # Pages of the merged list do not overlap and cover it.
        pages = [semantic_search(s, user_id, "guide", limit=4, offset=o) for o in (0, 4, 8)]
        assert [h.item_id for page in pages for h in page] == [h.item_id for h in both]
        # Each subject's own bookmark comes first, whether it has its real vector or still
        # its stand-in: the stand-ins are placed on the serving model's scale, not
        # interleaved by rank (which put the best stand-in level with the best real match).
        titles = dict(
            s.execute(text("SELECT id, title FROM item WHERE user_id = :u"), {"u": user_id}).all()
        )
        for item_id, title in titles.items():
            hits = semantic_search(s, user_id, title.removesuffix(" guide"), limit=4)
            assert hits[0].item_id == item_id, (title, [(h.title, h.why["model"]) for h in hits])
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            assert all(h.snippet for h in hits)  # a stand-in shows its title
        fused = hybrid_search(s, user_id, "jazz piano chords", limit=3)
        assert fused[0].title == _title(5)
        assert len(text_search(s, user_id, "guide", limit=12)) == 5

    for batch in batches[1:]:
        assert importer.embed_batch(engine, settings, batch)["status"] == "done"
    assert _rows_by_model(user_id) == {SERVING: 12}
    with session_scope() as s:
        hits = semantic_search(s, user_id, "rust borrow checker", limit=3)
        assert hits[0].title == _title(7)
        assert {h.why["model"] for h in hits} == {SERVING}


def test_imports_below_the_threshold_or_with_it_off_get_no_first_pass(
    engine: Engine, upload_root: Path, user_id: str, first_pass_model: str
) -> None:
    for n, settings in ((4, _settings()), (12, _settings(first_pass_min_bookmarks=0))):
        job, batches = _stage(engine, upload_root, f"{user_id}-{n}", n, settings)
        assert batches
        with session_scope() as s:
            assert (
                s.execute(
                    text("SELECT first_pass_at FROM import_job WHERE id = :id"), {"id": job}
                ).scalar_one()
                is None
            )
        assert _rows_by_model(f"{user_id}-{n}") == {}


def test_a_first_pass_that_fails_leaves_the_import_staged_without_it(
    engine: Engine,
    upload_root: Path,
    user_id: str,
    first_pass_model: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The model's files gone from this worker: the staging commits, batches and all."""
    from worker import runtime

    def missing(*args: object) -> None:
        raise OSError("model.safetensors: No such file or directory")

    monkeypatch.setattr(runtime, "embedder_for_model", missing)
    job, batches = _stage(engine, upload_root, user_id, 12, _settings())
    assert len(batches) == 3
    with session_scope() as s:
        row = s.execute(
            text("SELECT status, first_pass_at, created_count FROM import_job WHERE id = :id"),
            {"id": job},
        ).one()
    assert (row.status, row.first_pass_at, row.created_count) == ("processing", None, 12)
    assert _rows_by_model(user_id) == {}
    assert "first pass with " + first_pass_model + " failed" in caplog.text
    assert "No such file" in caplog.text


def test_the_first_pass_model_is_never_served_or_backfilled_and_retiring_it_removes_its_rows(
    engine: Engine,
    upload_root: Path,
    user_id: str,
    first_pass_model: str,
    static_model_dir: Path,
) -> None:
    with pytest.raises(ModelLifecycleError, match="is the first-pass model"):
        add_model(engine, "fpt-second", path=str(static_model_dir), first_pass=True)
    with pytest.raises(ModelLifecycleError, match="first-pass model"):
        activate(engine, first_pass_model)
    with pytest.raises(ModelLifecycleError, match="never backfilled"):
        resume(engine, first_pass_model)
    listed = {m["name"]: m for m in list_models(engine)}[first_pass_model]
    assert (listed["state"], listed["ready"], listed["backfill"]) == ("first_pass", False, None)

    _stage(engine, upload_root, user_id, 6, _settings())
    assert _rows_by_model(user_id) == {first_pass_model: 6}
    report = retire(engine, first_pass_model)
    assert report["was"] == "first_pass" and report["deleted_rows"] >= 6
    assert _rows_by_model(user_id) == {}
    with session_scope() as s:
        # Items with no vector of any searchable model are simply not found yet.
        assert semantic_search(s, user_id, "marathon training") == []
    # Registered again for the other tests of the module.
    add_model(engine, first_pass_model, path=str(static_model_dir), first_pass=True)


def test_the_static_encoder_gives_model2vec_s_own_vectors(static_model_dir: Path) -> None:
    """The fast path (``_token_sums``: words split here, a sparse product) against
    ``StaticModel.encode`` itself, on texts that exercise its edges: empty, only unknown
    characters, longer than the cut, unknown tokens near it, added tokens, punctuation."""
    embedder = StaticModelEmbedder(str(static_model_dir), name="t", batch_size=3)
    texts = [
        "Sourdough bread rises overnight",
        "",
        "\u4e00\u4e01",
        "word " * 5000,
        "tags: vector, search\nfolder: Reading / Later",
        "\x00",
        "naïve café",
        # Unknown tokens count towards the 512 before they are dropped: a word of over 100
        # characters is one [UNK], so "b" is cut here.
        "x" * 101 + " a" * 511 + " b",
        # Added tokens are matched in the raw text, before the words are split.
        "Padding with [PAD]",
        "a literal [UNK] here",
        "tabs\tand\nnew lines, punctuation: (a) {b} [c] 'd' \"e\" #f ~g",
    ]
    ours = embedder.encode(texts)
    theirs = np.asarray(
        embedder.model.encode(texts, normalize=False, use_multiprocessing=False),
        dtype=np.float32,
    )
    norms = np.linalg.norm(theirs, axis=1)
    empty = norms == 0
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # Texts without a known token get the fixed uniform vector (see encode).
    assert np.allclose(ours[empty], 1.0 / np.sqrt(embedder.dimensions))
    cosine = (ours[~empty] * (theirs[~empty] / norms[~empty, None])).sum(axis=1)
    assert cosine.min() > 0.9999
    # Token for token, where the words are split here: the tokenizer's own ids.
    plain = [t for t in texts if embedder._splittable(t)]
    assert "x" * 101 + " a" * 511 + " b" in plain and "Padding with [PAD]" not in plain
    for text_ in plain:
        flat, lengths = embedder._kept(*embedder._word_pieces([text_]))
        assert flat.tolist() == list(embedder.model.tokenize([text_])[0]), text_[:40]
        assert lengths.tolist() == [flat.size]
