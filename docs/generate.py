"""Regenerate docs/configuration.md from the settings table: ``python docs/generate.py``."""

from __future__ import annotations

import sys
from pathlib import Path

# The settings of this checkout, not those of whichever flask_llmauth is installed (a
# worktree's script otherwise checks its docs against another checkout's code).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask_llmauth.config import documentation_table  # noqa: E402

HEADER = """# Configuration

Every setting is a Flask config key. The table is generated from `flask_llmauth/config.py`
by `python docs/generate.py`; a test fails when it is out of date.

Precedence: constructor argument (`LLMAuth(app, master_key=...)`, by field name) > Flask
config > LiteLLM YAML (`LLMAUTH_CONFIG_FILE`; values may be `os.environ/NAME`) > secret
loader (secrets only) > environment variable > default. An unknown `LLMAUTH_*` key, or a
value of the wrong type, fails `init_app` with a message naming the key.

`LLMAUTH_*` names are Flask config keys, not environment variables: the extension reads
only the variables of the *environment* column (LiteLLM's names). An exported
`LLMAUTH_DATABASE_URL` is not read (`init_app` logs a warning naming it); load such values
into `app.config` yourself, e.g. `app.config.from_prefixed_env()` turns
`FLASK_LLMAUTH_DATABASE_URL` into `LLMAUTH_DATABASE_URL` (values parsed as JSON when they
are: `FLASK_LLMAUTH_AUTO_MIGRATE=false`). The example gateway (`example_app`) copies every
`LLMAUTH_*` environment variable into its config.

Empty values: an empty variable of the *environment* column counts as unset, as in a shell.
In the constructor, Flask config and YAML an empty string is the setting's value (for an
optional setting: none, e.g. `LLMAUTH_AUTH_FAILURE_LIMIT=""` switches that limit off), and
the layers below are not read. `LLMAUTH_DATABASE_URL`, `LLMAUTH_REDIS_URL` and
`LLMAUTH_SALT_KEY` are the exceptions: an empty or blank value (`FLASK_LLMAUTH_DATABASE_URL=`
in a deploy script, `os.environ/NAME` naming an empty variable, an empty variable the example
gateway copies) fails `init_app` naming the key, instead of starting on an empty SQLite file
and ignoring `DATABASE_URL`, counting rate limits per process and ignoring `REDIS_URL`, or
hashing keys with another secret and ignoring `LITELLM_SALT_KEY`. Leave the key out for the
default.

"""


def main(argv: list[str] | None = None) -> int:
    """Write docs/configuration.md; with ``--check``, only say whether it is up to date
    (exit status 1 when not)."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(__file__).with_name("configuration.md")
    text = HEADER + documentation_table()
    if "--check" in args:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run python docs/generate.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
