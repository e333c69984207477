#!/usr/bin/env bash
# Deploy a host's next generation the way deploy:<host> does, on a real NixOS host, through NixOS's own path:
#   configs/cim/deploy.sh HOST [ACCOUNT@]ADDRESS [generation=next|broken]
# builds nixosConfigurations.HOST extended with the deploy's module (docs/deploy.md), copies its closure with
# `nix copy --to ssh://` (the account must be a trusted Nix user: wheel, see configuration.nix), makes it the boot
# default with sudo (nix-env --set, switch-to-configuration boot: a counted systemd-boot entry, boot-counting.nix),
# reboots the host and waits for it, then compares /run/current-system with what was deployed.  A host that comes back
# on another system rolled back: this script says so and fails.
set -euo pipefail
host=${1:?usage: deploy.sh HOST [ACCOUNT@]ADDRESS [generation=next|broken]}
target=${2:?usage: deploy.sh HOST [ACCOUNT@]ADDRESS [generation=next|broken]}
variant=${3:-generation=next}
variant=${variant#generation=}
here=$(cd "$(dirname "$0")" && pwd)
ssh_opts=(-o BatchMode=yes -o ConnectTimeout=10)

modules='[ { environment.etc."cim/deployment".text = "next generation of '"$host"', made by deploy.sh\n"; } ]'
if [ "$variant" = broken ]; then
    modules='[ { environment.etc."cim/deployment".text = "next generation of '"$host"', made by deploy.sh\n"; }
               { environment.etc."cim/boot-checks.d/broken".text = "echo broken on purpose; exit 1\n"; } ]'
fi
drv=$(nix eval --raw --impure --expr \
    "((builtins.getFlake \"path:$here\").nixosConfigurations.\"$host\".extendModules { modules = $modules; }).config.system.build.toplevel.drvPath")
system=$(nix build --json --no-link "$drv^out" | sed -n 's/.*"out":"\([^"]*\)".*/\1/p')
echo "deploy.sh: $host's next generation: $system"

before=$(timeout 60 ssh "${ssh_opts[@]}" "$target" readlink /run/current-system)
NIX_SSHOPTS="${ssh_opts[*]}" timeout 3600 nix copy --to "ssh://$target" "$system"
timeout 600 ssh "${ssh_opts[@]}" "$target" \
    "sudo nix-env --profile /nix/var/nix/profiles/system --set $system && sudo $system/bin/switch-to-configuration boot"
timeout 60 ssh "${ssh_opts[@]}" "$target" 'sudo systemctl reboot' || true

# Every try of a bad generation costs a boot, then the fallback boots: wait for the host to answer again.
sleep 30
deadline=$((SECONDS + 1800))
until after=$(timeout 20 ssh "${ssh_opts[@]}" "$target" \
    'systemctl is-active --quiet boot-complete.target && readlink /run/current-system' 2>/dev/null); do
    [ "$SECONDS" -lt "$deadline" ] || { echo "deploy.sh: $target did not come back within 30 min" >&2; exit 1; }
    sleep 10
done
if [ "$after" = "$system" ]; then
    echo "deploy.sh: $host runs $system"
else
    echo "deploy.sh: $host rolled back: it runs $after (before the deploy: $before), not $system" >&2
    exit 1
fi
