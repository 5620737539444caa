"""What an `orch` process imports, checked in a fresh interpreter (no timing).

Every CLI command is a new process, and its cost is nearly all imports: the test suite and
scripts run hundreds of them. `orchestrator.cli` imports only click and orch's own light
modules; a command imports what it needs when it runs (see the comment in cli.py). These
tests fail when a module-level import brings a heavy package back into every command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Never needed by the CLI's own process (the server and the workers import them).
NEVER = ("torch", "transformers", "datasets", "ray", "fastapi", "uvicorn", "sqlalchemy",
         "sqlmodel", "alembic", "starlette", "pydantic_settings", "matplotlib", "plotext")
# Needed by some commands only: not by `import orchestrator.cli` (so not by `orch --help`).
LATER = ("rich", "pydantic", "pydantic_core", "httpx", "httpcore", "anyio", "yaml",
         "certifi", "orchestrator.api", "orchestrator.spec", "orchestrator.settings")


def imported(code: str) -> set[str]:
    """The top-level packages and orch modules a fresh interpreter has after `code`."""
    probe = (f"{code}\nimport json, sys\n"
             "print(json.dumps(sorted(m for m in sys.modules if '.' not in m or "
             "m.startswith('orchestrator.'))))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_importing_the_cli_imports_no_heavy_package() -> None:
    modules = imported("import orchestrator.cli")
    assert "click" in modules  # the probe sees what the CLI imports
    assert not modules & {*NEVER, *LATER}


def test_help_imports_no_heavy_package() -> None:
    modules = imported("from orchestrator.cli import cli\n"
                       "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass")
    assert not modules & {*NEVER, *LATER}


def test_a_plain_command_needs_no_rich_nor_a_ca_bundle() -> None:
    """What `orch submit -q` and `orch status -o json` import: the spec, the api models and
    the HTTP client, never rich (httpx's own command line imports it) nor the server's
    packages; and no CA bundle is read for a plain-HTTP server (the local one here)."""
    modules = imported(
        "import os\nos.environ.pop('ORCH_SERVER_URL', None)\n"
        "import orchestrator.cli, orchestrator.api, orchestrator.spec\n"
        "from orchestrator.client import Client, http\n"
        "http(); Client().url\n"
        "import ssl\n"
        "context = http()._transport._pool._ssl_context\n"
        "assert not context.get_ca_certs()\n"
        # TLS it was not meant for fails (no CA to trust) instead of going unchecked.
        "assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname")
    assert {"httpx", "pydantic", "orchestrator.spec", "orchestrator.settings"} <= modules
    assert not modules & {*NEVER, "rich"}


def test_an_https_server_gets_verified_tls() -> None:
    """With an https:// server the HTTP client verifies certificates as httpx's default
    does (the CA bundle loaded)."""
    modules = imported(
        "import os\nos.environ['ORCH_SERVER_URL'] = 'https://orch.example.com'\n"
        "from orchestrator.client import http\n"
        "import ssl\n"
        "context = http()._transport._pool._ssl_context\n"
        "assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname\n"
        "assert context.get_ca_certs() or context.cert_store_stats()['x509_ca']")
    assert "httpx" in modules
