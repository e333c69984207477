# A host's side of the domain's LAN (docs/netboot.md), from domain.json:
#   - the provisioner (domain.json `provisioner`): bridge lan0, at the host's LAN address, for its provisioner guest
#     (./guests.nix puts that guest's veth on it, ./provisioner.nix says what it serves). The NIC that carries the
#     host's declared MAC is named after its domain.json NIC and joins lan0 only behind the domain's MAC filter: an
#     nftables table of the netdev family whose chain, hooked on that NIC's ingress, drops every frame whose source
#     MAC domain.json does not declare before the bridge sees it, and logs a few a second as
#     "cim-lan: refused IN=… MAC=<dst>:<src>:<type>". The LAN's state, those refusals and the guest's DHCP, TFTP and
#     HTTP lines are said on the consoles ("cim-lan: …"), where the pipeline's netboot test reads them.
#   - a netboot host: its lease, as it took it on the NIC with its declared MAC, said on the consoles.
# A MAC allow-list keeps out the careless, not an attacker who copies a declared MAC; 802.1X or a switch's port
# security is the real control.
{
  config,
  lib,
  pkgs,
  utils,
  domain,
  hostName,
  ...
}:
let
  host = domain.hosts.${hostName};
  nics = host.hardware.nics or [ ];
  # domain.json's MACs as the pipeline reads them: lower case, colon-separated.
  normalMac = mac: lib.toLower (builtins.replaceStrings [ "-" ] [ ":" ] mac);
  declared = lib.unique (
    lib.concatMap (other: map (nic: normalMac nic.mac) (other.hardware.nics or [ ])) (lib.attrValues domain.hosts)
  );

  isProvisioner = (domain.provisioner or null) == hostName;
  netboots = lib.elem "netboot" (host.images or [ ]);

  # The host's LAN interface: its first declared NIC (validation requires one wherever it is used below).
  lanNic = if nics != [ ] then lib.head nics else null;
  lanMac = if lanNic != null then normalMac lanNic.mac else "";
  uplink = if lanNic != null then lanNic.name else "lan";
  uplinkDevice = "sys-subsystem-net-devices-${utils.escapeSystemdPath uplink}.device";
  bridge = config.cim.lanBridge;
  provisionerGuest = lib.findFirst (guest: guest.kind == "provisioner") null (host.guests or [ ]);

  # Says each line of its input on every console the kernel writes to (as cim-boot-complete does).
  say = pkgs.writeShellScript "cim-lan-say" ''
    while IFS= read -r line; do
      while read -r console _; do
        if [ -c "/dev/$console" ]; then echo "$line" > "/dev/$console" || true; fi
      done < /proc/consoles
    done
  '';

  # The filter's hook: a base chain on the uplink's ingress that sends every frame through `refuse` (the table from
  # networking.nftables.tables below). Hooked when the NIC appears (a netdev chain needs its device to exist, and
  # the image also boots where the NIC is absent), again whenever nftables reloads the table.
  hookFilter = pkgs.writeText "cim-lan-hook.nft" ''
    table netdev cim-lan {
      chain ingress {
        type filter hook ingress device "${uplink}" priority -500; policy accept;
      }
    }
    flush chain netdev cim-lan ingress
    add rule netdev cim-lan ingress jump refuse
  '';
