"""Where the processing plane keeps things, read from the environment.

Every path has a default under the repository's `.ergot/` directory so that `make dev`, the
`ergot` command and the tests agree without any configuration. A deployment sets the env vars.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import BaseModel

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ErgotSettings(BaseModel):
    """The plane's locations, resolved once from the environment."""

    home: Path
    dagster_home: Path
    storage: str
    ingest_root: str
    workflow_defs: Path
    runtime_targets: Path
    request_inbox: Path

    @classmethod
    def from_env(cls) -> ErgotSettings:
        home = Path(os.environ.get("ERGOT_HOME", PROJECT_ROOT / ".ergot")).expanduser()
        return cls(
            home=home,
            dagster_home=Path(os.environ.get("DAGSTER_HOME", home / "dagster")).expanduser(),
            storage=os.environ.get("ERGOT_STORAGE", str(home / "artifacts")),
            ingest_root=os.environ.get("ERGOT_INGEST_ROOT", str(home / "ingest")),
            workflow_defs=Path(
                os.environ.get("ERGOT_WORKFLOW_DEFS", PROJECT_ROOT / "workflow_defs")
            ).expanduser(),
            runtime_targets=Path(
                os.environ.get("ERGOT_RUNTIME_TARGETS", PROJECT_ROOT / "runtime_targets.yaml")
            ).expanduser(),
            request_inbox=Path(os.environ.get("ERGOT_REQUEST_INBOX", home / "inbox")).expanduser(),
        )


def ensure_dagster_home(settings: ErgotSettings) -> Path:
    """Make `DAGSTER_HOME` usable: create it and give it the repository's `dagster.yaml`.

    Dagster refuses to run without `DAGSTER_HOME`; the CLI points it at the same place as
    `make dev` so that runs started from the command line show up in the UI.
    """
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    template = PROJECT_ROOT / "dagster.yaml"
    if not target.exists() and template.exists():
        shutil.copyfile(template, target)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
