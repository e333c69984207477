# What every host of the domain shares: its name in the domain, the domain's accounts (key-only), remote access, Nix,
# the serial console, the boot-complete line the pipeline waits for, the statistics reporter, and its side of the
# domain's LAN (./lan.nix: the provisioner's bridge and MAC filter, a netboot host's lease).
{
  config,
  lib,
  pkgs,
  domain,
  hostName,
  ...
}:
let
  inherit (pkgs.stdenv.hostPlatform) system;
  accounts = domain.accounts or [ ];
  hasPassword = account: (account.hashed_password or null) != null;
  isWheel = account: lib.elem "wheel" (account.groups or [ ]);

  # The domain's people: key-only logins (domain.json refuses clear-text passwords; a crypt(3) hash is optional).
  # A module of its own so the guests people log in to (the dev container) get the very same accounts.
  login = {
    users.mutableUsers = false;
    users.users = lib.listToAttrs (
      map (
        account:
        lib.nameValuePair account.name {
          isNormalUser = true;
          description = account.description or "";
          extraGroups = account.groups or [ ];
          openssh.authorizedKeys.keys = account.ssh_keys or [ ];
          hashedPassword = account.hashed_password or null;
        }
      ) accounts
    );
    # A group an account names but no enabled service creates (libvirtd, say) must still exist.
    users.groups = lib.genAttrs (lib.unique (lib.concatMap (account: account.groups or [ ]) accounts)) (_: { });
    # sudo cannot ask a key-only administrator for a password they do not have.
    security.sudo.wheelNeedsPassword = lib.all hasPassword (lib.filter isWheel accounts);
    services.openssh = {
      enable = true;
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = "no";
      };
    };
  };

  # Serial consoles, the last one becoming /dev/console. ttyAMA0 is QEMU's `virt` UART (the pipeline's aarch64 VM);
  # ttyS0 the PC UART, and the Pi's mini UART.
  serialConsoles =
    {
      x86_64-linux = [ "ttyS0" ];
      aarch64-linux = [
        "ttyS0"
        "ttyAMA0"
      ];
    }
    .${system} or [ "ttyS0" ];

  # The image contract (the pipeline's names, contract.json beside flake.nix): the boot-complete line, the report
  # lines the install check reads, the NATS subjects.
  contract = lib.importJSON ./contract.json;
  forHost = builtins.replaceStrings [ "{host}" ] [ hostName ];

  stats = config.cim.stats;
  statsSubject = forHost contract.subjects.stats;
  inventorySubject = forHost contract.subjects.inventory;
