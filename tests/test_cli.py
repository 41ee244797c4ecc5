"""The command-line convention of every job (pipeline/cli.py): help on every option, one default
shown, YAML keys = option names (flat or as sections), command line over YAML, unknown keys named."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.cli import build_config, parse_args
from tests.job_modules import load_job

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py"))


@pytest.mark.parametrize("job", JOBS)
def test_every_option_has_help_and_its_default_once(job):
    parser = load_job(job).build_parser()
    formatter = parser._get_formatter()
    options = [a for a in parser._actions
               if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    assert options, f"{job}: no options"
    for action in options:
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"jobs/{job}.py: {'/'.join(action.option_strings)} has no help text"
        assert text.count("(default") <= 1, f"jobs/{job}.py: {action.option_strings} shows its default twice: {text}"
    parser.format_help()  # renders (a stray '%' in a help text would raise here)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "options.yaml"
    path.write_text(text)
    return str(path)


def test_preprocess_yaml_keys_are_option_names_flat_or_as_sections(tmp_path):
    job = load_job("preprocess")
    from pipeline.preprocess import PreprocessConfig

    flat = write(tmp_path, "input: videos\ndetector-name: scrfd\nsampling_fps: 2.5\njpeg-quality: 80\n")
    config = build_config(PreprocessConfig, parse_args(job.build_parser(), ["--config", flat]))
    assert (config.input, config.detector.name, config.sampling.fps, config.jpeg_quality) == ("videos", "scrfd", 2.5, 80)

    sections = write(tmp_path, "input: videos\ndetector: {name: scrfd}\nsampling: {fps: 2.5}\njpeg-quality: 80\n")
    assert build_config(PreprocessConfig, parse_args(job.build_parser(), ["--config", sections])) == config

    # the command line wins over the file; untouched fields keep their defaults
    config = build_config(PreprocessConfig, parse_args(job.build_parser(), ["--config", flat, "--detector-name", "mtcnn"]))
    assert config.detector.name == "mtcnn" and config.sampling.fps == 2.5
    from pipeline.align import AlignConfig

    assert config.align == AlignConfig()


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    job = load_job("train_ddp")
    with pytest.raises(SystemExit) as exc:
        parse_args(job.build_parser(), ["--config", write(tmp_path, "epochs: 3\nnum_head: 2\n")])
    assert exc.value.code == 2
    assert "unknown option(s) num-head" in capsys.readouterr().err


def test_training_yaml_sets_model_options_unprefixed_and_bad_values_are_refused(tmp_path):
    job = load_job("train_ddp")
    from hmhn.train import TrainConfig

    args = parse_args(job.build_parser(), ["--config", write(tmp_path, "data: d\ninput-size: 96\nepochs: 3\n"),
                                           "--num-heads", "2"])
    config = build_config(TrainConfig, args, skip=job.SKIP, flat=job.FLAT)
    assert (config.data, config.model.input_size, config.model.num_heads, config.epochs) == ("d", 96, 2, 3)
    assert job.main(["--data", "d", "--epochs", "0"]) == 2  # invalid: a message and exit 2, nothing started


def test_required_option_may_come_from_the_file(tmp_path):
    job = load_job("promote")
    args = parse_args(job.build_parser(), ["--config", write(tmp_path, "model-name: hmhn\nmetric: dev_mae\n")])
    assert (args.model_name, args.metric, args.alias) == ("hmhn", "dev_mae", "candidate")


def documented_job_flags() -> list[tuple[str, str, str]]:
    """(file, job, flag) for every `--flag` after `jobs/<job>.py` in the README, docs/ and cluster/."""
    import re
    import shlex

    found = []
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted(p for p in (REPO / "cluster").rglob("*") if p.is_file())]
    for path in files:
        text = path.read_text(errors="replace").replace("\\\n", " ")
        for match in re.finditer(r"jobs/(\w+)\.py((?:[ \t]+[^\s`|;&)>\]\"',]+)*)", text):
            try:
                tokens = shlex.split(match.group(2))
            except ValueError:
                continue
            found += [(str(path.relative_to(REPO)), match.group(1), t.split("=")[0])
                      for t in tokens if t.startswith("--") and t != "--"]
    return found


def test_every_documented_command_line_uses_options_that_exist():
    flags = documented_job_flags()
    assert len(flags) > 50  # the README, docs and cluster configs show many commands
    parsers = {job: load_job(job).build_parser() for job in {job for _, job, _ in flags}}
    stale = [(where, job, flag) for where, job, flag in flags if flag not in parsers[job]._option_string_actions]
    assert not stale, f"documented options that the jobs do not have: {stale}"
