"""The shared AWS config and credentials files, checked before boto3 reads them.

botocore reports a malformed file as "Unable to parse config file: PATH",
from deep inside whatever call first needed credentials. Parsing the files the
same way first lets gpurun name the file and the line, as bad input.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path

from gpurun.errors import BadInput


def shared_files(profile: str | None = None) -> list[Path]:
    """The files botocore will read, honouring the environment variables that move them.

    Keys in the environment come first in the credential chain: botocore then never
    reads the credentials file (unless a profile is named), so neither do we.
    """
    config = os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
    files = [Path(config).expanduser()]
    keys_in_env = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
    if profile or not keys_in_env:
        credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
        files.insert(0, Path(credentials).expanduser())
    return files


def _line_of(error: configparser.Error) -> int | None:
    if isinstance(error, configparser.ParsingError) and error.errors:
        return int(error.errors[0][0])
    line = getattr(error, "lineno", None)
    return int(line) if isinstance(line, int) else None


def check_shared_files(profile: str | None = None) -> None:
    """BadInput naming the file and line of the first file botocore could not parse.

    The offending line is never quoted: it may hold a secret key.
    """
    for path in shared_files(profile):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue  # missing or unreadable: botocore skips it too
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as error:
            line = _line_of(error)
            where = f"{path} line {line}" if line else str(path)
            raise BadInput(
                f"{where}: not a valid AWS config line (expected [section] or key = value); fix or remove it"
            ) from None