in
{
  imports = [
    login
    ./lan.nix
    ./boot-counting.nix
  ];

  options.cim = {
    image = lib.mkOption {
      type = lib.types.nullOr (
        lib.types.enum [
          "iso"
          "sd"
          "netboot"
        ]
      );
      default = null;
      internal = true;
      description = "The image this configuration is being built into (set by flake.nix); null for the installed system.";
    };

    loginModule = lib.mkOption {
      type = lib.types.deferredModule;
      readOnly = true;
      internal = true;
      description = "The domain's accounts and key-only SSH, as a module for guests that people log in to.";
    };

    addresses = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      description = ''
        The IPv4 address of every host of the domain on the site's LAN, by host name (from domain.json). Hosts take
        their address by DHCP, so the same image boots anywhere (the pipeline's QEMU included); these are the
        reservations the site's DHCP server is expected to make, the names the dns guest answers and where edge
        hosts find the hub. Override one with `cim.addresses.<host> = "…";`.
      '';
    };

    stats = {
      natsUrl = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "nats://10.23.0.12:${toString contract.ports.nats}";
        description = "The NATS server the host's statistics are published to, on subject `cim.<host>.stats`; null: none.";
      };
      guests = lib.mkOption {
        type = lib.types.attrsOf lib.types.str;
        default = { };
        example = {
          nats = "nats";
        };
        description = "Guest name to the NixOS container (machine) that runs it; its container@ unit gives state and resource use.";
      };
      interval = lib.mkOption {
        type = lib.types.str;
        default = "30s";
        description = "How often the statistics are published (a systemd time span).";
      };
    };
  };

  config = {
    cim.loginModule = login;
    # domain.json gives every host its address (and every guest its own, ./guests.nix).
    cim.addresses = lib.mapAttrs (_: host: lib.mkDefault host.address) domain.hosts;

    networking.hostName = hostName;
    networking.domain = domain.fqdn;
    time.timeZone = "UTC";

    nix.settings = {
      experimental-features = [
        "nix-command"
        "flakes"
      ];
      trusted-users = [
        "root"
        "@wheel"
      ];
    };

    # mkAfter: after the image modules' own console= (the SD module ends with tty0), so a serial port is /dev/console.
    boot.kernelParams = lib.mkAfter (
      [ "console=tty0" ] ++ map (tty: "console=${tty},115200n8") serialConsoles
    );

    # The pipeline's boot test waits for the contract's boot-complete line on the serial console. It is printed once
    # multi-user.target (and so every guest container, through machines.target) has been reached, after the report
    # lines the install check reads (what is mounted from which partition, the partitions, active swap). Both go to
    # every console in /proc/consoles, not only /dev/console, so no console= order can hide them.
    systemd.services.cim-boot-complete = {
      description = "Report on the consoles that ${hostName} finished booting";
      wantedBy = [ "multi-user.target" ];
      after = [ "multi-user.target" ];
      path = [ pkgs.gawk ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = ''
        report() {
          while read -r dev mnt fstype _; do
            case "$dev" in
              /dev/*) echo "${contract.report.fs} $mnt $(readlink -f "$dev") $fstype $(df -k "$mnt" | awk 'NR==2 {print $2}')K" ;;
            esac
          done < /proc/mounts
          for part in /sys/class/block/*/partition; do
            [ -e "$part" ] || continue
            dir=''${part%/partition}
            echo "${contract.report.part} /dev/''${dir##*/} $(sed -n 's/^PARTNAME=//p' "$dir/uevent") $(( $(cat "$dir/size") / 2048 ))MiB"
          done
          while read -r dev _ size _; do
            case "$dev" in /dev/*) echo "${contract.report.swap} $(readlink -f "$dev") ''${size}K" ;; esac
          done < /proc/swaps
        }
        message="$(report)
        ${forHost contract.boot_complete} (${system})"
        echo "$message"
        while read -r console _; do
          if [ -c "/dev/$console" ]; then echo "$message" > "/dev/$console" || true; fi
        done < /proc/consoles
      '';
    };

    # The host reports by sending messages to a running guest: load, memory and, per guest, its state, main PID (the
    # container's init as the host sees it), CPU seconds and memory bytes (its container@ unit's cgroup), as one JSON
    # message on `cim.<host>.stats` in the schema the demo's reporter sends too (pipeline/schemas/stats.json).
    systemd.services.cim-stats = lib.mkIf (stats.natsUrl != null) {
      description = "Publish ${hostName}'s statistics to NATS subject ${statsSubject}";
      path = [
        pkgs.gawk
        pkgs.jq
        pkgs.natscli
        pkgs.systemd
      ];
      environment.HOME = "/run/cim-stats"; # natscli keeps its contexts under $HOME
      serviceConfig = {
        Type = "oneshot";
        DynamicUser = true;
        RuntimeDirectory = "cim-stats";
      };
      script = ''
        set -euo pipefail
        read -r load1 load5 load15 _ < /proc/loadavg
        read -r uptime _ < /proc/uptime
        mem_total=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
        mem_available=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)

        guests='[]'
        guest() { # NAME MACHINE
          local unit="container@$2.service" state pid memory cpu
          state=$(systemctl show --property=ActiveState --value "$unit")
          if [ "$state" = active ]; then state=running; else state=stopped; fi
          pid=$(machinectl show "$2" --property=Leader --value 2>/dev/null || true)
          [ -n "$pid" ] || pid=$(systemctl show --property=MainPID --value "$unit")
          memory=$(systemctl show --property=MemoryCurrent --value "$unit")
          cpu=$(systemctl show --property=CPUUsageNSec --value "$unit")
          guests=$(jq -c --arg name "$1" --arg state "$state" --arg pid "$pid" --arg memory "$memory" --arg cpu "$cpu" \
            '. + [{name: $name, state: $state,
                   pid: (($pid | tonumber? // 0) | if . > 0 then . else null end),
                   cpu_seconds: (($cpu | tonumber? // 0) / 1e9),
                   memory_bytes: ($memory | tonumber? // 0)}]' \
            <<<"$guests")
        }
        ${lib.concatStrings (
          lib.mapAttrsToList (
            name: machine: "guest ${lib.escapeShellArg name} ${lib.escapeShellArg machine}\n"
          ) stats.guests
        )}
        payload=$(jq -cn --arg host ${lib.escapeShellArg hostName} --arg system ${system} \
          --argjson load "[$load1, $load5, $load15]" --argjson uptime "$uptime" \
          --argjson total "$mem_total" --argjson available "$mem_available" --argjson guests "$guests" \
          '{host: $host, system: $system, time: (now | floor), uptime_s: $uptime, load: $load,
            memory: {total_kib: $total, available_kib: $available}, guests: $guests}')
        nats --server ${lib.escapeShellArg stats.natsUrl} pub ${statsSubject} "$payload"
      '';
    };
    systemd.timers.cim-stats = lib.mkIf (stats.natsUrl != null) {
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnBootSec = stats.interval;
        OnUnitActiveSec = stats.interval;
      };
    };

    # The host's hardware, detected by nixos-facter at every boot, summarised on the console and published once per
    # boot on `cim.<host>.inventory` (the same facter.json `cim inventory <host> --facter FILE` reads). Core NATS keeps
    # nothing, so the report is re-published every few seconds until a reader acknowledges it on `….ack` (what the
    # pipeline's boot test does), or 10 minutes pass. Root: hwinfo reads DMI tables and PCI configuration space.
    systemd.services.cim-inventory = lib.mkIf (stats.natsUrl != null) {
      description = "Publish ${hostName}'s hardware report (nixos-facter) to NATS subject ${inventorySubject}";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      path = [
        pkgs.coreutils
        pkgs.jq
        pkgs.natscli
        pkgs.nixos-facter
      ];
      environment.HOME = "/run/cim-inventory"; # natscli keeps its contexts under $HOME
      serviceConfig = {
        Type = "simple";
        RuntimeDirectory = "cim-inventory";
        StandardOutput = "journal+console";
      };
      script = ''
        set -euo pipefail
        report="$RUNTIME_DIRECTORY/facter.json"
        nixos-facter > "$report"
        jq -r '"cim: inventory: \(.smbios.system.manufacturer // "") \(.smbios.system.product // "");"
          + " cpu \(.hardware.cpu[0].model_name // "?"); memory \(([.smbios.memory_device[]?.size] | add // 0) / 1048576) GiB;"
          + " disks \([.hardware.disk[]?] | length); gpus \([.hardware.graphics_card[]?] | length);"
          + " virtualisation \(.virtualisation)"' "$report"
        server=${lib.escapeShellArg stats.natsUrl}
        nats --server "$server" sub ${inventorySubject}.ack --count 1 > /dev/null 2>&1 &
        ack=$!
        for _ in $(seq 200); do
          nats --server "$server" pub --force-stdin ${inventorySubject} < "$report" || true
          if ! kill -0 "$ack" 2> /dev/null; then
            echo "cim: inventory acknowledged on ${inventorySubject}.ack"
            exit 0
          fi
          sleep 3
        done
        kill "$ack" 2> /dev/null || true
      '';
    };

    system.stateVersion = "25.11";
  };
}
