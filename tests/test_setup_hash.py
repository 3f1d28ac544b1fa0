"""The setup hash (what a baked image's software depends on) and the spec fields that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpurun.errors import SpecError
from gpurun.setup_hash import local_reader, named_paths, setup_hash
from gpurun.spec import load_spec


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("pip install -r requirements.txt", ["pip", "install", "requirements.txt"]),
        ("pip install -rreqs/base.txt", ["pip", "install", "reqs/base.txt"]),
        (
            "pip install --requirement=./req.txt && bash setup.sh",
            ["pip", "install", "req.txt", "&&", "bash", "setup.sh"],
        ),
        ("cat /etc/passwd ../up.txt ~/x $HOME/y", ["cat"]),
        (None, []),
    ],
)
def test_named_paths_are_the_relative_words_of_setup(setup: str | None, expected: list[str]) -> None:
    assert named_paths(setup) == expected


def test_the_hash_follows_the_named_files_content_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("numpy==1.26.4\n")
    (tmp_path / "unrelated.py").write_text("print(1)\n")
    setup = "pip install -r requirements.txt"
    first, files = setup_hash(setup, local_reader(str(tmp_path)))
    assert files == ["requirements.txt"]
    (tmp_path / "unrelated.py").write_text("print(2)\n")
    assert setup_hash(setup, local_reader(str(tmp_path)))[0] == first
    (tmp_path / "requirements.txt").write_text("numpy==2.0.0\n")
    assert setup_hash(setup, local_reader(str(tmp_path)))[0] != first
    assert (
        setup_hash(setup + " --quiet", local_reader(str(tmp_path)))[0]
        != setup_hash(setup, local_reader(str(tmp_path)))[0]
    )


def test_a_link_out_of_the_work_tree_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    work = tmp_path / "work"
    work.mkdir()
    (work / "req.txt").symlink_to(tmp_path / "outside.txt")
    assert setup_hash("pip install -r req.txt", local_reader(str(work)))[1] == []


def _spec(tmp_path: Path, aws: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: x\nprovider: aws\nrun: python train.py\naws: {{{aws}}}\n")
    return path


@pytest.mark.parametrize("ami", ["auto", "image:my-image_1.2", "ami-0123456789abcdef0"])
def test_ami_accepts_gpurun_images_and_auto(tmp_path: Path, ami: str) -> None:
    assert load_spec(_spec(tmp_path, f"ami: '{ami}'")).aws.ami == ami


@pytest.mark.parametrize(
    ("aws", "message"),
    [
        ("ami: 'image:a b'", "is not a gpurun image name"),
        ("ami: 'image:'", "is not a gpurun image name"),
        ("ami: auto, ami_fallback: auto", "cannot be a fallback"),
        ("ami: auto, ami_fallback: 'image:x1y'", "cannot be a fallback"),
        ("ami: auto, ami_fallback: ubuntu", "is not an AMI"),
    ],
)
def test_bad_image_fields_are_bad_input(tmp_path: Path, aws: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(_spec(tmp_path, aws))
