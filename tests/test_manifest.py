"""pipeline.manifest: AVEC2013 / AVEC2014 / CSV adapters and validation.

Video files here are empty placeholders: building a manifest never opens videos (a missing or
broken video is found later, per video, by the decoder).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.manifest import (ManifestError, format_manifest_report, is_safe_video_id, load_manifest,
                               manifest_from_videos, manifest_report, validate_manifest,
                               write_manifest_csv)
from pipeline.schema import MANIFEST_SCHEMA


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_avec2014(root: Path, labels_top_level: bool = False) -> Path:
    layout = {"Training": {"203": 17, "205": 3}, "Development": {"301": 30}, "Testing": {"401": None}}
    for split_folder, subjects in layout.items():
        for subject, label in subjects.items():
            for task in ("Freeform", "Northwind"):
                touch(root / split_folder / task / f"{subject}_1_{task}_video.mp4")
            if label is not None:
                folder = root / "AllLabels" if labels_top_level else root / split_folder / "DepressionLabels"
                touch(folder / f"{subject}_1_Depression.csv", f"{label}\n")
    touch(root / "Training" / "README.txt", "ignored")
    return root


@pytest.mark.parametrize("labels_top_level", [False, True])
def test_avec2014_layout(tmp_path, labels_top_level):
    root = make_avec2014(tmp_path / "AVEC2014", labels_top_level)
    table = load_manifest("avec2014", str(root))
    assert table.schema == MANIFEST_SCHEMA
    rows = {r["video_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["203_1_Freeform", "203_1_Northwind", "205_1_Freeform", "205_1_Northwind",
                            "301_1_Freeform", "301_1_Northwind", "401_1_Freeform", "401_1_Northwind"]
    assert rows["203_1_Northwind"] == {
        "video_id": "203_1_Northwind", "subject_id": "203", "split": "train", "label": 17.0,
        "uri": str(root / "Training" / "Northwind" / "203_1_Northwind_video.mp4"), "task": "Northwind"}
    assert rows["301_1_Freeform"]["split"] == "dev" and rows["301_1_Freeform"]["label"] == 30.0
    assert rows["401_1_Freeform"]["split"] == "test" and rows["401_1_Freeform"]["label"] is None
    assert table.column("split").to_pylist()[:4] == ["train"] * 4  # ordered train, dev, test


def test_avec2013_layout(tmp_path):
    root = tmp_path / "AVEC2013"
    touch(root / "Training" / "203_1_cut_video.mp4")
    touch(root / "Training" / "204_2_video.mp4")
    touch(root / "Development" / "310_1.avi")
    touch(root / "Testing" / "402_1_cut_video.mp4")
    touch(root / "Training" / "Labels" / "203_1_Depression.csv", "22")
    touch(root / "Training" / "Labels" / "204_2_Depression.csv", "5.0\n")
    touch(root / "Development" / "310_1_Depression.csv", "40\n")
    rows = {r["video_id"]: r for r in load_manifest("avec2013", str(root)).to_pylist()}
    assert rows == {
        "203_1": {"video_id": "203_1", "subject_id": "203", "split": "train", "label": 22.0,
                  "uri": str(root / "Training" / "203_1_cut_video.mp4"), "task": None},
        "204_2": {"video_id": "204_2", "subject_id": "204", "split": "train", "label": 5.0,
                  "uri": str(root / "Training" / "204_2_video.mp4"), "task": None},
        "310_1": {"video_id": "310_1", "subject_id": "310", "split": "dev", "label": 40.0,
                  "uri": str(root / "Development" / "310_1.avi"), "task": None},
        "402_1": {"video_id": "402_1", "subject_id": "402", "split": "test", "label": None,
                  "uri": str(root / "Testing" / "402_1_cut_video.mp4"), "task": None},
    }


def test_empty_folder_is_a_manifest_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no videos found"):
        load_manifest("avec2014", str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match="not a folder"):
        load_manifest("avec2014", str(tmp_path / "absent"))
    with pytest.raises(ManifestError, match="unknown dataset"):
        load_manifest("avec2099", str(tmp_path))


def test_unreadable_label_file_names_the_rows(tmp_path):
    root = make_avec2014(tmp_path / "A")
    touch(root / "Training" / "DepressionLabels" / "205_1_Depression.csv", "n/a")
    with pytest.raises(ManifestError) as caught:
        load_manifest("avec2014", str(root))
    message = str(caught.value)
    assert "'205_1_Freeform'" in message and "'205_1_Northwind'" in message and "holds no number" in message


def test_csv_manifest(tmp_path):
    csv_path = touch(tmp_path / "lists" / "manifest.csv", (
        "video_id,subject_id,split,label,uri,task,site\n"
        "a,s1,train,10,videos/a.mp4,Freeform,X\n"
        "b,s2,dev,,/abs/b.mp4,,Y\n"
        "c,s3,test,63,s3://bucket/c.mp4,,Z\n"))
    table = load_manifest("csv", str(csv_path))
    assert table.schema == MANIFEST_SCHEMA
    assert table.to_pylist() == [
        {"video_id": "a", "subject_id": "s1", "split": "train", "label": 10.0,
         "uri": str(tmp_path / "lists" / "videos" / "a.mp4"), "task": "Freeform"},
        {"video_id": "b", "subject_id": "s2", "split": "dev", "label": None, "uri": "/abs/b.mp4", "task": None},
        {"video_id": "c", "subject_id": "s3", "split": "test", "label": 63.0,
         "uri": "s3://bucket/c.mp4", "task": None},
    ]
    # missing video files are not a manifest problem: they are found later, per video
    assert not (tmp_path / "lists" / "videos" / "a.mp4").exists()


def test_csv_without_header_or_required_columns(tmp_path):
    headerless = touch(tmp_path / "m.csv", "a,s1,train,10,a.mp4\n")
    with pytest.raises(ManifestError, match="header"):
        load_manifest("csv", str(headerless))
    with pytest.raises(ManifestError, match="not found"):
        load_manifest("csv", str(tmp_path / "missing.csv"))


def test_invalid_csv_names_every_offending_row_in_one_error(tmp_path):
    csv_path = touch(tmp_path / "bad.csv", (
        "video_id,subject_id,split,label,uri\n"
        "ok1,s1,train,10,a.mp4\n"       # row 1: fine
        "dup,s2,train,5,b.mp4\n"        # row 2: duplicate id
        "dup,s3,dev,5,c.mp4\n"          # row 3: duplicate id
        "high,s4,train,70,d.mp4\n"      # row 4: label out of range
        "leak,s1,test,3,e.mp4\n"        # row 5: s1 also in train (row 1)
        "nouri,s6,train,1,\n"           # row 6: empty uri
        "badsplit,s7,validation,1,g.mp4\n"  # row 7: unknown split
        ",s8,train,1,h.mp4\n"           # row 8: empty video_id
        "word,s9,train,ten,i.mp4\n"))   # row 9: label not a number
    with pytest.raises(ManifestError) as caught:
        load_manifest("csv", str(csv_path))
    message = str(caught.value)
    expected = [
        ("row 1 ", "'ok1'", "subject 's1' appears in several splits (test, train)"),
        ("row 2 ", "'dup'", "duplicate video_id (rows 2, 3)"),
        ("row 3 ", "'dup'", "duplicate video_id (rows 2, 3)"),
        ("row 4 ", "'high'", "label 70.0 outside 0..63"),
        ("row 5 ", "'leak'", "subject 's1' appears in several splits"),
        ("row 6 ", "'nouri'", "empty uri"),
        ("row 7 ", "'badsplit'", "split 'validation' is not one of"),
        ("row 8 ", "''", "empty video_id"),
        ("row 9 ", "'word'", "label 'ten' is not a number"),
    ]
    lines = caught.value.problems
    for row, video_id, reason in expected:
        assert any(line.startswith(row) and video_id in line and reason in line for line in lines), (row, message)
        assert reason in message
    assert "CSV line 10" in message  # row 9 is line 10 of the file (line 1 is the header)
    assert not any("row 1 " in line and "duplicate" in line for line in lines)


def test_validate_manifest_on_tables():
    rows = [{"video_id": "v1", "subject_id": "s1", "split": "train", "label": 12.0, "uri": "v1.mp4", "task": None},
            {"video_id": "v2", "subject_id": "s2", "split": "test", "label": None, "uri": "v2.mp4", "task": None}]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    validate_manifest(table)  # a null label is fine for prediction
    with pytest.raises(ManifestError, match=r"row 2 \(video_id 'v2'\): missing label"):
        validate_manifest(table, require_labels=True)
    with pytest.raises(ManifestError, match="lacks column"):
        validate_manifest(table.drop_columns(["uri"]))


def test_manifest_from_videos(tmp_path):
    table = manifest_from_videos([str(tmp_path / "new" / "p01.mp4"), "s3://b/x/p02.avi"])
    assert table.schema == MANIFEST_SCHEMA
    assert table.to_pylist() == [
        {"video_id": "p01", "subject_id": "p01", "split": "test", "label": None,
         "uri": str(tmp_path / "new" / "p01.mp4"), "task": None},
        {"video_id": "p02", "subject_id": "p02", "split": "test", "label": None, "uri": "s3://b/x/p02.avi", "task": None},
    ]
    with pytest.raises(ManifestError, match="duplicate video_id"):
        manifest_from_videos(["a/p01.mp4", "b/p01.mp4"])


def test_write_manifest_csv_round_trips(tmp_path):
    table = load_manifest("avec2014", str(make_avec2014(tmp_path / "A")))
    out = tmp_path / "out" / "manifest.csv"
    write_manifest_csv(table, str(out))
    assert out.read_text().splitlines()[0] == "video_id,subject_id,split,label,uri,task"
    assert load_manifest("csv", str(out)).equals(table)


HOSTILE_IDS = ["../../x", "a/b", ".hidden", "x" * 300, "a..b", "..", "a\\b", "a b", "a\nb", "\u00e9t\u00e9", "/abs"]


def test_hostile_video_ids_are_refused_naming_every_row(tmp_path):
    lines = ["video_id,subject_id,split,label,uri", "ok_1-a.b,s0,train,1,ok.mp4"]
    lines += [f'"{vid}",s{i + 1},train,1,v{i}.mp4' for i, vid in enumerate(HOSTILE_IDS)]
    lines.append(",s99,train,1,empty.mp4")  # empty id: its own message
    csv_path = touch(tmp_path / "hostile.csv", "\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest("csv", str(csv_path))
    problems = caught.value.problems
    for i, vid in enumerate(HOSTILE_IDS):
        row = f"row {i + 2} "
        assert any(p.startswith(row) and "not a safe name" in p for p in problems), (vid, problems)
    assert any(p.startswith(f"row {len(HOSTILE_IDS) + 2} ") and "empty video_id" in p for p in problems)
    assert not any(p.startswith("row 1 ") for p in problems)
    assert len(problems) == len(HOSTILE_IDS) + 1
    assert all(len(p) < 400 for p in problems)  # "x" * 300 is shown cut short
    # the same check on tables handed over directly
    rows = [{"video_id": vid, "subject_id": "s", "split": "test", "label": None, "uri": "v.mp4", "task": None}
            for vid in ["fine", *HOSTILE_IDS]]
    with pytest.raises(ManifestError) as caught:
        validate_manifest(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    assert len(caught.value.problems) == len(HOSTILE_IDS)


def test_safe_video_ids():
    for vid in ["203_1_Freeform", "p01", "a-b.c", "_x", "X" * 128, "v.1.2"]:
        assert is_safe_video_id(vid), vid
    for vid in [*HOSTILE_IDS, "", None, "X" * 129, 12]:
        assert not is_safe_video_id(vid), vid


def test_manifest_from_videos_makes_file_stems_safe(tmp_path):
    table = manifest_from_videos(["/in/Patient 01 (visit).mp4", "/in/.hidden.avi", "s3://b/ok-1.mp4"])
    assert table.column("video_id").to_pylist() == ["Patient_01_visit_", "hidden", "ok-1"]
    assert table.column("uri").to_pylist() == ["/in/Patient 01 (visit).mp4", "/in/.hidden.avi", "s3://b/ok-1.mp4"]
    with pytest.raises(ManifestError, match="duplicate video_id"):
        manifest_from_videos(["/in/a b.mp4", "/in/a_b.mp4"])


def test_csv_split_policies(tmp_path):
    csv_path = touch(tmp_path / "m.csv", (
        "video_id,subject_id,split,label,uri\n"
        "a,s1,train,10,a.mp4\n"
        "b,s1,test,12,b.mp4\n"
        "c,s2,dev,,c.mp4\n"))
    with pytest.raises(ManifestError, match="subject 's1' appears in several splits"):
        load_manifest("csv", str(csv_path))  # default for CSV: strict (as before)
    with pytest.raises(ManifestError, match="several splits"):
        load_manifest("csv", str(csv_path), split_policy="strict")
    table = load_manifest("csv", str(csv_path), split_policy="official")
    assert table.column("split").to_pylist() == ["train", "test", "dev"]
    report = manifest_report(table)
    assert report["recurring_subjects"] == {"count": 1, "subject_ids": ["s1"], "by_subject": {"s1": ["train", "test"]}}
    disjoint = load_manifest("csv", str(csv_path), split_policy="subject-disjoint", split_seed=3)
    splits = {r["video_id"]: r["split"] for r in disjoint.to_pylist()}
    assert splits["a"] == splits["b"]
    with pytest.raises(ManifestError, match="unknown split policy"):
        load_manifest("csv", str(csv_path), split_policy="Official")


def test_format_manifest_report_truncates_long_lists():
    rows = [{"video_id": f"v{i}", "subject_id": f"s{i % 16}", "split": SPLITS_CYCLE[i % 3], "label": None,
             "uri": f"v{i}.mp4", "task": None} for i in range(45)]
    report = manifest_report(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    assert report["recurring_subjects"]["count"] == 16
    assert report["recurring_subjects"]["subject_ids"][:3] == ["s0", "s1", "s2"]  # natural order: s2 before s10
    lines = format_manifest_report(report)
    recur = next(line for line in lines if "recur across partitions" in line)
    assert recur.startswith("16 subject(s) recur across partitions: s0, s1, s2,") and "(+6 more)" in recur
    missing = next(line for line in lines if "have no label" in line)
    assert missing.startswith("45 video(s) have no label: v0, v1,") and "(+35 more)" in missing


SPLITS_CYCLE = ("train", "dev", "test")


def test_uri_helpers_the_adapters_use():
    """pipeline.storage's URI helpers (the one copy): a listing's paths back as URIs, manifest entries
    relative to the manifest's folder, locally and on a remote store."""
    from pipeline.storage import join_uri, parent_uri, uri_for

    assert uri_for("s3://bucket/avec?region=x", "bucket/avec/a.mp4") == "s3://bucket/avec/a.mp4"
    assert uri_for("/data/avec", "/data/avec/a.mp4") == uri_for("file:///data/avec", "/data/avec/a.mp4") == "/data/avec/a.mp4"
    assert parent_uri("s3://bucket/m/manifest.csv") == "s3://bucket/m"
    assert parent_uri("/data/m/manifest.csv") == "/data/m"
    assert join_uri("s3://bucket/m", "videos/a.mp4") == "s3://bucket/m/videos/a.mp4"
    assert join_uri("/data/m", "../videos/a.mp4") == "/data/videos/a.mp4"
    assert join_uri("file:///data/m", "a.mp4") == "file:///data/m/a.mp4"
    assert join_uri("/data/m", "gs://b/a.mp4") == "gs://b/a.mp4" and join_uri("s3://b", "/abs/a.mp4") == "/abs/a.mp4"
