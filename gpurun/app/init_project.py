"""`gpurun init DIR --template pytorch|keras`: a ready experiment from a training template."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from gpurun.errors import BadInput

TEMPLATE_FILES = ("train.py", "requirements.txt")

EXPERIMENT = """\
# The experiment for this project. Run it here first (provider: local):
#   gpurun launch experiment.yaml --follow
# then on a rented GPU by switching provider to aws (see the aws section).
name: {name}
provider: local                 # local | ssh | aws
workdir: .                      # the code to sync: this folder (.gpurunignore says what stays behind)
{env}setup: python -c "import {probe}" 2>/dev/null || python -m pip install -q -r requirements.txt
run: python train.py --epochs 5 --steps-per-epoch 50
checkpoint:
  dir: checkpoints              # the script saves into $GPURUN_CHECKPOINT_DIR (this folder on the machine)
  every: 2m                     # gpurun snapshots it into the store this often, on exit, and on teardown
  keep: 3                       # snapshots kept in the store
  resume: auto                  # a new launch continues from the newest snapshot of a run with this name
  # store: s3://my-bucket/gpurun   # required for provider: aws; default here is a folder under GPURUN_HOME
# provider: aws needs this section (and checkpoint.store set to s3://...):
aws:
  region: us-east-1
  instance_type: [g5.xlarge, g6.xlarge]   # tried in order when one has no capacity
  ami: dlami-pytorch            # the AWS Deep Learning AMI with PyTorch, looked up at launch
  spot: true                    # about a third of the price; the agent syncs on the 2-minute notice
  disk_gb: 100
  ssh_cidr: auto                # SSH only from your public IP
  max_runtime: 12h              # the machine terminates itself after this, whatever happens
  idle_timeout: 30m             # ... or this long after the job ends
# provider: ssh uses your own GPU box:
# ssh:
#   hosts: [my-gpu-box]         # a name from ~/.ssh/config works
"""

IGNORE = """\
# Not synced to the machine (same rules as .gitignore; this file replaces it for gpurun).
checkpoints/
__pycache__/
*.pyc
.venv/
data/
"""


def templates_root() -> Path:
    """A source checkout's templates/, else the copy a wheel installs under <prefix>/share/gpurun."""
    checkout = Path(__file__).resolve().parent.parent.parent / "templates"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "gpurun" / "templates"


def known_templates() -> list[str]:
    root = templates_root()
    return sorted(p.name for p in root.iterdir() if (p / "train.py").exists()) if root.is_dir() else []


def init_project(directory: Path, template: str, *, force: bool = False) -> list[Path]:
    known = known_templates()
    if template not in known:
        raise BadInput(f"--template {template!r}: unknown template; known: {', '.join(known) or 'none found'}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BadInput(f"{directory}: exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not force:
        raise BadInput(f"{directory}: directory is not empty; use --force to overwrite the template's files")
    directory.mkdir(parents=True, exist_ok=True)
    source = templates_root() / template
    written = []
    for name in TEMPLATE_FILES:
        shutil.copyfile(source / name, directory / name)
        written.append(directory / name)
    name = (
        "".join(c if c.isalnum() or c in "-_" else "-" for c in directory.resolve().name)[:40].strip("-_")
        or "experiment"
    )
    env = "env: {KERAS_BACKEND: torch}\n" if template == "keras" else ""
    probe = "keras" if template == "keras" else "torch"
    (directory / "experiment.yaml").write_text(EXPERIMENT.format(name=name, env=env, probe=probe))
    (directory / ".gpurunignore").write_text(IGNORE)
    written += [directory / "experiment.yaml", directory / ".gpurunignore"]
    return written
