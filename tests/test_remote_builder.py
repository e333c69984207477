"""The vhost-pi SD image built through a real remote builder: sshd on 127.0.0.1 in front of a Nix with its own store.

The local Nix is stripped of its aarch64 ability (NIX_CONFIG="extra-platforms ="), so the pipeline has to pick the
builder from domain.json and Nix has to ship the build over SSH.  The builder must not share /nix/store with the
client: both sides would take the same output-path locks and wait on each other for ever.  A chroot store
(`remote-store=local?root=…`) is no way out here: Nix 2.8 builds for a diverted store only inside its chroot, where
the demo's host tools (/usr/bin) are missing.  So the builder's login runs in a private mount namespace whose /nix is a
directory of this test, and reads its own nix.conf (NIX_CONF_DIR).  `nix-store --serve --write` (ssh://) and
`nix-daemon --stdio` (ssh-ng://) both open that store directly, as single-user Nix does.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cimtest.demo import DoitRunner, needs_demo
from cimtest.sshd import SSHD, checked, keygen

PI_DRV = r"/nix/store/[a-z0-9]{32}-nixos-sd-image-vhost-pi-aarch64-linux\.drv"

pytestmark = [
    pytest.mark.nix,
    needs_demo,
    pytest.mark.skipif(
        not Path(SSHD).is_file()
        or not shutil.which("unshare")
        or not shutil.which("ssh-keygen")
        or not shutil.which("ssh"),
        reason="needs openssh-server, openssh-client and unshare",
    ),
]


def builder_root(root: Path) -> Path:
    """A remote builder's files: its store (bound on /nix at login), its nix.conf and its login command."""
    (root / "nix").mkdir(parents=True)
    (root / "conf").mkdir()
    (root / "conf" / "nix.conf").write_text(
        "substituters =\nsandbox = false\nbuild-users-group =\nextra-platforms = aarch64-linux\n"
    )
    login = root / "login"
    login.write_text(
        "#!/bin/sh\n"
        "# Every SSH session of the builder: its own nix.conf, and its own /nix in a private mount namespace.\n"
        "set -e\n"
        f"export NIX_CONF_DIR={shlex.quote(str(root / 'conf'))}\n"
        "exec unshare --mount --propagation private -- "
        'sh -c \'mount --bind "$1" /nix && exec sh -c "$SSH_ORIGINAL_COMMAND"\' sh '
        f"{shlex.quote(str(root / 'nix'))}\n"
    )
    login.chmod(0o755)
    return root


def machines_host_key(public_key: Path) -> str:
    """A host key as Nix's machines file wants it: base64 of 'type key' (no comment)."""
    kind, key = public_key.read_text().split()[:2]
    return base64.b64encode(f"{kind} {key}".encode()).decode()


def local_nix_config(env: dict[str, str]) -> dict[str, object]:
    return {k: v["value"] for k, v in json.loads(checked(["nix", "show-config", "--json"], env)).items()}


SshdFactory = Callable[..., contextlib.AbstractContextManager[int]]


@pytest.mark.parametrize("scheme", ["ssh", "ssh-ng"])
def test_sd_image_builds_on_remote_builder(
    scheme: str, tmp_path: Path, demo_domain: Path, artifacts_dir: Path, doit: DoitRunner, sshd: SshdFactory
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    host_key = keygen(keys / "host", "builder-host")
    client_key = keygen(keys / "client", "cim-client")
    builder = builder_root(tmp_path / "builder")

    # A new vhost-pi (the uuid reaches host.json, so toplevel and the SD image): nothing of it is in any store yet.
    spec = json.loads((demo_domain / "domain.json").read_text())
    spec["hosts"]["vhost-pi"]["hardware"]["cpu"]["model"] += f"-{uuid.uuid4()}"
    uri = f"{scheme}://root@127.0.0.1"
    spec["builders"] = [
        {
            "uri": uri,
            "systems": ["aarch64-linux"],
            "ssh_key": str(client_key),
            # As Nix's machines file wants it; ssh checks it strictly (see NIX_SSHOPTS).
            "public_host_key": machines_host_key(host_key.with_suffix(".pub")),
        }
    ]
    (demo_domain / "domain.json").write_text(json.dumps(spec, indent=2))

    with sshd(tmp_path, host_key, client_key.with_suffix(".pub"), builder / "login") as port:
        env = {
            "NIX_CONFIG": "extra-platforms =",
            # The port travels in NIX_SSHOPTS (Nix 2.8 hands the URI's authority to ssh as is).  Nix writes the
            # machine's public_host_key as a known_hosts line for the bare host, while ssh looks a non-22 port up as
            # "[127.0.0.1]:port": HostKeyAlias makes it use that line, so the host key is checked for real.
            "NIX_SSHOPTS": f"-F /dev/null -p {port} -o HostKeyAlias=127.0.0.1 -o StrictHostKeyChecking=yes "
            "-o BatchMode=yes",
        }
        local = local_nix_config({**os.environ, **env})
        assert local["extra-platforms"] == [] and local["system"] == "x86_64-linux", local

        proc = doit(demo_domain, "build:vhost-pi-sd", env=env, timeout=900)

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(
        r"\[vhost-pi-sd\] strategy: aarch64-linux via remote: remote builder\(s\) from domain\.json: " + re.escape(uri),
        proc.stdout,
    ), output

    build_log = (artifacts_dir / "vhost-pi-sd" / "build.log").read_text()
    assert re.search(rf"building '{PI_DRV}' on '{re.escape(uri)}'", build_log), build_log

    record = json.loads((artifacts_dir / "manifest.json").read_text())["artifacts"]["vhost-pi-sd"]
    assert record["build"]["strategy"] == "remote"
    image = artifacts_dir / record["file"]
    assert image.is_file() and image.stat().st_size == record["size"]
    assert checked(["sha256sum", str(image)], timeout=120).split()[0] == record["sha256"]
    # Built in the builder's own store, then copied back into the local one.
    out_name = Path(record["outPath"]).name
    assert (builder / "nix" / "store" / out_name).is_dir()
    assert Path(record["outPath"]).is_dir()

    # The private key is referred to by path only: none of its lines is in the logs, the manifest or the output.
    secret = [ln for ln in client_key.read_text().splitlines() if ln and not ln.startswith("-----")]
    assert secret
    for path in artifacts_dir.rglob("*"):
        if path.is_file() and path != image:
            text = path.read_bytes().decode(errors="replace")
            assert not any(ln in text for ln in secret), f"{path} holds the builder's private key"
    assert not any(ln in output for ln in secret)
    shutil.rmtree(builder / "nix")  # the builder's store (inputs + image, ~200 MiB); kept only when the test fails
    print(f"{scheme}: remote build of vhost-pi-sd in {record['build']['seconds']} s")
