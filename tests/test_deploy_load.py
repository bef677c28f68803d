"""
The Kubernetes Jobs in C{deploy/} that run C{load} from many pods and merge
the runs: every C{echotwist-client} command they hold parses with the real
command line (a renamed or mistyped flag fails here, not in someone's cluster).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from echotwist import tokens
from echotwist.client.cli import ClientOptions
from tests.support import dev_certs, scratch_dir

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def client_commands(manifest: Path) -> list[str]:
    """The C{echotwist-client ...} commands of a manifest's shell scripts, one string each."""
    text = manifest.read_text().replace("\\\n", " ")
    script = re.compile(r"^ +(?:exec )?echotwist-client (\w+ [^\n]*)", re.MULTILINE)
    return [m.group(1) for m in script.finditer(text)]


class LoadJobTests(TestCase):
    def test_every_client_command_in_the_jobs_parses(self) -> None:
        results = scratch_dir(self)
        seen = []
        old = os.environ.get(tokens.ENV_VAR)
        os.environ[tokens.ENV_VAR] = tokens.generate_token()
        self.addCleanup(
            lambda: (
                os.environ.pop(tokens.ENV_VAR)
                if old is None
                else os.environ.__setitem__(tokens.ENV_VAR, old)
            )
        )
        for name in ("load-job.yaml", "load-merge-job.yaml"):
            for command in client_commands(DEPLOY / name):
                command = command.replace("/results", str(results))
                command = command.replace("/etc/echotwist/ca.pem", str(dev_certs().ca_cert))
                command = command.replace('"$TARGET"', "https://echotwist.example:8443")
                command = command.replace('"$START_AT"', repr(time.time() + 90))
                argv = shlex.split(command.replace("$JOB_COMPLETION_INDEX", "0"))
                options = ClientOptions()
                options.parseOptions(argv)  # raises UsageError for a flag it does not know
                seen.append(options.subCommand)
        self.assertEqual(seen, ["load", "merge", "report"])

    def test_the_load_job_is_indexed_and_never_retried(self) -> None:
        text = (DEPLOY / "load-job.yaml").read_text()
        self.assertIn("completionMode: Indexed", text)
        self.assertIn("backoffLimit: 0", text)
        self.assertIn("secretKeyRef", text)  # the token from a Secret, not the command line
        self.assertNotIn("--token ", text)
