"""
The files under C{deploy/} say what the server does: the Kubernetes
Deployment's command line is one C{twistd echo} accepts, its probes ask the
admin port it opens, its Secrets are mounted where the flags read them, and
its stop budget covers the drain; the systemd unit reloads with SIGHUP.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from echotwist import tokens
from echotwist.service import Options
from echotwist.workers import KILL_MARGIN
from tests.support import dev_certs, scratch_dir

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def deployment() -> dict[str, Any]:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    (found,) = [d for d in documents if d and d["kind"] == "Deployment"]
    return found


class KubernetesTests(TestCase):
    def setUp(self) -> None:
        self.pod = deployment()["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        args = self.container["args"]
        self.assertEqual(self.container["command"], ["twistd"])
        self.echo_args = args[args.index("echo") + 1 :]

    def parsed(self) -> Options:
        """
        The container's C{twistd echo} arguments parsed by the real options,
        with the mounted paths moved to a scratch directory holding a real
        certificate pair and token file.
        """
        root = scratch_dir(self)
        dev = dev_certs()
        mounts = {m["mountPath"]: m["name"] for m in self.container["volumeMounts"]}
        moved = []
        for arg in self.echo_args:
            flag, _, value = arg.partition("=")
            if value.startswith("/etc/echotwist/"):
                target = root / value.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                self.assertIn(str(Path(value).parent), mounts, arg)
                if flag == "--token-from":
                    tokens.write_token_file(target, tokens.generate_token())
                else:
                    source = dev.server_cert if flag == "--cert" else dev.server_key
                    shutil.copy2(source, target)
                value = str(target)
            moved.append(f"{flag}={value}" if value else flag)
        options = Options()
        options.parseOptions(moved)
        return options

    def test_the_command_line_is_one_twistd_echo_accepts(self) -> None:
        options = self.parsed()
        self.assertEqual(options["port"], self.port_named("https"))
        self.assertEqual(options["admin-port"], self.port_named("admin"))

    def test_probes_ask_the_admin_port(self) -> None:
        ready, live = self.container["readinessProbe"], self.container["livenessProbe"]
        self.assertEqual(ready["httpGet"], {"path": "/readyz", "port": "admin"})
        self.assertEqual(live["httpGet"], {"path": "/healthz", "port": "admin"})

    def test_secrets_are_mounted_where_the_flags_read_them(self) -> None:
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        mounts = {m["mountPath"]: m for m in self.container["volumeMounts"]}
        for flag, secret in (
            ("--cert", "echotwist-tls"),
            ("--key", "echotwist-tls"),
            ("--token-from", "echotwist-token"),
        ):
            (path,) = [a.partition("=")[2] for a in self.echo_args if a.startswith(flag + "=")]
            mount = mounts[str(Path(path).parent)]
            self.assertNotIn("subPath", mount)  # a subPath mount never sees a Secret's update
            self.assertEqual(volumes[mount["name"]]["secret"]["secretName"], secret)

    def test_the_stop_budget_covers_prestop_and_the_drain(self) -> None:
        options = self.parsed()
        pre_stop = self.container["lifecycle"]["preStop"]["exec"]["command"]
        slept = float(pre_stop[-1].rpartition("sleep(")[2].rstrip(")"))
        needed = slept + options["grace"] + KILL_MARGIN
        self.assertGreaterEqual(self.pod["terminationGracePeriodSeconds"], needed)

    def port_named(self, name: str) -> int:
        (port,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == name]
        return int(port)


class SystemdTests(TestCase):
    def test_reload_sends_sighup_to_twistd(self) -> None:
        unit = (DEPLOY / "echotwist.service").read_text().splitlines()
        self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", unit)
