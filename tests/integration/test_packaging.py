"""A plain (non-editable) install of the built wheel can migrate: the SQL ships with it."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from projector.store.migrate import expected_version
from tests.conftest import ROOT
from tests.integration.harness import rows

pytestmark = pytest.mark.integration


def test_the_wheel_carries_the_sql_migrations_and_an_install_migrates(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Proves the packaging: the wheel holds every migrations/*.sql, and `projector migrate`
    from a fresh virtualenv with that wheel installed (not the checkout) creates the schema."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = wheels.glob("projector-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).name for n in names if "/share/projector/migrations/" in n)
    assert shipped == sorted(p.name for p in (ROOT / "migrations").glob("*.sql"))

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # Dependencies come from the project's own environment's wheels cache via pip; only the
    # wheel itself is new here.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        "kafka: {bootstrap_servers: 127.0.0.1:1}\n"
        f"postgres: {{dsn: '{pg_dsn}'}}\n"
        "projections: [{name: p, topics: [t], handlers: [handlers.accounts], decoder: {seq: seq, stream: s}}]\n"
    )
    done = subprocess.run(
        [str(env_dir / "bin" / "projector"), "migrate", "-c", str(config)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(pg_dsn, "select version from projector.schema_version") == [(expected_version(),)]
