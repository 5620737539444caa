"""`orch dashboard`: the web dashboard's address, signed in when the server is local."""

from __future__ import annotations

import webbrowser
from urllib.parse import quote

import click

# The client's get_settings imports the settings (pydantic) only when called.
from orchestrator.client import Client, get_settings, local_url, start_local_server


def local_token() -> str | None:
    """The token the CLI sends to the local server: the one it was given, else the local
    server's own token file (`local` auth)."""
    token = Client(url=local_url()).token
    if token:
        return token
    path = get_settings().home_dir() / "api_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def dashboard_url() -> tuple[str, bool]:
    """(the URL to open, whether it signs the browser in). A team's server gets its plain
    address: there people sign in with their own token, which never goes in a URL."""
    settings = get_settings()
    if settings.server_url:
        return settings.server_url.rstrip("/") + "/", False
    base = start_local_server()
    token = local_token()
    if not token:
        return base + "/", False
    # Like Jupyter's: a link that sets the session cookie, then drops the token from the URL.
    return f"{base}/login?token={quote(token, safe='')}", True


@click.command()
@click.option("--open", "open_browser", is_flag=True, help="open it in the default browser")
def dashboard(open_browser: bool) -> None:
    """Print the web dashboard's URL (on a local server, a link that signs you in)."""
    from orchestrator.cli import friendly_errors

    @friendly_errors
    def run() -> None:
        url, signs_in = dashboard_url()
        click.echo(url)
        if signs_in:
            click.echo("This link signs you in; keep it to yourself.", err=True)
        if open_browser and not webbrowser.open(url):
            click.echo("could not open a browser here; open the URL above", err=True)

    run()