in
{
  options.cim.lanBridge = lib.mkOption {
    type = lib.types.str;
    default = "lan0";
    readOnly = true;
    internal = true;
    description = "The provisioner's LAN bridge: its LAN NIC and its provisioner guest's veth.";
  };

  config = lib.mkMerge [
    (lib.mkIf isProvisioner {
      assertions = [
        {
          assertion = nics != [ ] && provisionerGuest != null;
          message = "${hostName} is the domain's provisioner, so domain.json must give it hardware.nics and a guest of kind provisioner (`cim validate` says so too).";
        }
        {
          assertion = lib.stringLength uplink <= 15;
          message = "${hostName}'s LAN NIC is named '${uplink}' in domain.json; a Linux interface name holds at most 15 characters.";
        }
      ];

      # The NIC with the declared MAC takes its domain.json name. Only a device with that permanent address matches:
      # the bridge, a veth or a VLAN may carry the same MAC, none has it as its own.
      systemd.network.links."10-cim-${uplink}" = {
        matchConfig.PermanentMACAddress = lanMac;
        linkConfig.Name = uplink;
      };
      # Its address is the bridge's; it asks nobody for one.
      networking.dhcpcd.denyInterfaces = [ uplink ];

      # lan0 exists whether or not the NIC does (the pipeline boots the ISO without a LAN too), so the provisioner
      # guest always has its bridge; the NIC joins it behind the filter (cim-lan-uplink).
      networking.bridges.${bridge}.interfaces = [ ];
      networking.interfaces.${bridge}.ipv4.addresses = [
        {
          address = host.address;
          prefixLength = 24;
        }
      ];

      networking.nftables.enable = true;
      networking.nftables.tables.cim-lan = {
        family = "netdev";
        content = ''
          set declared {
            type ether_addr
            elements = { ${lib.concatStringsSep ", " declared} }
          }
          chain refuse {
            ether saddr @declared accept
            limit rate 5/second burst 5 packets log prefix "cim-lan: refused " level warn
            counter drop
          }
        '';
      };

      systemd.services.cim-lan-uplink = {
        description = "Bridge ${uplink} (${lanMac}) into ${bridge} behind the domain's MAC filter";
        wantedBy = [ uplinkDevice ];
        bindsTo = [ uplinkDevice ];
        requires = [
          "nftables.service"
          "${bridge}-netdev.service"
        ];
        after = [
          uplinkDevice
          "nftables.service"
          "${bridge}-netdev.service"
        ];
        # nftables re-creates the table on restart and reload, without the hook: hook it again.
        partOf = [ "nftables.service" ];
        unitConfig.ReloadPropagatedFrom = "nftables.service";
        path = [
          pkgs.iproute2
          pkgs.nftables
        ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecReload = "${pkgs.nftables}/bin/nft -f ${hookFilter}";
        };
        script = ''
          nft -f ${hookFilter}
          ip link set dev ${uplink} master ${bridge}
          ip link set dev ${uplink} up
        '';
        preStop = ''
          ip link set dev ${uplink} nomaster 2> /dev/null || true
          nft delete chain netdev cim-lan ingress 2> /dev/null || true
        '';
      };

      # The LAN's state once the provisioner guest is up, then the refusals (kernel) and the guest's DHCP, TFTP and
      # HTTP lines (its journal), each as one "cim-lan: …" line on the consoles.
      systemd.services.cim-lan-console = {
        description = "Say ${bridge}'s state and its DHCP, HTTP and refused-MAC lines on the consoles";
        wantedBy = [ "multi-user.target" ];
        after = [
          "container@${provisionerGuest.name}.service"
          "cim-lan-uplink.service"
        ];
        path = [
          pkgs.coreutils
          pkgs.gnugrep
          pkgs.jq
          pkgs.systemd
        ];
        serviceConfig = {
          Restart = "always";
          RestartSec = 5;
        };
        script = ''
          uplink=none
          if [ -e /sys/class/net/${uplink}/master ]; then uplink="${uplink} $(cat /sys/class/net/${uplink}/address)"; fi
          echo "cim-lan: provisioner on ${bridge} (${host.address}/24, uplink $uplink); ${toString (lib.length declared)} declared MAC(s) may attach, frames from any other are dropped" | ${say}
          journalctl --dmesg --follow --lines=0 --output=cat | grep --line-buffered '^cim-lan: refused ' | ${say} &
          journalctl --machine=${provisionerGuest.name} --follow --lines=0 --output=json \
            SYSLOG_IDENTIFIER=dnsmasq-dhcp SYSLOG_IDENTIFIER=dnsmasq-tftp SYSLOG_IDENTIFIER=nginx \
            | jq --unbuffered -r '"cim-lan: \(.SYSLOG_IDENTIFIER): \(.MESSAGE)"' | ${say} &
          wait
        '';
      };
    })

    # A netboot host takes its address by DHCP from the provisioner (NixOS's DHCP client, on every interface); the
    # pipeline reads the lease it took on its LAN NIC from the console.
    (lib.mkIf netboots {
      systemd.services.cim-lan-lease = {
        description = "Say ${hostName}'s lease on its LAN NIC (${lanMac}) on the consoles";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        path = [
          pkgs.coreutils
          pkgs.gawk
          pkgs.iproute2
        ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = ''
          lan=
          for dev in /sys/class/net/*; do
            if [ "$(cat "$dev/address")" = ${lanMac} ]; then lan=''${dev##*/}; fi
          done
          if [ -z "$lan" ]; then
            echo "cim-lan: no interface with the declared MAC ${lanMac}: no lease asked" | ${say}
            exit 0
          fi
          lease=
          for _ in $(seq 60); do
            lease=$(ip -4 -o address show dev "$lan" scope global | awk '{ print $4; exit }')
            if [ -n "$lease" ]; then break; fi
            sleep 1
          done
          if [ -n "$lease" ]; then
            echo "cim-lan: lease $lease for ${lanMac} on $lan" | ${say}
          else
            echo "cim-lan: no lease for ${lanMac} on $lan" | ${say}
          fi
        '';
      };
    })
  ];
}
