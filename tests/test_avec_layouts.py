"""pipeline.manifest on the AVEC2013 / AVEC2014 distributions as shipped (tests/avec_fixtures.py):
official partitions that share subjects, labels where each distribution puts them, `labels=`
elsewhere, split policies, the manifest report, and hostile file names."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.manifest import (SPLIT_POLICIES, ManifestError, format_manifest_report, load_manifest,
                               manifest_report, subject_disjoint_split, validate_manifest)
from pipeline.schema import MANIFEST_SCHEMA, SPLITS
from tests.avec_fixtures import (RECURRING_SUBJECTS, build_avec2013_tree, build_avec2014_tree,
                                 placeholder_clip, tiny_mp4_clip)

BUILDERS = {"avec2014": build_avec2014_tree, "avec2013": build_avec2013_tree}


def as_expected(table: pa.Table) -> dict:
    return {r["video_id"]: (r["split"], r["label"], r["task"]) for r in table.to_pylist()}


def subjects_by_split(table: pa.Table) -> dict[str, set]:
    found = defaultdict(set)
    for row in table.to_pylist():
        found[row["split"]].add(row["subject_id"])
    return found


@pytest.mark.parametrize("dataset", ["avec2014", "avec2013"])
def test_official_layout_gives_official_partitions_and_labels(tmp_path, dataset):
    expected = BUILDERS[dataset](tmp_path / "unpacked")
    table = load_manifest(dataset, str(tmp_path / "unpacked"))  # split_policy defaults to "official"
    assert table.schema == MANIFEST_SCHEMA
    assert as_expected(table) == expected
    splits = table.column("split").to_pylist()
    assert splits == sorted(splits, key=SPLITS.index)  # ordered train, dev, test
    rows = {r["video_id"]: r for r in table.to_pylist()}
    if dataset == "avec2014":
        assert rows["203_1_Freeform"]["uri"] == str(
            tmp_path / "unpacked/AVEC2014_AudioVisual/Video/Training/Freeform/203_1_Freeform_video.mp4")
        # one label file per recording, shared by its Freeform and Northwind videos
        assert rows["203_3_Freeform"]["label"] == rows["203_3_Northwind"]["label"] == 22.0
    else:
        assert rows["203_1"]["uri"] == str(tmp_path / "unpacked/Training_AudioVisual/Training/203_1_cut_combined.mp4")
        assert rows["205_2"]["uri"].endswith("Development/205_2_video.avi")
        assert rows["206_2"]["uri"] == str(tmp_path / "unpacked/Testing_AudioVisual/206_2.mp4")
    assert {r["subject_id"] for r in rows.values()} == {"203", "205", "206", "207", "208"}


@pytest.mark.parametrize("dataset", ["avec2014", "avec2013"])
def test_recurring_subjects_and_missing_labels_are_reported(tmp_path, dataset):
    BUILDERS[dataset](tmp_path / "d")
    report = manifest_report(load_manifest(dataset, str(tmp_path / "d")))
    json.dumps(report)  # serialisable as is
    assert report["recurring_subjects"] == {"count": 3, "subject_ids": ["203", "205", "206"],
                                            "by_subject": RECURRING_SUBJECTS}
    per_task = 2 if dataset == "avec2014" else 1
    assert report["videos"] == 9 * per_task and report["labelled"] == 8 * per_task
    assert report["subjects"] == 5
    assert report["splits"] == {"train": {"videos": 3 * per_task, "labelled": 3 * per_task, "subjects": 3},
                                "dev": {"videos": 3 * per_task, "labelled": 3 * per_task, "subjects": 3},
                                "test": {"videos": 3 * per_task, "labelled": 2 * per_task, "subjects": 3}}
    if dataset == "avec2014":
        assert report["unlabelled_video_ids"] == ["206_2_Freeform", "206_2_Northwind"]
        assert report["tasks"]["test"] == {"Freeform": {"videos": 3, "labelled": 2},
                                           "Northwind": {"videos": 3, "labelled": 2}}
        assert list(report["tasks"]) == ["train", "dev", "test"]
    else:
        assert report["unlabelled_video_ids"] == ["206_2"]
        assert report["tasks"] == {}
    lines = format_manifest_report(report)
    text = "\n".join(lines)
    assert "3 subject(s) recur across partitions: 203, 205, 206" in text
    assert "--split-policy subject-disjoint" in text
    assert f"{per_task} video(s) have no label: 206_2" in text
    assert any(line.startswith(f"test: {3 * per_task} videos ({2 * per_task} labelled)") for line in lines)
    if dataset == "avec2014":
        assert "Freeform 3 (2 labelled), Northwind 3 (2 labelled)" in text


def test_strict_policy_refuses_the_official_avec_partitions(tmp_path):
    build_avec2014_tree(tmp_path / "d")
    with pytest.raises(ManifestError) as caught:
        load_manifest("avec2014", str(tmp_path / "d"), split_policy="strict")
    assert "subject '203' appears in several splits (dev, test, train)" in str(caught.value)
    assert not any("'207" in line for line in caught.value.problems)  # 207 is only in train
    with pytest.raises(ManifestError, match="unknown split policy"):
        load_manifest("avec2014", str(tmp_path / "d"), split_policy="random")
    assert SPLIT_POLICIES == ("official", "subject-disjoint", "strict")
    # an official-partition manifest validates when told so, and is refused by the strict default
    table = load_manifest("avec2014", str(tmp_path / "d"))
    validate_manifest(table, split_policy="official")
    with pytest.raises(ManifestError, match="several splits"):
        validate_manifest(table)


@pytest.mark.parametrize("dataset", ["avec2014", "avec2013"])
def test_subject_disjoint_policy(tmp_path, dataset):
    expected = BUILDERS[dataset](tmp_path / "d")
    official = load_manifest(dataset, str(tmp_path / "d"))
    runs = {seed: load_manifest(dataset, str(tmp_path / "d"), split_policy="subject-disjoint", split_seed=seed)
            for seed in range(8)}
    for seed, table in runs.items():
        assert table.schema == MANIFEST_SCHEMA
        by_split = subjects_by_split(table)
        assert not (by_split["train"] & by_split["dev"] or by_split["train"] & by_split["test"]
                    or by_split["dev"] & by_split["test"]), (seed, by_split)
        validate_manifest(table, split_policy="strict")
        assert manifest_report(table)["recurring_subjects"]["count"] == 0
        # same videos, labels, uris and tasks; only splits move
        strip = lambda t: sorted((r["video_id"], r["label"], r["uri"], r["task"]) for r in t.to_pylist())  # noqa: E731
        assert strip(table) == strip(official)
        # the test recording without a label stays in test, with every video of its subject
        assert all(r["split"] == "test" for r in table.to_pylist() if r["subject_id"] == "206")
        assert table.equals(load_manifest(dataset, str(tmp_path / "d"), split_policy="subject-disjoint",
                                          split_seed=seed))  # deterministic per seed
        assert table.equals(subject_disjoint_split(official, seed))
    assert len({tuple(t.column("split").to_pylist()) for t in runs.values()}) > 1  # the seed matters
    assert set(expected) == set(runs[0].column("video_id").to_pylist())


def test_subject_disjoint_keeps_roughly_the_official_proportions(tmp_path):
    # 60 subjects with 1-4 videos each, official splits per video (so subjects recur), 50/25/25
    lines = ["video_id,subject_id,split,label,uri"]
    n = 0
    for s in range(60):
        for v in range(1 + s % 4):
            split = ("train", "train", "dev", "test")[n % 4]
            lines.append(f"v{n},s{s},{split},{n % 64},v{n}.mp4")
            n += 1
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match="several splits"):
        load_manifest("csv", str(path))  # CSV default: strict
    official = load_manifest("csv", str(path), split_policy="official")
    assert manifest_report(official)["recurring_subjects"]["count"] > 20
    for seed in (0, 1, 2):
        table = load_manifest("csv", str(path), split_policy="subject-disjoint", split_seed=seed)
        counts = {s: v["videos"] for s, v in manifest_report(table)["splits"].items()}
        assert sum(counts.values()) == n == 150
        assert abs(counts["train"] - 75) <= 5 and abs(counts["dev"] - 37) <= 5 and abs(counts["test"] - 38) <= 5, counts
        assert manifest_report(table)["recurring_subjects"]["count"] == 0


@pytest.mark.parametrize("dataset", ["avec2014", "avec2013"])
def test_labels_kept_elsewhere(tmp_path, dataset):
    expected = BUILDERS[dataset](tmp_path / "videos", test_labels_dir=tmp_path / "test_labels")
    without = as_expected(load_manifest(dataset, str(tmp_path / "videos")))
    test_ids = [v for v, (split, _, _) in expected.items() if split == "test"]
    assert all(without[v][1] is None for v in test_ids)
    assert {v: e for v, e in without.items() if v not in test_ids} == {
        v: e for v, e in expected.items() if v not in test_ids}
    table = load_manifest(dataset, str(tmp_path / "videos"), labels=str(tmp_path / "test_labels"))
    assert as_expected(table) == expected
    # a file:// URI works too
    uri_table = load_manifest(dataset, str(tmp_path / "videos"), labels=f"file://{tmp_path / 'test_labels'}")
    assert as_expected(uri_table) == expected


def test_labels_argument_errors(tmp_path):
    build_avec2014_tree(tmp_path / "videos", test_labels_dir=tmp_path / "test_labels")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="holds no \\*_Depression.csv"):
        load_manifest("avec2014", str(tmp_path / "videos"), labels=str(tmp_path / "empty"))
    with pytest.raises(ManifestError, match="not a folder"):
        load_manifest("avec2014", str(tmp_path / "videos"), labels=str(tmp_path / "absent"))
    with pytest.raises(ManifestError, match="AVEC layouts only"):
        load_manifest("csv", str(tmp_path / "m.csv"), labels=str(tmp_path / "test_labels"))
    # a label file elsewhere that disagrees with the one in the distribution names the rows
    conflict = tmp_path / "conflict"
    conflict.mkdir()
    (conflict / "203_1_Depression.csv").write_text("18\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest("avec2014", str(tmp_path / "videos"), labels=str(conflict))
    assert len(caught.value.problems) == 2  # 203_1_Freeform and 203_1_Northwind
    assert all("conflicting label files" in p and "203_1_" in p for p in caught.value.problems)
    # the same value twice (labels folder inside the root) is fine
    same = load_manifest("avec2014", str(tmp_path / "videos"),
                         labels=str(tmp_path / "videos" / "AVEC2014_DepressionLabels"))
    assert same.num_rows == 18


def test_split_folder_choice(tmp_path):
    """Exact split folder names win over Training_AudioVisual-like prefixes; the folder nearest
    to the file wins; folders above the root do not count."""
    root = tmp_path / "test" / "root"  # "test" above the root must not matter
    placeholder_clip(root / "Testing_AudioVisual" / "Training" / "301_1_cut_combined.mp4")  # exact wins
    placeholder_clip(root / "scratch" / "dev" / "copy" / "Training" / "302_1_cut_combined.mp4")  # nearest wins
    placeholder_clip(root / "Development_AudioVisual" / "303_1_cut_combined.mp4")  # prefix only
    placeholder_clip(root / "Devel-Video" / "sub" / "304_1_cut_combined.avi")  # prefix, further up
    placeholder_clip(root / "Elsewhere" / "305_1_cut_combined.mp4")  # no split folder: skipped
    placeholder_clip(root / "TestingVideos" / "306_1_cut_combined.mp4")  # not a split word: skipped
    table = load_manifest("avec2013", str(root))
    assert {r["video_id"]: r["split"] for r in table.to_pylist()} == {
        "301_1": "train", "302_1": "train", "303_1": "dev", "304_1": "dev"}


def test_videos_under_no_split_folder_are_explained(tmp_path):
    placeholder_clip(tmp_path / "flat" / "Freeform" / "203_1_Freeform_video.mp4")
    with pytest.raises(ManifestError, match="lie under no Training/Development/Testing folder"):
        load_manifest("avec2014", str(tmp_path / "flat"))
    # an AVEC2014 tree read as AVEC2013 finds no video (names do not match): a clear error
    build_avec2014_tree(tmp_path / "a14")
    with pytest.raises(ManifestError, match="no videos found"):
        load_manifest("avec2013", str(tmp_path / "a14"))


@pytest.mark.parametrize("name", ["a b_1_Freeform_video.mp4", "20$3_1_Freeform_video.mp4",
                                  "x" * 200 + "_1_Freeform_video.mp4"])
def test_hostile_file_names_are_refused(tmp_path, name):
    build_avec2014_tree(tmp_path / "d")
    placeholder_clip(tmp_path / "d" / "AVEC2014_AudioVisual" / "Video" / "Training" / "Freeform" / name)
    with pytest.raises(ManifestError) as caught:
        load_manifest("avec2014", str(tmp_path / "d"))
    assert len(caught.value.problems) == 1
    assert "not a safe name" in caught.value.problems[0]
    assert len(caught.value.problems[0]) < 400  # a very long id is shown cut short


def test_tree_of_real_videos(tmp_path, make_video):
    """The same layouts with real, decodable H.264 files (for end-to-end tests)."""
    from pipeline.decode import probe_video

    expected14 = build_avec2014_tree(tmp_path / "a14", lambda p: make_video(p, n_frames=6))
    table = load_manifest("avec2014", str(tmp_path / "a14"))
    assert as_expected(table) == expected14
    expected13 = build_avec2013_tree(tmp_path / "a13", tiny_mp4_clip)
    table13 = load_manifest("avec2013", str(tmp_path / "a13"))
    assert as_expected(table13) == expected13
    for row in (table.to_pylist()[0], *[r for r in table13.to_pylist() if r["uri"].endswith(".avi")]):
        info = probe_video(row["uri"])
        assert info.num_frames in (6, 8) and (info.width, info.height) == (64, 48)
    assert Path(table.to_pylist()[0]["uri"]).stat().st_size > 100


def test_official_layouts_on_s3(tmp_path, s3_server):
    """The same trees in an S3 bucket (the local moto server of tests/s3_server.py), labels= an S3 URI."""
    import pyarrow.fs as pafs

    from pipeline.storage import resolve_filesystem

    s3 = s3_server
    expected14 = build_avec2014_tree(tmp_path / "a14", test_labels_dir=tmp_path / "labels14")
    expected13 = build_avec2013_tree(tmp_path / "a13")
    fs, prefix = resolve_filesystem(s3.uri("avec-layouts"))
    pafs.copy_files(str(tmp_path), prefix, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    table = load_manifest("avec2014", s3.uri("avec-layouts/a14"), labels=s3.uri("avec-layouts/labels14"))
    assert as_expected(table) == expected14
    assert table.column("uri")[0].as_py() == s3.uri(
        "avec-layouts/a14/AVEC2014_AudioVisual/Video/Training/Freeform/203_1_Freeform_video.mp4")
    table13 = load_manifest("avec2013", s3.uri("avec-layouts/a13"))
    assert as_expected(table13) == expected13
    assert manifest_report(table13)["recurring_subjects"]["subject_ids"] == ["203", "205", "206"]
